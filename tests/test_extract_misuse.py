"""Extraction under misuse: duplicate runs, kills at the end, stale temp files, edited store.json, umask."""

from __future__ import annotations

import fcntl
import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import FailAt, file_tree
from PIL import Image

from mmsae.datasets.images import ImageFolder
from mmsae.encoders import Encoder, get_encoder
from mmsae.extract import extract
from mmsae.fileio import atomic_write, atomic_write_bytes
from mmsae.store import STORE_JSON, ActivationStore, StoreError

HOOKS = ["norm"]
N_IMAGES, TOKENS_PER_IMAGE = 12, 101  # timm test_vit: 100 patches + CLS
LAYOUT = {"batch_size": 2, "shard_tokens": 4 * TOKENS_PER_IMAGE}  # 2 forwards per shard → 3 shards


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return get_encoder("timm:test_vit")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> ImageFolder:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
    return ImageFolder(root)


@pytest.fixture(scope="module")
def reference(
    encoder: Encoder, folder: ImageFolder, tmp_path_factory: pytest.TempPathFactory
) -> ActivationStore:
    return extract(encoder, folder, HOOKS, tmp_path_factory.mktemp("ref"), progress=False, **LAYOUT)


def _crash(encoder: Encoder, folder: ImageFolder, out: Path, index: int) -> Path:
    """A partial store: the extraction fails reading example `index` (shard 2 of 3 at index 9)."""
    with pytest.raises(RuntimeError, match="injected crash"):
        extract(encoder, FailAt(folder, index), HOOKS, out, progress=False, **LAYOUT)
    (partial,) = out.iterdir()
    return partial


def test_duplicate_extraction_says_at_once_that_one_is_running(
    encoder: Encoder, folder: ImageFolder, reference: ActivationStore, tmp_path: Path
) -> None:
    partial = _crash(encoder, folder, tmp_path, index=9)
    # Another process extracting into the same store as rank 0 holds this lock for as long as it runs.
    lock = partial / ".done" / "rank-0.lock"
    lock.parent.mkdir(exist_ok=True)
    with open(lock, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242")
        held.flush()
        start = time.monotonic()
        with pytest.raises(StoreError, match=r"Another process \(pid 4242\) is extracting into .* rank 0"):
            extract(encoder, folder, HOOKS, tmp_path, progress=False, **LAYOUT)
        assert time.monotonic() - start < 10
    # Once it has ended (a killed one releases the lock too), the same call resumes and finishes the store.
    assert file_tree(extract(encoder, folder, HOOKS, tmp_path, progress=False, **LAYOUT).path) == file_tree(
        reference.path
    )


def test_kill_between_merge_and_cleanup_leaves_no_residue(
    encoder: Encoder,
    folder: ImageFolder,
    reference: ActivationStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def killed(root: Path) -> None:
        raise KeyboardInterrupt  # store.json is complete, .done/ not yet removed

    monkeypatch.setattr("mmsae.store.ranks.remove_residue", killed)
    with pytest.raises(KeyboardInterrupt):
        extract(encoder, folder, HOOKS, tmp_path, progress=False, **LAYOUT)
    monkeypatch.undo()
    (store,) = tmp_path.iterdir()
    assert json.loads((store / STORE_JSON).read_text())["complete"] and (store / ".done").is_dir()
    again = extract(encoder, folder, HOOKS, tmp_path, progress=False, **LAYOUT)
    assert not (store / ".done").exists()
    assert file_tree(again.path) == file_tree(reference.path)


def test_stale_temp_files_are_removed_when_the_extraction_is_opened_again(
    encoder: Encoder, folder: ImageFolder, tmp_path: Path
) -> None:
    partial = _crash(encoder, folder, tmp_path, index=9)
    # What killed writers leave: a half-written shard file, a half-written record, a half-written store.json.
    stale = [
        partial / "norm" / ".00002.acts.bin.k1ll3d.tmp",
        partial / ".done" / ".00002.json.k1ll3d.tmp",
        partial / ".store.json.k1ll3d.tmp",
    ]
    for p in stale:
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"partial")
    # The next run is killed again before the end: the stale files must be gone already.
    _crash(encoder, folder, tmp_path, index=10)
    assert [p for p in stale if p.exists()] == []


@pytest.fixture
def store_copy(reference: ActivationStore, tmp_path: Path) -> Path:
    copy = tmp_path / "store"
    for name, data in file_tree(reference.path).items():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes(data)
    return copy


def _edit(store: Path, edit: object) -> None:
    info = json.loads((store / STORE_JSON).read_text())
    edit(info)  # type: ignore[operator]
    (store / STORE_JSON).write_text(json.dumps(info))


def test_store_json_without_hooks_is_a_clear_error(store_copy: Path) -> None:
    _edit(store_copy, lambda info: info.pop("hooks"))
    with pytest.raises(StoreError, match=r"store\.json has no 'hooks' field: it was edited or damaged"):
        ActivationStore(store_copy)


def test_size_mismatch_from_an_edited_store_json_names_store_json(store_copy: Path) -> None:
    _edit(store_copy, lambda info: info["shards"][1]["hooks"]["norm"].update(n_tokens=3))
    store = ActivationStore(store_copy)
    with pytest.raises(
        StoreError, match=r"store\.json does not match its shard files: .*00001\.acts\.bin is intact"
    ):
        store.shard_acts("norm", 1)
    # A shard that really was truncated is still blamed itself.
    acts = store_copy / "norm" / "00002.acts.bin"
    acts.write_bytes(acts.read_bytes()[:-2])
    with pytest.raises(StoreError, match=r"Shard file .*00002\.acts\.bin has .* bytes.*truncated"):
        store.shard_acts("norm", 2)


@pytest.fixture
def umask_027() -> Iterator[None]:
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_written_files_honour_the_umask(
    encoder: Encoder, folder: ImageFolder, tmp_path: Path, umask_027: None
) -> None:
    # mkstemp alone gives 0600: a group sharing the directory could not read stores or SAE configs.
    store = extract(encoder, folder, HOOKS, tmp_path / "acts", progress=False, **LAYOUT)
    atomic_write_bytes(tmp_path / "cfg.json", b"{}")
    atomic_write(tmp_path / "sae.safetensors", lambda tmp: tmp.write_bytes(b"weights"))  # writers with a path
    files = [p for p in store.path.rglob("*") if p.is_file()] + [
        tmp_path / "cfg.json",
        tmp_path / "sae.safetensors",
    ]
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {oct(0o640)}
