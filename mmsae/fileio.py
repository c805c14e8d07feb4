"""Atomic file writes shared by every part of mmsae that writes files (stores, SAEs, indexes, reports).

A file is written under a temporary name in its final directory, flushed to disk, then renamed into place:
readers never see half a file, and a killed writer leaves at most a `.<name>.*.tmp` file behind. Temporary
files get the mode a plain `open()` would give (0666 less the umask), not mkstemp's private 0600, so a
store or SAE written into a shared group directory is readable by the group.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

TMP_SUFFIX = ".tmp"


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (os.umask alone must set it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc: the only portable way to read it is to set it and restore it
    os.umask(mask)
    return mask


def create_temp(final: Path) -> tuple[int, Path]:
    """An open file descriptor and path for a temporary sibling of `final`, with the umask's mode."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=TMP_SUFFIX)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    except BaseException:
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
    return fd, Path(tmp)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Have `write(tmp)` write the file at a temporary path, then fsync and rename it to `path`."""
    path = Path(path)
    fd, tmp = create_temp(path)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # writers such as safetensors recreate the file as 0600
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file in the same directory, fsync, rename)."""
    path = Path(path)
    fd, tmp = create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_temps(root: Path) -> int:
    """Delete the temporary files killed writers left under `root`; returns how many."""
    stale = [p for p in Path(root).rglob(f".*{TMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)
