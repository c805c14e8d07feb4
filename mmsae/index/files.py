"""A saved concept index on disk: written atomically as a whole, read file by file.

A damaged or inconsistent file is named, with the fix: every reader raises `IndexFileError` (a
ValueError) naming the file, what is wrong with it and how to recover, instead of a bare
JSONDecodeError, FAISS's C++ message or an IndexError at query time.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from mmsae.analysis.naming import NameCandidate
from mmsae.checkpoint import save_sae
from mmsae.fileio import atomic_write_bytes
from mmsae.index.ann import set_search_params
from mmsae.index.codes import SparseCodeStore
from mmsae.index.config import config_from_dict
from mmsae.legacy_names import legacy_keys
from mmsae.sae import SAE

FORMAT_VERSION = 1
FILES = ("meta.json", "paths.json", "features.json", "embeddings.npy", "codes.npz", "faiss.index")
REBUILD = "Rebuild the index (`mmsae index build` or ConceptIndex.build(...).save(path)) or restore the file."
# meta.json keys the loader needs and their types.
META_KEYS: dict[str, type | tuple[type, ...]] = {
    "encoder": str,
    "embedder": str,
    "hook": str,
    "d_in": int,
    "n_features": int,
    "config": dict,
}
T = TypeVar("T")


class IndexFileError(ValueError):
    """A file of a saved concept index is damaged or disagrees with the others."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"{path}: {problem}. {REBUILD}")
        self.path = path


def write_index(
    path: Path,
    meta: dict[str, Any],
    *,
    paths: list[str],
    names: list[list[NameCandidate]],
    embeddings_NE: np.ndarray,
    codes: SparseCodeStore,
    ann: Any,
    sae: SAE,
) -> Path:
    """Write an index to directory `path`, atomically: readers see the old or the new index, whole."""
    import faiss

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        atomic_write_bytes(tmp / "meta.json", json.dumps(meta, indent=2).encode())
        atomic_write_bytes(tmp / "paths.json", json.dumps(paths).encode())
        atomic_write_bytes(
            tmp / "features.json",
            json.dumps([[asdict(c) for c in cands] for cands in names]).encode(),
        )
        np.save(tmp / "embeddings.npy", embeddings_NE)
        codes.save(tmp / "codes.npz")
        faiss.write_index(ann, str(tmp / "faiss.index"))
        save_sae(sae, tmp / "sae")
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
            os.replace(path, old / "index")
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def require_index_dir(path: Path) -> None:
    """A directory holding every file of an index, else a FileNotFoundError saying how to make one."""
    missing = [f for f in FILES if not (path / f).is_file()]
    if not path.is_dir() or missing:
        raise FileNotFoundError(
            f"No concept index at {path} (missing {', '.join(missing) or 'directory'}): "
            "build one first with ConceptIndex.build(...).save(path) or `mmsae index build`."
        )


def read_json(path: Path, expect: type) -> Any:
    """The JSON value of `path`, which must be of type `expect` (dict or list)."""
    try:
        value = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexFileError(path, f"not valid JSON ({e})") from e
    if not isinstance(value, expect):
        raise IndexFileError(path, f"holds a JSON {type(value).__name__}, expected a {expect.__name__}")
    return value


def read_meta(path: Path) -> dict[str, Any]:
    """meta.json with its format version and the keys the loader needs checked."""
    meta_path = path / "meta.json"
    meta = legacy_keys(read_json(meta_path, dict))  # indexes of earlier versions: old key names
    if meta.get("format_version") != FORMAT_VERSION:
        raise IndexFileError(
            meta_path, f"index format {meta.get('format_version')!r}, this mmsae reads {FORMAT_VERSION}"
        )
    for key, kind in META_KEYS.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            name = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            got = "missing" if key not in meta else f"{meta[key]!r}"
            raise IndexFileError(meta_path, f"{key!r} must be a {name}, got {got}")
    return meta


def read_paths(path: Path) -> list[str]:
    paths_path = path / "paths.json"
    paths = read_json(paths_path, list)
    bad = next((i for i, p in enumerate(paths) if not isinstance(p, str)), None)
    if bad is not None:
        raise IndexFileError(paths_path, f"entry {bad} is {paths[bad]!r}, not a path string")
    return paths


def read_file(path: Path, what: str, reader: Callable[[Path], T]) -> T:
    """`reader(path)`, with any decoding failure turned into an error naming the file."""
    try:
        return reader(path)
    except (ValueError, OSError, EOFError, KeyError, RuntimeError, TypeError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise IndexFileError(path, f"not a readable {what} ({first_line[:200]})") from e


def read_faiss(path: Path) -> Any:
    """The FAISS index in `path` (faiss raises a RuntimeError quoting C++ source for damaged files)."""
    import faiss

    return read_file(path, "FAISS index", lambda p: faiss.read_index(str(p)))


def check_counts(path: Path, counts: dict[str, int], n_features: int, n_names: int) -> None:
    """Every per-image file must hold one entry per image, features.json one per feature."""
    if len(set(counts.values())) > 1:
        listing = ", ".join(f"{f}: {n}" for f, n in counts.items())
        raise IndexFileError(path, f"its files disagree on the number of images ({listing})")
    if n_names != n_features:
        raise IndexFileError(
            path / "features.json", f"{n_names} name lists for an SAE of {n_features} features"
        )


def read_parts(path: Path, meta: dict[str, Any], n_features: int, mmap: bool) -> dict[str, Any]:
    """Everything of a saved index but its meta and SAE, checked for agreement on the image count."""
    embeddings_NE = read_file(
        path / "embeddings.npy", "NumPy array", lambda p: np.load(p, mmap_mode="r" if mmap else None)
    )
    check_embeddings(path, embeddings_NE)
    ann = read_faiss(path / "faiss.index")
    cfg = read_file(path / "meta.json", "index configuration", lambda _: config_from_dict(meta["config"]))
    set_search_params(ann, cfg.ann)
    names = read_file(
        path / "features.json",
        "feature-name list",
        lambda p: [[NameCandidate(**c) for c in cands] for cands in read_json(p, list)],
    )
    paths = read_paths(path)
    codes = read_file(path / "codes.npz", "sparse-code file", SparseCodeStore.load)
    counts = {"paths.json": len(paths), "embeddings.npy": len(embeddings_NE), "codes.npz": len(codes)}
    check_counts(path, {**counts, "faiss.index": int(ann.ntotal)}, n_features, len(names))
    return {"paths": paths, "embeddings_NE": embeddings_NE, "codes": codes, "ann": ann, "names": names}


def check_embeddings(path: Path, embeddings_NE: np.ndarray) -> None:
    if embeddings_NE.ndim != 2 or embeddings_NE.dtype != np.float32:
        raise IndexFileError(
            path / "embeddings.npy",
            f"expected float32 [images, dim], got {embeddings_NE.dtype} {embeddings_NE.shape}",
        )


__all__ = [
    "FILES",
    "FORMAT_VERSION",
    "IndexFileError",
    "check_counts",
    "check_embeddings",
    "read_faiss",
    "read_file",
    "read_json",
    "read_meta",
    "read_parts",
    "read_paths",
    "require_index_dir",
    "write_index",
]
