"""benchmarks/bench_decode_limits.py: the `--small` CPU run measures every row, prints the table, writes JSON.

The CUDA rows run the same `device_rates` code with device="cuda" (nvJPEG) plus the host→device copy rows;
this CPU run is their twin (torchvision's CPU decoder, `DeviceDecoder` on the CPU)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from conftest import load_benchmark

bench = load_benchmark("bench_decode_limits")

EXPECTED = [
    ("per core", "file read (`read_jpeg`)"),
    ("per core", "PIL decode (`open_image`)"),
    ("per core", "PIL decode, draft ≥ 336 px"),
    ("per core", "resize + crop → uint8 (decoded images)"),
    ("per core", "decode + resize + crop → uint8, decode='pil'"),
    ("per core", "decode + resize + crop → uint8, decode='draft'"),
    ("workers", "P = 1, batch 4"),
    ("workers", "P = 2, batch 4"),
    ("cpu", "JPEG decode (`decode_jpegs`), batch 4"),
    ("cpu", "JPEG decode (`decode_jpegs`), batch 8"),
    ("cpu", "decode + preprocess (`DeviceDecoder`), batch 4"),
    ("cpu", "decode + preprocess (`DeviceDecoder`), batch 8"),
]


def test_small_run_measures_every_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, threads = tmp_path / "limits.json", torch.get_num_threads()  # conftest sets 1
    torch.set_num_threads(2)
    try:
        rows = bench.main(["--small", "--workers", "1", "2", "--out", str(tmp_path), "--json", str(out)])
        assert torch.get_num_threads() == 2  # the one-thread rows put the process's setting back
    finally:
        torch.set_num_threads(threads)
    assert [(r.section, r.what) for r in rows] == EXPECTED
    assert all(r.images_per_s > 0 for r in rows), rows
    table = capsys.readouterr().out
    for row in rows:  # every row in the Markdown table, with its rate as printed
        assert f"| {row.section} | {row.what} | {row.images_per_s:,.0f} |" in table
    assert "| section | what | images/s | note |" in table
    assert f"{bench.usable_cores()} usable cores of {os.cpu_count()} logical" in table
    report = json.loads(out.read_text())
    assert [(r["section"], r["what"]) for r in report["rows"]] == EXPECTED
    assert "timm:test_vit: Resize 168 bicubic, crop 160" in rows[4].note
    assert re.fullmatch(r"\d+×\d+ → \d+×\d+", rows[2].note)  # the size the draft decode gave
    assert list(tmp_path.iterdir()) == [out]  # the JPEG folder is removed


def test_default_workers_double_up_to_the_core_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "usable_cores", lambda: 12)
    assert bench.default_workers(small=False) == [1, 2, 4, 8, 12]
    assert bench.default_workers(small=True) == [1, 2]
    monkeypatch.setattr(bench, "usable_cores", lambda: 16)
    assert bench.default_workers(small=False) == [1, 2, 4, 8, 16]


def test_usable_cores_is_within_the_affinity() -> None:
    assert 1 <= bench.usable_cores() <= len(os.sched_getaffinity(0))


def test_bad_options_name_the_fix(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--workers", "0"])
    assert "--workers [0]: give worker counts of 1 or more" in capsys.readouterr().err
