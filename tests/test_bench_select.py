"""benchmarks/bench_select.py on the CPU: every (n, dtype, k) row is printed with positive times."""

from __future__ import annotations

import re

from conftest import run_benchmark


def test_cpu_run_reports_every_row() -> None:
    stdout = run_benchmark("bench_select", "--device", "cpu", "--small", timeout=120)
    rows = re.findall(
        r"^\| 512 \| (bfloat16|float32) \| (8|32) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", stdout, re.M
    )
    assert len(rows) == 4, stdout
    assert all(float(base) > 0 and float(ours) > 0 for _, _, base, ours, _ in rows)
