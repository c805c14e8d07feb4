"""The store's on-disk format: directory layout, store.json, per-shard records and content hashing.

Layout of a store directory (named by a hash of the extraction config, see `config_hash`):

    store.json                    format, config + hash, layout, per-hook width and meta columns, shards
    <hook>/<shard:05d>.acts.bin   raw C-order [n_tokens, d] array in the store dtype
    <hook>/<shard:05d>.meta.bin   raw C-order [n_tokens, n_meta] int64 (example_id, token_index, ...)
    .done/<shard:05d>.json        while extracting: the record of each finished shard
    .done/rank-<r>.lock           while extracting: held (flock) by the process extracting as rank r

Shard files are written under a temporary name and renamed when complete; only then is the shard's record
(token count and crc32 of each file) written to .done/, so every recorded shard is whole. Each shard has
its own record file so that several extraction processes never overwrite each other's progress; when
all shards are done, one process merges the records into store.json and deletes .done/. Raw files plus a
JSON header (rather than .npy) let the writer stream a shard whose final length is not known up front.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmsae.encoders.base import Encoder, TokenActs
from mmsae.fileio import TMP_SUFFIX, atomic_write_bytes

FORMAT = "mmsae-activations/1"
STORE_JSON = "store.json"
DONE_DIR = ".done"  # a dot name: no hook (a module path) can clash with it
DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
DEFAULT_BUFFER_TOKENS = 1 << 18
DEFAULT_SHARD_TOKENS = 1 << 18
DEFAULT_PIECE_TOKENS = 1 << 14
"""A shuffled read takes a store in pieces of this many consecutive tokens, in a random order over every
shard: whole shards in a random order filled the shuffle buffer with the images of a few shards at a time."""
_INFO_KEYS = ("config", "config_hash", "hooks", "shards")


class StoreError(RuntimeError):
    """A store on disk is incomplete, corrupt or does not match what was asked of it."""


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"Unsupported store dtype {dtype!r}; use one of {sorted(DTYPES)}.")


def hook_dir(root: Path, hook: str) -> Path:
    return root / hook.replace(os.sep, "_")


def shard_files(root: Path, hook: str, shard: int) -> tuple[Path, Path]:
    """(acts file, meta file) of one shard of one hook."""
    base = hook_dir(root, hook)
    return base / f"{shard:05d}.acts.bin", base / f"{shard:05d}.meta.bin"


def read_info(root: Path) -> dict[str, Any]:
    path = root / STORE_JSON
    if not path.is_file():
        raise FileNotFoundError(
            f"{root} is not an activation store (no {STORE_JSON}); create one with "
            "mmsae.extract(...) or `mmsae extract --config ...`."
        )
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise StoreError(
            f"{path} is not valid JSON ({e}); delete the store directory and extract again."
        ) from e
    if info.get("format") != FORMAT:
        raise StoreError(f"{path} has format {info.get('format')!r}, expected {FORMAT!r}: extract it again.")
    check_info(path, info)
    return info


def check_info(path: Path, info: dict[str, Any]) -> None:
    """Clear errors for an edited or damaged store.json (where the reader would raise a bare KeyError)."""
    fix = "Restore the file, or delete the store directory and run the same extraction again."
    missing = [k for k in _INFO_KEYS if k not in info]
    if missing:
        raise StoreError(
            f"{path} has no {', '.join(map(repr, missing))} field: it was edited or damaged. {fix}"
        )
    if not isinstance(info["hooks"], dict) or not info["hooks"]:
        raise StoreError(f"{path}: 'hooks' must map each hook to its width and meta columns. {fix}")
    for hook, h in info["hooks"].items():
        if (
            not isinstance(h, dict)
            or not isinstance(h.get("d"), int)
            or not isinstance(h.get("meta_columns"), list)
        ):
            raise StoreError(f"{path}: hooks[{hook!r}] needs an integer 'd' and a list 'meta_columns'. {fix}")
    if not isinstance(info["config"], dict) or info["config"].get("dtype") not in DTYPES:
        raise StoreError(f"{path}: config.dtype must be one of {sorted(DTYPES)}. {fix}")
    if not isinstance(info["shards"], list):
        raise StoreError(f"{path}: 'shards' must be a list of shard records. {fix}")


def write_info(root: Path, info: dict[str, Any]) -> None:
    # Deterministic bytes (sorted keys, no timestamps): a resumed store is byte-identical to a fresh one.
    atomic_write_bytes(root / STORE_JSON, json.dumps(info, indent=1, sort_keys=True).encode())


def record_file(root: Path, shard: int) -> Path:
    return root / DONE_DIR / f"{shard:05d}.json"


def write_record(root: Path, shard: int, record: dict[str, Any]) -> None:
    atomic_write_bytes(record_file(root, shard), json.dumps(record, sort_keys=True).encode())


def shard_record(root: Path, info: dict[str, Any], shard: int) -> dict[str, Any] | None:
    """A shard's record: its .done/ file while extracting (it may redo a shard), else store.json's."""
    try:
        return json.loads(record_file(root, shard).read_text())
    except FileNotFoundError:
        return info["shards"][shard]


def n_recorded(root: Path, info: dict[str, Any]) -> int:
    """How many shards have a record (finished, unless its files were deleted since)."""
    return sum(shard_record(root, info, s) is not None for s in range(len(info["shards"])))


def shard_done(root: Path, info: dict[str, Any], shard: int) -> bool:
    """Recorded and its files present with the recorded sizes (a deleted shard is recomputed)."""
    rec = shard_record(root, info, shard)
    if rec is None:
        return False
    itemsize = DTYPES[info["config"]["dtype"]].itemsize
    for hook, h in info["hooks"].items():
        n = rec["hooks"][hook]["n_tokens"]
        acts, meta = shard_files(root, hook, shard)
        sizes = (n * h["d"] * itemsize, n * len(h["meta_columns"]) * 8)
        if not (acts.is_file() and meta.is_file() and (acts.stat().st_size, meta.stat().st_size) == sizes):
            return False
    return True


def remove_stale_temps(
    root: Path, owns: Callable[[int], bool] = lambda shard: True, info: bool = True
) -> int:
    """Delete temp files that killed writers left behind: those of the shards `owns` accepts (shard files
    and records), and with `info` those of store.json. Returns how many.

    Only the process extracting a shard writes its temp files, so a process may delete those of the shards
    it owns whatever the others are doing."""
    stale = []
    for p in root.rglob(f".*{TMP_SUFFIX}"):
        shard = p.name[1:6]  # .<shard:05d>.acts.bin.<random>.tmp, .<shard:05d>.json.<random>.tmp
        if p.is_file() and (owns(int(shard)) if shard.isdigit() else info and p.parent == root):
            stale.append(p)
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def remove_residue(root: Path) -> None:
    """Of a complete store: what a process killed while finishing it left (.done/, temp files)."""
    shutil.rmtree(root / DONE_DIR, ignore_errors=True)
    remove_stale_temps(root)


def per_token_meta(ta: TokenActs) -> dict[str, Tensor]:
    """The metadata columns with one value per token (the store keeps these; others go to hooks.extra)."""
    n = ta.acts_ND.shape[0]
    return {k: v for k, v in ta.meta.items() if v.ndim == 1 and v.shape[0] == n}


# ------------------------------------------------------------------------------------------ hashing
def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def weights_fingerprint(encoder: Encoder, n_samples: int = 64) -> str:
    """Hash of every tensor's name, shape, dtype and a strided sample of its values.

    Two random-init encoders with the same id must not share a store; hashing all weights of a 7B model
    would take minutes, a sample takes milliseconds.
    """
    digest = hashlib.sha256()
    for name, t in [*encoder.model.named_parameters(), *encoder.model.named_buffers()]:
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // n_samples)][:n_samples].float().cpu().numpy()
        digest.update(f"{name}{tuple(t.shape)}{t.dtype}".encode() + sample.tobytes())
    return digest.hexdigest()
