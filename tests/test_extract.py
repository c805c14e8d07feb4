"""Extraction: round trip, resume after a crash (byte-identical), disk full, bad input, streaming, CLI."""

from __future__ import annotations

import copy
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FailAt, file_tree
from PIL import Image

from mmsae.datasets.images import ImageFolder
from mmsae.encoders import Encoder, get_encoder
from mmsae.extract import extract
from mmsae.extract_cli import cli_main
from mmsae.store import ActivationStore, ActivationStream, StoreError, shard_files

N_IMAGES, TOKENS_PER_IMAGE = 12, 101  # timm test_vit: 100 patches + CLS
LAYOUT = {"batch_size": 2, "shard_tokens": 4 * TOKENS_PER_IMAGE}  # 2 forwards per shard → 3 shards


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    torch.manual_seed(0)  # the crash test's subprocess builds the same weights the same way
    return get_encoder("timm:test_vit")


def _write_images(root: Path, n: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> ImageFolder:
    return ImageFolder(_write_images(tmp_path_factory.mktemp("images"), N_IMAGES))


def test_round_trip_equals_encoder_activations(encoder: Encoder, folder: ImageFolder, tmp_path: Path) -> None:
    store = extract(
        encoder, folder, ["blocks.2", "norm"], tmp_path, dtype="float32", progress=False, **LAYOUT
    )
    assert store.path.parent == tmp_path and store.path.name.startswith("timm-test_vit-")
    pixels = torch.stack([encoder.transform(folder[i].image) for i in range(N_IMAGES)])
    expected = encoder.activations(pixels, ["blocks.2", "norm"])
    for hook in ("blocks.2", "norm"):
        got = torch.cat(list(store.batches(1000, hook=hook, shuffle=False)))
        torch.testing.assert_close(got, expected[hook].acts_ND, atol=1e-5, rtol=1e-5)
        for col, values in store.meta(hook).items():
            assert np.array_equal(values, expected[hook].meta[col].numpy())
    half = extract(encoder, folder, "blocks.2", tmp_path, tokens="cls", progress=False, **LAYOUT)
    assert half.path != store.path and half.n_tokens == N_IMAGES and half.dtype == "float16"
    cls = torch.cat(list(half.batches(100, shuffle=False)))
    torch.testing.assert_close(cls, expected["blocks.2"].acts_ND[::TOKENS_PER_IMAGE].half().float())
    bf16 = extract(encoder, folder, "norm", tmp_path, dtype="bfloat16", progress=False, **LAYOUT)
    torch.testing.assert_close(
        torch.cat(list(bf16.batches(1000, shuffle=False, dtype=torch.bfloat16))),
        expected["norm"].acts_ND.bfloat16(),
        atol=0,
        rtol=0,
    )
    # Same configuration again: a cache hit, nothing recomputed.
    assert extract(encoder, folder, "blocks.2", tmp_path, tokens="cls", progress=False).path == half.path


def test_resume_after_crash_is_byte_identical(encoder: Encoder, folder: ImageFolder, tmp_path: Path) -> None:
    fresh = extract(encoder, folder, ["blocks.2", "norm"], tmp_path / "fresh", progress=False, **LAYOUT)
    with pytest.raises(RuntimeError, match="injected crash"):
        extract(
            encoder,
            FailAt(folder, index=9),
            ["blocks.2", "norm"],
            tmp_path / "crashed",
            progress=False,
            **LAYOUT,
        )
    (partial,) = (tmp_path / "crashed").iterdir()
    with pytest.raises(StoreError, match=r"incomplete \(2/3 shards\).*resume"):
        ActivationStore(partial)
    assert not list(partial.rglob("*.tmp"))  # the unfinished shard left nothing behind
    resumed = extract(encoder, folder, ["blocks.2", "norm"], tmp_path / "crashed", progress=False, **LAYOUT)
    assert file_tree(resumed.path) == file_tree(fresh.path)


def test_resume_after_hard_kill_is_byte_identical(
    encoder: Encoder, folder: ImageFolder, tmp_path: Path
) -> None:
    # os._exit mid-run: no finally blocks, the writer thread dies wherever it is.
    script = textwrap.dedent(f"""
        import os, torch
        from mmsae.datasets.images import ImageFolder
        from mmsae.encoders import get_encoder
        from mmsae.extract import extract

        class Die(ImageFolder):
            def __getitem__(self, index):
                if index == 7:
                    os._exit(17)
                return super().__getitem__(index)

        torch.set_num_threads(1)
        torch.manual_seed(0)
        extract(get_encoder("timm:test_vit"), Die({str(folder.root)!r}), "norm", {str(tmp_path / "killed")!r},
                progress=False, **{LAYOUT!r})
    """)
    assert subprocess.run([sys.executable, "-c", script], timeout=120).returncode == 17
    (partial,) = (tmp_path / "killed").iterdir()
    with pytest.raises(StoreError, match=r"incomplete \([01]/3 shards\)"):
        ActivationStore(partial)
    resumed = extract(encoder, folder, "norm", tmp_path / "killed", progress=False, **LAYOUT)
    fresh = extract(encoder, folder, "norm", tmp_path / "fresh", progress=False, **LAYOUT)
    assert file_tree(resumed.path) == file_tree(fresh.path)


def test_disk_full_mid_shard_keeps_nothing_half_written(
    encoder: Encoder, folder: ImageFolder, tmp_path: Path
) -> None:
    # A real OS write failure: a file-size limit makes write() fail with EFBIG once a shard file
    # outgrows 30 kB (a shard holds 4 × 101 × 64 fp16 values = 52 kB).
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, hard))
    try:
        with pytest.raises(OSError, match=r"Out of disk space.*partial shard was deleted.*resume"):
            extract(encoder, folder, "norm", tmp_path / "full", progress=False, **LAYOUT)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    (root,) = (tmp_path / "full").iterdir()
    assert [p.name for p in root.rglob("*") if p.is_file()] == ["store.json"]  # no partial shard, no temps
    resumed = extract(encoder, folder, "norm", tmp_path / "full", progress=False, **LAYOUT)
    fresh = extract(encoder, folder, "norm", tmp_path / "fresh", progress=False, **LAYOUT)
    assert file_tree(resumed.path) == file_tree(fresh.path)


