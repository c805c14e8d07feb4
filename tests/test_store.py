"""ActivationStore reading: shuffle buffer, several hooks, checksum and truncation errors."""

from __future__ import annotations

import itertools
import os
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from mmsae.datasets.images import ImageFolder
from mmsae.encoders import Encoder, get_encoder
from mmsae.extract import extract
from mmsae.store import ActivationStore, StoreError, shard_files, shuffle_batches
from mmsae.trainer.data import StoreSource

N_IMAGES, TOKENS_PER_IMAGE = 12, 101  # timm test_vit: 100 patches + CLS


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    torch.manual_seed(0)
    return get_encoder("timm:test_vit")


@pytest.fixture(scope="module")
def folder(noise_folder: Path) -> ImageFolder:
    return ImageFolder(noise_folder)


@pytest.fixture
def store(encoder: Encoder, folder: ImageFolder, tmp_path: Path) -> ActivationStore:
    # 2 images per forward, 2 forwards per shard → 3 shards
    return extract(
        encoder,
        folder,
        ["blocks.5", "norm"],
        tmp_path,
        batch_size=2,
        shard_tokens=4 * TOKENS_PER_IMAGE,
        progress=False,
    )


def _rows(batches: list[torch.Tensor]) -> list[tuple[float, ...]]:
    return sorted(map(tuple, torch.cat(batches).tolist()))


@pytest.mark.parametrize("shuffle", [True, False])
def test_shuffle_buffer_yields_every_token_exactly_once(shuffle: bool) -> None:
    sizes = [5, 17, 1, 30, 0, 12, 9]
    ids = torch.arange(sum(sizes))
    chunks = [{"x": c[:, None]} for c in ids.split(sizes)]
    gen = torch.Generator().manual_seed(0) if shuffle else None
    out = [b["x"][:, 0] for b in shuffle_batches(chunks, batch_size=8, buffer_tokens=20, generator=gen)]
    assert [len(b) for b in out[:-1]] == [8] * (len(out) - 1) and 0 < len(out[-1]) <= 8
    got = torch.cat(out)
    assert torch.equal(got.sort().values, ids)  # each token exactly once
    assert torch.equal(got, ids) != shuffle  # shuffled iff asked
    dropped = list(shuffle_batches(chunks, batch_size=8, buffer_tokens=20, generator=gen, drop_last=True))
    assert all(len(b["x"]) == 8 for b in dropped) and len(dropped) == sum(sizes) // 8


