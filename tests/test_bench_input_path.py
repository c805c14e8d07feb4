"""benchmarks/bench_input_path.py on the CPU: every row of the device-decode input path gets a positive rate.

The CUDA run times the same functions with nvJPEG; this CPU run (torchvision's CPU decoder) is its twin."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
ROWS = [
    "bytes loader alone, 1 workers",
    "DeviceDecoder on loaded batches, main thread",
    "DeviceDecoder on loaded batches, one ahead in its thread",
    "input_batches, 1 workers",
    "input_batches + the bare forward",
    "bare forward on device-resident pixels",
]


def test_cpu_run_reports_every_row(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "benchmarks")}
    args = ["--device", "cpu", "--n-images", "64", "--batch-size", "8", "--workers", "1", "--warm", "2"]
    script = ROOT / "benchmarks" / "bench_input_path.py"
    run = subprocess.run(
        [sys.executable, "-P", str(script), *args, "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    for row in ROWS:
        found = re.search(rf"^  {re.escape(row)}: ([\d,]+)$", run.stdout, re.M)
        assert found, f"row {row!r} missing in:\n{run.stdout}"
        assert int(found.group(1).replace(",", "")) > 0
    assert not list(tmp_path.iterdir()), "the JPEG folder is a temporary one"