def test_deleted_shard_is_recomputed(encoder: Encoder, folder: ImageFolder, tmp_path: Path) -> None:
    store = extract(encoder, folder, "norm", tmp_path, progress=False, **LAYOUT)
    before = file_tree(store.path)
    shard_files(store.path, "norm", 1)[0].unlink()  # what the corrupt-shard error tells users to do
    assert file_tree(extract(encoder, folder, "norm", tmp_path, progress=False, **LAYOUT).path) == before


def test_resuming_with_a_different_config_is_a_clear_error(
    encoder: Encoder, folder: ImageFolder, tmp_path: Path
) -> None:
    store = extract(encoder, folder, "norm", tmp_path, progress=False, **LAYOUT)
    with pytest.raises(StoreError, match=r"different configuration.*differs in: hooks, tokens"):
        extract(encoder, folder, "blocks.1", store.path, tokens="patch", progress=False, **LAYOUT)
    other = get_encoder("timm:test_vit", init_seed=1)  # same id, other random weights: no reuse
    with pytest.raises(StoreError, match="differs in: weights"):
        extract(other, folder, "norm", store.path, progress=False, **LAYOUT)


def test_unreadable_images_are_skipped_and_counted(encoder: Encoder, tmp_path: Path) -> None:
    root = _write_images(tmp_path / "imgs", 6)
    (root / "02.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match=r"Skipped 1 unreadable examples.*02\.png"):
        store = extract(encoder, ImageFolder(root), "norm", tmp_path / "out", progress=False, **LAYOUT)
    assert [s["index"] for s in store.skipped] == [2] and "02.png" in store.skipped[0]["source"]
    assert store.n_tokens == 5 * TOKENS_PER_IMAGE
    assert sorted(set(store.meta()["example_id"].tolist())) == [0, 1, 3, 4, 5]


def test_bad_input(encoder: Encoder, folder: ImageFolder, tmp_path: Path) -> None:
    class Empty(FailAt):
        def __len__(self) -> int:
            return 0

    with pytest.raises(ValueError, match="is empty"):
        extract(encoder, Empty(folder, -1), "norm", tmp_path)
    with pytest.raises(KeyError, match=r"Unknown hook point 'blocks\.99'"):
        extract(encoder, folder, "blocks.99", tmp_path)
    with pytest.raises(ValueError, match="Unsupported store dtype"):
        extract(encoder, folder, "norm", tmp_path, dtype="int8")
    root = _write_images(tmp_path / "broken", 2)
    for p in root.iterdir():
        p.write_bytes(b"junk")
    with pytest.raises(ValueError, match="None of the 2 examples"):
        extract(encoder, ImageFolder(root), "norm", tmp_path / "out")


def test_streaming_matches_the_store(encoder: Encoder, folder: ImageFolder, tmp_path: Path) -> None:
    store = extract(
        encoder, folder, ["blocks.2", "norm"], tmp_path, dtype="float32", progress=False, **LAYOUT
    )
    stream = ActivationStream(encoder, folder, ["blocks.2", "norm"], batch_size=5)
    assert stream.d_in == store.d_in == 64
    for hook in ("blocks.2", "norm"):
        torch.testing.assert_close(
            torch.cat(list(stream.batches(77, hook=hook, shuffle=False))),
            torch.cat(list(store.batches(77, hook=hook, shuffle=False))),
            atol=1e-5,
            rtol=1e-5,
        )
    shuffled = list(stream.batches(64, hooks=["norm"], seed=1, buffer_tokens=300))
    assert sum(len(b["norm"]) for b in shuffled) == N_IMAGES * TOKENS_PER_IMAGE


def test_cli_extracts_from_a_config_file(
    folder: ImageFolder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "extract.yaml"
    cfg.write_text(
        f"extract:\n  encoder: timm:test_vit\n  dataset: folder:{folder.root}\n"
        f"  out_dir: {tmp_path / 'acts'}\n  hooks: [norm]\n  tokens: '0'\n  device: cpu\n"
    )
    assert cli_main(["--config", str(cfg), "--batch_size", "4"]) == 0
    path = Path(capsys.readouterr().out.splitlines()[0])
    store = ActivationStore(path)
    assert store.n_tokens == N_IMAGES and store.info["config"]["tokens"] == 0
    cfg.write_text("encoder: timm:test_vit\nlayers: 3\n")
    assert cli_main(["--config", str(cfg)]) == 1
    assert "Unknown keys ['layers']" in capsys.readouterr().err


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA; CPU twin: test_round_trip_equals_encoder_activations"
)
def test_cuda_extraction_with_async_copies_matches_cpu(
    encoder: Encoder, folder: ImageFolder, tmp_path: Path
) -> None:
    cpu, cuda = encoder, copy.deepcopy(encoder).to("cuda")
    on_cpu = extract(cpu, folder, "norm", tmp_path / "cpu", dtype="float32", progress=False, **LAYOUT)
    on_gpu = extract(
        cuda, folder, "norm", tmp_path / "gpu", dtype="float32", num_workers=2, progress=False, **LAYOUT
    )
    torch.testing.assert_close(
        torch.cat(list(on_gpu.batches(500, shuffle=False))),
        torch.cat(list(on_cpu.batches(500, shuffle=False))),
        atol=1e-3,
        rtol=1e-3,
    )
    assert np.array_equal(on_gpu.meta()["example_id"], on_cpu.meta()["example_id"])