def test_shuffle_buffer_mixes_beyond_one_buffer_and_is_seeded() -> None:
    """Eviction from a full pool: tokens leave in an order unrelated to arrival, some long after a whole
    buffer has passed (geometric residence), and the same seed gives the same order."""
    ids = torch.arange(2000)
    chunks = [{"x": c[:, None]} for c in ids.split(50)]

    def order(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        batches = shuffle_batches(chunks, 64, buffer_tokens=200, generator=gen)
        return torch.cat([b["x"][:, 0] for b in batches])

    got = order(0)
    assert torch.equal(got, order(0)) and not torch.equal(got, order(1))
    delay = torch.empty_like(got)
    delay[got] = torch.arange(len(got)) - got  # output position − arrival position, per token
    assert len(set(got[:64].div(50, rounding_mode="floor").tolist())) > 2  # first batch spans several chunks
    assert int(delay.max()) > 400  # some tokens stay for more than two buffers' worth of arrivals


def test_store_describes_itself(store: ActivationStore) -> None:
    assert store.hooks == ["blocks.5", "norm"] and store.d_in == 64 and store.dim("norm") == 64
    assert store.n_tokens == N_IMAGES * TOKENS_PER_IMAGE and store.n_shards == 3
    meta = store.meta("norm")
    assert sorted(meta) == ["example_id", "token_index"]
    assert np.array_equal(meta["example_id"], np.repeat(np.arange(N_IMAGES), TOKENS_PER_IMAGE))
    assert np.array_equal(meta["token_index"], np.tile(np.arange(TOKENS_PER_IMAGE), N_IMAGES))
    with pytest.raises(ValueError, match="several hooks"):
        next(store.batches(16))


def test_epoch_covers_store_once_and_seed_controls_order(store: ActivationStore) -> None:
    ordered = list(store.batches(50, hook="norm", shuffle=False))
    shuffled = list(store.batches(50, hook="norm", seed=1, buffer_tokens=300))
    assert sum(len(b) for b in shuffled) == store.n_tokens
    assert _rows(shuffled) == _rows(ordered)
    assert not torch.equal(torch.cat(shuffled), torch.cat(ordered))
    again = list(store.batches(50, hook="norm", seed=1, buffer_tokens=300))
    assert torch.equal(torch.cat(again), torch.cat(shuffled))
    other = torch.cat(list(store.batches(50, hook="norm", seed=2, buffer_tokens=300)))
    assert not torch.equal(other, torch.cat(shuffled))


def test_passes_share_one_shuffle_buffer(store: ActivationStore) -> None:
    n = store.n_tokens  # 1212 tokens; a 300-token buffer carries over from pass to pass
    three = list(store.batches(50, hook="norm", seed=1, buffer_tokens=300, epochs=3))
    assert sum(len(b) for b in three) == 3 * n
    assert _rows(three) == sorted(_rows(list(store.batches(50, hook="norm", shuffle=False))) * 3)
    # The first pass's batches equal a one-pass read's up to where that one empties its buffer.
    one = torch.cat(list(store.batches(50, hook="norm", seed=1, buffer_tokens=300)))
    assert torch.equal(torch.cat(three)[: n - 300], one[: n - 300])
    endless = store.batches(50, hook="norm", seed=1, buffer_tokens=300, epochs=None)
    head = torch.cat([next(endless) for _ in range((3 * n - 300) // 50)])
    assert torch.equal(head, torch.cat(three)[: len(head)])  # the same stream, never drained
    with pytest.raises(ValueError, match="epochs=0"):
        next(store.batches(50, epochs=0, hook="norm"))


def test_a_shuffled_read_mixes_the_shards_from_its_first_batch(store: ActivationStore) -> None:
    """Pieces of every shard in a random order fill the buffer: its first batch is not one shard's images,
    in extraction order (whole shards in a random order trained one pass of real tokens to an FVU 15 %
    worse than a full reshuffle)."""
    shard_of = {
        row.numpy().tobytes(): i for i in range(store.n_shards) for row in store.shard_acts("norm", i)
    }
    for seed in range(5):
        batches = store.batches(100, hook="norm", seed=seed, buffer_tokens=300, dtype=None, piece_tokens=50)
        first = next(batches)
        assert len({shard_of[row.numpy().tobytes()] for row in first}) >= 2
    every = torch.cat(
        list(store.batches(50, hook="norm", seed=3, buffer_tokens=300, piece_tokens=50, dtype=None))
    )
    assert sorted(r.numpy().tobytes() for r in every) == sorted(shard_of)  # each token once per pass
    with pytest.raises(ValueError, match="piece_tokens=0"):
        next(store.batches(50, hook="norm", piece_tokens=0))


def test_trainer_reads_the_store_as_one_endless_stream(store: ActivationStore) -> None:
    source = StoreSource(store, hook="norm")
    full = list(itertools.islice(source.global_batches(64, seed=3, n_tokens=0), 60))  # > 3 passes
    assert all(b.shape == (64, store.dim("norm")) for b in full)
    resumed = list(itertools.islice(source.global_batches(64, seed=3, n_tokens=0, start=25), 35))
    assert torch.equal(torch.cat(resumed), torch.cat(full[25:]))  # a resumed run continues the stream
    rank1 = list(itertools.islice(source.global_batches(64, seed=3, n_tokens=0, start=1, stride=2), 10))
    assert torch.equal(torch.cat(rank1), torch.cat(full[1:21:2]))


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs CUDA (page-locked memory); CPU twin: test_passes_share_one_shuffle_buffer",
)
def test_pinned_batches_equal_pageable_ones_on_cuda(store: ActivationStore) -> None:
    pinned = list(store.batches(50, hook="norm", seed=1, buffer_tokens=300, pin_memory=True, dtype=None))
    plain = list(store.batches(50, hook="norm", seed=1, buffer_tokens=300, dtype=None))
    assert all(b.is_pinned() for b in pinned)  # filled in place, even across shard boundaries
    assert torch.equal(torch.cat(pinned), torch.cat(plain))


def test_staging_bytes_count_the_buffer_and_two_shards(store: ActivationStore) -> None:
    row = store.dim("norm") * 2  # fp16
    shard = 4 * TOKENS_PER_IMAGE  # the fixture's largest shard
    n = store.token_counts()["norm"]
    assert store.staging_bytes("norm", buffer_tokens=100) == (100 + 2 * shard) * row
    assert store.staging_bytes("norm") == (n + 2 * shard) * row  # the buffer never exceeds the store
    with pytest.raises(ValueError, match="several hooks"):
        store.staging_bytes()


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs CUDA; CPU twin: test_trainer_reads_the_store_as_one_endless_stream",
)
def test_gpu_shuffle_buffer_shuffles_exactly_as_the_host(store: ActivationStore) -> None:
    kwargs = dict(
        hooks=["blocks.5", "norm"], seed=1, buffer_tokens=300, epochs=None, dtype=None, piece_tokens=64
    )
    n = 3 * store.token_counts()["norm"] // 50  # three passes
    host = list(itertools.islice(store.batches(50, **kwargs), n))
    gpu = list(itertools.islice(store.batches(50, device="cuda", **kwargs), n))
    assert all(b[h].is_cuda for b in gpu for h in b)
    assert all(torch.equal(g[h].cpu(), c[h]) for g, c in zip(gpu, host, strict=True) for h in c)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs CUDA; CPU twin: test_staged_store_is_loaded_whole_when_it_fits",
)
def test_a_store_staged_whole_trains_as_its_tokens_in_memory(store: ActivationStore) -> None:
    import lightning as L

    from mmsae.trainer import SAEDataModule, SAEModule, SAESpec

    weights = []
    for data in (store.path, store.load("norm")):
        L.seed_everything(0)
        datamodule = SAEDataModule(data, hook="norm", tokens=40 * 64, batch_size=64)
        module = SAEModule([SAESpec(n_features=64, k=4)], warmup_steps=2, cuda_graphs=False)
        trainer = L.Trainer(
            max_epochs=1,
            accelerator="gpu",
            devices=1,
            precision="32-true",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, datamodule=datamodule)
        assert datamodule._staged is not None and datamodule._staged[1].on_gpu
        weights.append(module.saes[0].W_dec.detach().cpu())
    assert torch.equal(weights[0], weights[1])


def test_several_hooks_stay_aligned(store: ActivationStore, encoder: Encoder) -> None:
    # `norm` is the final LayerNorm applied to the output of `blocks.5`: aligned rows must satisfy it.
    layer_norm = encoder.model.get_submodule("norm")
    for batch in store.batches(64, hooks=["blocks.5", "norm"], seed=3, buffer_tokens=256):
        assert set(batch) == {"blocks.5", "norm"} and batch["norm"].dtype == torch.float32
        torch.testing.assert_close(layer_norm(batch["blocks.5"]), batch["norm"], atol=2e-2, rtol=1e-2)


def test_corrupt_shard_is_detected_and_named(store: ActivationStore) -> None:
    acts_path = shard_files(store.path, "norm", 1)[0]
    data = bytearray(acts_path.read_bytes())
    data[100] ^= 0xFF
    acts_path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"00001\.acts\.bin is corrupt.*Delete"):
        list(store.batches(64, hook="norm"))
    list(store.batches(64, hook="blocks.5"))  # other hooks are unaffected
    assert len(list(ActivationStore(store.path, verify=False).batches(64, hook="norm"))) > 0


