"""benchmarks/bench_input_path.py on the CPU: every row of the device-decode input path gets a positive rate.

The CUDA run times the same functions with nvJPEG; this CPU run (torchvision's CPU decoder) is its twin."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import run_benchmark

ROWS = [
    "bytes loader alone, 1 workers",
    "DeviceDecoder on loaded batches, main thread",
    "DeviceDecoder on loaded batches, one ahead in its thread",
    "input_batches, 1 workers",
    "input_batches + the bare forward",
    "bare forward on device-resident pixels",
]


def test_cpu_run_reports_every_row(tmp_path: Path) -> None:
    args = [
        "--device",
        "cpu",
        "--n-images",
        "64",
        "--batch-size",
        "8",
        "--workers",
        "1",
        "--warm",
        "2",
        "--profile",
        "1",
    ]
    stdout = run_benchmark("bench_input_path", *args, "--out", str(tmp_path), timeout=300)
    for row in ROWS:
        found = re.search(rf"^  {re.escape(row)}: ([\d,]+)$", stdout, re.M)
        assert found, f"row {row!r} missing in:\n{stdout}"
        assert int(found.group(1).replace(",", "")) > 0
    assert "DeviceDecoder on 1 loaded batches, by cpu_time_total:" in stdout and "Self CPU" in stdout
    assert not list(tmp_path.iterdir()), "the JPEG folder is a temporary one"
