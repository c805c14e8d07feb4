"""benchmarks/bench_store_train.py on the CPU: every data row gets a steady-state rate.

The CUDA run (ViT-B/16, nvJPEG extraction, `--profile`) runs the same functions; this is its CPU twin."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
ROWS = [
    "random, before any extraction",
    "random, after the extraction",
    "the store's tokens, in memory",
    "the store",
    "random with the store's per-dimension mean and std",
]


def test_cpu_run_reports_every_row(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "benchmarks")}
    script = ROOT / "benchmarks" / "bench_store_train.py"
    args = ["--device", "cpu", "--n-images", "8", "--steps", "2", "4", "--out", str(tmp_path)]
    run = subprocess.run(
        [sys.executable, "-P", str(script), *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-2000:]
    for row in ROWS:
        found = re.search(rf"^\| {re.escape(row)} \| (-?[\d.]+) \|$", run.stdout, re.M)
        assert found, f"row {row!r} missing in:\n{run.stdout}"
    assert not list(tmp_path.iterdir()), "the JPEG folder and the store are temporary"