def test_each_shard_is_checksummed_once_until_rewritten(
    store: ActivationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    crc32 = zlib.crc32
    monkeypatch.setattr("mmsae.store.reader.zlib.crc32", lambda buf: calls.append(1) or crc32(buf))
    for _ in range(2):  # two passes: only the first checks
        list(store.batches(64, hook="norm"))
    assert len(calls) == store.n_shards
    acts_path = shard_files(store.path, "norm", 0)[0]
    data = bytearray(acts_path.read_bytes())
    data[7] ^= 0xFF
    acts_path.write_bytes(bytes(data))
    os.utime(acts_path, ns=(1, 1))  # a new mtime even where the clock is coarse
    with pytest.raises(StoreError, match=r"00000\.acts\.bin is corrupt"):
        list(store.batches(64, hook="norm"))


def test_truncated_or_missing_shard_is_detected(store: ActivationStore) -> None:
    meta_path = shard_files(store.path, "blocks.5", 2)[1]
    meta_path.write_bytes(meta_path.read_bytes()[:-8])
    with pytest.raises(StoreError, match=r"00002\.meta\.bin has .* bytes, expected .*truncated"):
        store.meta("blocks.5")
    meta_path.unlink()
    with pytest.raises(StoreError, match="is missing"):
        store.meta("blocks.5")


def test_not_a_store_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not an activation store"):
        ActivationStore(tmp_path)


def test_token_acts_follow_store_order_with_metadata(store: ActivationStore) -> None:
    chunks = list(store.token_acts("norm", batch_size=100))
    acts = torch.cat([c.acts_ND for c in chunks])
    assert torch.equal(acts, torch.cat(list(store.batches(4096, hook="norm", shuffle=False))))
    meta = store.meta("norm")
    for column in ("example_id", "token_index"):
        assert np.array_equal(torch.cat([c.meta[column] for c in chunks]).numpy(), meta[column])


NEEDS_CUDA_TWIN_LOAD = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs CUDA; CPU twin: test_load_is_the_store_in_order_without_bad_rows",
)


