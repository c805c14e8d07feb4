"""benchmarks/bench_auxk.py on the CPU (its CUDA run times the same two functions): both paths time every
row, and its dense path is the same loss as `TopKSAE.auxk_loss`."""

from __future__ import annotations

import re

import torch
from conftest import load_benchmark, run_benchmark

from mmsae.sae import DeadFeatures, TopKSAE, build_sae


def test_cpu_run_times_both_paths_for_every_dead_count() -> None:
    stdout = run_benchmark("bench_auxk", "--device", "cpu", "--small")
    rows = re.findall(r"^\| 32 \| (\d+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", stdout, re.M)
    assert [(k_aux, dead) for k_aux, dead, *_ in rows] == [("8", "8"), ("16", "200")]
    assert all(float(dense) > 0 and float(sparse) > 0 for *_, dense, sparse, _ in rows)


def test_dense_path_is_the_same_loss() -> None:
    bench = load_benchmark("bench_auxk")
    torch.manual_seed(0)
    sae = build_sae("topk", 16, 64, k=4, aux_k=8)
    assert isinstance(sae, TopKSAE)
    x_BD = torch.randn(32, 16)
    x_hat_BD = sae(x_BD).x_hat.detach()
    dead_N = torch.rand(64) < 0.5
    dead = DeadFeatures(dead_N, int(dead_N.sum()))
    expected = sae.auxk_loss(x_BD, x_hat_BD, dead)
    torch.testing.assert_close(bench.dense_auxk(sae, x_BD, x_hat_BD, dead), expected)
