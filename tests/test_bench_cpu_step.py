"""benchmarks/bench_cpu_step.py at a tiny size: both rows, both backends, and the backend left on auto."""

from __future__ import annotations

from conftest import run_benchmark


def test_tiny_run_reports_both_rows() -> None:
    out = run_benchmark(
        "bench_cpu_step",
        "--d",
        "16",
        "--n",
        "64",
        "--k",
        "4",
        "--batch",
        "64",
        "--tokens",
        "512",
        "--reps",
        "1",
    )
    rows = [
        line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ") and "---" not in line
    ]
    assert rows == ["k tok/s", "training step", "feature_stats"]
    for line in out.splitlines()[-2:]:
        ref, cpu, ratio = (float(c.replace(",", "")) for c in line.strip("| \n").split("|")[1:])
        assert ref > 0 and cpu > 0 and abs(ratio - cpu / ref) < 0.01 + 0.01 * ratio
