"""benchmarks/bench_store_train.py on the CPU: every data row gets a steady-state rate.

The CUDA run (ViT-B/16, nvJPEG extraction, `--profile`) runs the same functions; this is its CPU twin."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import run_benchmark

ROWS = [
    "random, before any extraction",
    "random, after the extraction",
    "the store's tokens, in memory",
    "the store",
    "the store's batches alone, no training",
    "random with the store's per-dimension mean and std",
]


def test_cpu_run_reports_every_row(tmp_path: Path) -> None:
    args = ["--device", "cpu", "--n-images", "8", "--steps", "2", "4", "--out", str(tmp_path), "--no-auxk"]
    stdout = run_benchmark("bench_store_train", *args)
    assert "no AuxK" in stdout.splitlines()[0]
    for row in ROWS:
        found = re.search(rf"^\| {re.escape(row)} \| (-?[\d.]+) \|$", stdout, re.M)
        assert found, f"row {row!r} missing in:\n{stdout}"
    assert not list(tmp_path.iterdir()), "the JPEG folder and the store are temporary"
