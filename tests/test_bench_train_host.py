"""benchmarks/bench_train_host.py on the CPU (its CPU twin): every count of a watched run is reported."""

from __future__ import annotations

from conftest import run_benchmark


def test_cpu_run_counts_every_step_and_no_sync() -> None:
    args = ["--device", "cpu", "--d", "16", "--n", "64", "--k", "4", "--batches", "64", "--steps", "40"]
    args += ["--data-tokens", "8192"]
    rows = [
        line for line in run_benchmark("bench_train_host", *args).splitlines() if line.startswith("| 64 |")
    ]
    assert len(rows) == 1, rows
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    # batch, steps, wall, iterations, captures, eager steps, replays, syncs inside, syncs in the run
    assert cells[:2] == ["64", "40"] and float(cells[2]) > 0
    assert cells[3:9] == ["40", "0", "40", "0", "0", "0"]  # eager on the CPU: one step per iteration
    assert all(" / " in cell for cell in cells[9:11])