def shards_with_nan_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every 5th row of shard 1 of each hook NaN, as an fp16 overflow during extraction leaves it."""
    original = ActivationStore.shard_acts

    def with_nan(self: ActivationStore, hook: str, shard: int) -> torch.Tensor:
        acts = original(self, hook, shard)
        if shard == 1:
            acts = acts.clone()
            acts[::5] = float("nan")
        return acts

    monkeypatch.setattr(ActivationStore, "shard_acts", with_nan)


def test_load_is_the_store_in_order_without_bad_rows(
    store: ActivationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmsae.staging import RowScreen

    shards = [store.shard_acts("norm", i) for i in range(store.n_shards)]
    ordered = torch.cat(list(store.batches(50, hook="norm", shuffle=False, dtype=None)))
    assert torch.equal(store.load("norm"), ordered) and torch.equal(ordered, torch.cat(shards))
    shards_with_nan_rows(monkeypatch)
    screen = RowScreen()
    loaded = store.load("norm", screen=screen)
    kept = torch.ones(len(shards[1]), dtype=torch.bool)
    kept[::5] = False
    assert screen.dropped == int((~kept).sum()) > 0
    assert torch.equal(loaded, torch.cat([shards[0], shards[1][kept], *shards[2:]]))
    with pytest.raises(KeyError, match="not available"):
        store.load("nope")


@pytest.mark.gpu
@NEEDS_CUDA_TWIN_LOAD
def test_load_onto_a_gpu_equals_the_host_load(
    store: ActivationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmsae.staging import RowScreen

    shards_with_nan_rows(monkeypatch)
    host, gpu = RowScreen(), RowScreen()
    on_host, on_gpu = store.load("norm", screen=host), store.load("norm", "cuda", screen=gpu)
    assert on_gpu.is_cuda and torch.equal(on_gpu.cpu(), on_host) and gpu.dropped == host.dropped > 0


@pytest.mark.gpu
@NEEDS_CUDA_TWIN_LOAD
def test_a_gpu_buffer_fed_pieces_drops_and_counts_every_bad_row(
    store: ActivationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmsae.staging import RowScreen

    shards_with_nan_rows(monkeypatch)
    bad = len(range(0, store.shard_acts("norm", 1).shape[0], 5))
    screen = RowScreen()
    kwargs = dict(hook="norm", seed=1, buffer_tokens=300, dtype=None, piece_tokens=64)
    rows = torch.cat(list(store.batches(50, device="cuda", screen=screen, **kwargs)))
    assert screen.dropped == bad and len(rows) == store.token_counts()["norm"] - bad
    assert torch.isfinite(rows).all()


def test_staged_store_is_loaded_whole_when_it_fits(
    store: ActivationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store that fits in the staging budget trains as its tokens loaded into an array (a full reshuffle
    every pass, as from memory); one whose shuffle buffer alone fits streams through it on the GPU."""
    from mmsae.staging import RowScreen
    from mmsae.trainer.sources import ArraySource, StagedStoreSource

    source, screen = StoreSource(store, "norm"), RowScreen()
    whole = store.load_bytes("norm")
    assert whole == store.store_bytes("norm") + store.staging_bytes("norm", buffer_tokens=0)
    assert store.store_bytes("norm") == store.token_counts()["norm"] * store.dim("norm") * 2  # fp16
    cpu = torch.device("cpu")  # what is staged, and how, is the same for every device
    assert source.stage(cpu, whole - 1, screen) is source  # nothing fits: read on the host
    staged = source.stage(cpu, whole, screen)
    assert isinstance(staged, StagedStoreSource) and staged.on_gpu
    assert staged.provenance() == store.provenance("norm") == source.provenance()
    array = ArraySource(store.load("norm"))
    for a, b in zip(staged.global_batches(64, 3, 0), itertools.islice(array.global_batches(64, 3, 0), 40)):
        assert torch.equal(a, b)
    monkeypatch.setattr(ActivationStore, "load_bytes", lambda self, hook=None: 10**15)  # a huge store
    buffer = store.staging_bytes("norm")
    streamed = source.stage(cpu, buffer, screen)
    assert isinstance(streamed, StoreSource) and streamed.on_gpu and streamed.staging == (cpu, screen)
