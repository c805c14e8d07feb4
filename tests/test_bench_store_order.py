"""benchmarks/bench_store_order.py and bench_store_read.py: the store orders and reads they time."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import load_benchmark, run_benchmark


def test_store_stream_reads_every_token_once_per_pass_in_shards_or_pieces() -> None:
    bench = load_benchmark("bench_store_order")
    rows_ND = torch.arange(1000.0).repeat_interleave(2).view(1000, 2)
    for kwargs in ({}, {"chunk_rows": 64}):
        stream = bench.StoreStream(rows_ND, n_shards=2, buffer_tokens=500, batch_size=100, seed=1, **kwargs)
        batches = list(stream)
        assert [len(b) for b in batches] == [100] * 10
        assert sorted(torch.cat(batches)[:, 0].tolist()) == list(range(1000))
        assert torch.equal(torch.cat(batches), torch.cat(list(stream)))  # a seeded pass
    first = next(iter(bench.StoreStream(rows_ND, 2, 500, 100, seed=1)))
    assert len({int(v) // 500 for v in first[:, 0]}) == 1  # whole shards: one shard's rows first
    first = next(iter(bench.StoreStream(rows_ND, 2, 500, 100, seed=1, chunk_rows=64)))
    assert len({int(v) // 500 for v in first[:, 0]}) == 2


def test_folder_order_groups_the_crops_by_photo(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = load_benchmark("bench_store_order")
    photos = [Path(f"p{i}.jpg") for i in range(20)]  # 18 training photos: every tenth is held out
    monkeypatch.setattr(bench, "zoo_photos", lambda: photos)
    crops_ND = torch.arange(40.0).repeat_interleave(4).view(40, 4, 1).expand(40, 4, 3).reshape(160, 3)
    ordered = bench.folder_order(crops_ND, tokens_per_crop=4)
    crop_ids = ordered[::4, 0].long()
    assert sorted(crop_ids.tolist()) == list(range(40))  # a permutation of whole crops
    photo_of = []
    for i in range(40):
        torch.manual_seed(i)
        photo_of.append(int(torch.randint(18, ())))
    assert [photo_of[i] for i in crop_ids] == sorted(photo_of)


def test_store_read_benchmark_reports_every_piece_size() -> None:
    stdout = run_benchmark(
        "bench_store_read", "--images", "24", "--shard-tokens", "512", "--pieces", "512", "64"
    )
    assert re.search(r"^\| whole shards \| [\d.]+ \|$", stdout, re.M), stdout
    assert re.search(r"^\| 64 tokens \| [\d.]+ \|$", stdout, re.M), stdout
