"""Atomic file writes, the lowest layer: the store, SAE files, indexes and reports all write through here."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename: readers never see half a file."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` a temp file beside `path`, fsync it and rename it over `path`; a failure leaves `path`
    as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
