"""benchmarks/bench_recipe_gpu.py: the batch variants' θ calibration and the tokens-to-reach interpolation."""

from __future__ import annotations

import argparse
import math

import torch
from conftest import load_benchmark

from mmsae.sae import build_sae

bench = load_benchmark("bench_recipe_gpu")


def test_calibrated_threshold_gives_l0_k_on_the_calibration_tokens() -> None:
    """θ = the k·N-th largest selection score: in eval mode the N calibration tokens keep k codes each on
    average (chunked, so the running top-k·N merge is exercised), whatever θ training left."""
    torch.manual_seed(0)
    for arch in ("batchtopk", "matryoshka"):
        sae = build_sae(arch, 16, 64, k=4)
        sae.threshold.fill_(10.0)  # a θ that keeps almost nothing
        calib_ND = torch.randn(1000, 16)
        bench.calibrate_threshold(sae, calib_ND, chunk=256)
        l0 = (sae.encode(calib_ND) != 0).sum(-1).float().mean()
        assert abs(float(l0) - 4) <= 0.01, (arch, float(l0))


def test_tokens_to_reach_interpolates_log_linearly() -> None:
    curve = [(1_000_000, 0.4), (2_000_000, 0.2), (4_000_000, 0.1)]
    assert math.isclose(bench.tokens_to_reach(0.2, curve), 2e6)
    assert math.isclose(bench.tokens_to_reach(0.3, curve), math.sqrt(2) * 1e6)
    assert bench.tokens_to_reach(0.5, curve) == 1_000_000
    assert bench.tokens_to_reach(0.05, curve) == math.inf
    # a tie at the last budget (5 digits) is reached there, not "never"
    assert bench.tokens_to_reach(0.1659937, [(4_000_000, 0.1727), (8_000_000, 0.1660019)]) == 8_000_000


def test_only_more_archs_trains_just_those_rows_at_the_top_budget() -> None:
    args = argparse.Namespace(
        budgets=[1000, 2000],
        lr_mults=[2.0],
        more_archs=["relu[target_l0=16]"],
        only_more_archs=True,
        more_archs_every_budget=False,
    )
    assert bench.recipes(args) == [("mmsae relu[target_l0=16]", 2000)]
    args.more_archs_every_budget = True  # short runs of a variant: every budget
    assert bench.recipes(args) == [("mmsae relu[target_l0=16]", 1000), ("mmsae relu[target_l0=16]", 2000)]
    args.only_more_archs = False
    assert len(bench.recipes(args)) > 1
