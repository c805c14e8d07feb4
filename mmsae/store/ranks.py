"""How the processes of one extraction share a store: each extracts the shards it owns, rank 0 merges.

Process `rank` of `world_size` computes the shards s with s % world_size == rank. Rank 0 creates
store.json; each shard's record goes to its own file in .done/, and rank 0 merges them when all are done.
In a torch.distributed group the processes wait at barriers; otherwise they poll the store's files. Each
process holds .done/rank-<r>.lock while it extracts, so a second extraction of the same store as the same
rank fails at once instead of waiting on records that will never come.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmsae.store.format import (
    DONE_DIR,
    STORE_JSON,
    StoreError,
    read_info,
    remove_residue,
    shard_done,
    shard_record,
    write_info,
)

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; duplicate extractions are then not detected
    fcntl = None  # type: ignore[assignment]

DEFAULT_WAIT_S = 1800.0  # as torch.distributed's default: a rank that makes no progress this long failed
POLL_S = 0.2


@dataclass(frozen=True)
class Ranks:
    """This process's share of the shards, and how it waits for the other processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # GPU index on this host
    distributed: bool = False  # in a torch.distributed group: barriers; else poll the store's files

    def owns(self, shard: int) -> bool:
        return shard % self.world_size == self.rank


def resolve_ranks(rank: int | None = None, world_size: int | None = None) -> Ranks:
    """Explicit values, else the torch.distributed group, else torchrun's RANK/WORLD_SIZE/LOCAL_RANK."""
    if (rank is None) != (world_size is None):
        raise ValueError(
            "Pass both rank= and world_size=, or neither (then they come from torch.distributed "
            "or torchrun's RANK/WORLD_SIZE environment variables)."
        )
    dist = torch.distributed
    group = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if group else int(os.environ.get("RANK", 0))
        world_size = dist.get_world_size() if group else int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world_size:
        raise ValueError(f"Need 0 <= rank < world_size, got rank={rank}, world_size={world_size}.")
    in_group = group and (rank, world_size) == (dist.get_rank(), dist.get_world_size())
    return Ranks(rank, world_size, int(os.environ.get("LOCAL_RANK", rank)), in_group)


def rank_device(device: str | torch.device, ranks: Ranks) -> torch.device:
    """`device`, except that each process of a multi-process CUDA run gets its own GPU, cuda:LOCAL_RANK."""
    device = torch.device(device)
    if device.type != "cuda" or ranks.world_size == 1:
        return device
    if ranks.local_rank >= torch.cuda.device_count():
        raise ValueError(
            f"Rank {ranks.rank} needs cuda:{ranks.local_rank} but {torch.cuda.device_count()} "
            "GPUs are visible: start at most one process per GPU."
        )
    return torch.device("cuda", ranks.local_rank)


def poll(check: Callable[[], tuple[bool, int]], timeout: float, failure: Callable[[], str]) -> None:
    """Wait until `check` says finished; its progress count rising restarts the timeout."""
    deadline, seen = time.monotonic() + timeout, -1
    while True:
        finished, progress = check()
        if finished:
            return
        if progress > seen:
            deadline, seen = time.monotonic() + timeout, progress
        elif time.monotonic() > deadline:
            raise TimeoutError(failure())
        time.sleep(POLL_S)


def await_store(
    root: Path,
    config: dict[str, Any],
    digest: str,
    ranks: Ranks,
    timeout: float,
) -> dict[str, Any]:
    """store.json once rank 0 has created (or checked) it."""
    if ranks.distributed:
        torch.distributed.barrier()
    elif ranks.rank != 0:
        poll(
            lambda: ((root / STORE_JSON).is_file(), 0),
            timeout,
            lambda: (
                f"Rank {ranks.rank}: rank 0 did not create {root / STORE_JSON} within {timeout:.0f} s. "
                "Start rank 0 with the same configuration and out_dir, and check its log."
            ),
        )
    info = open_info(root, config, digest)
    if info is None:  # only when the ranks were given different out_dirs
        raise StoreError(
            f"Rank {ranks.rank}: {root / STORE_JSON} does not exist after rank 0 created the "
            "store: give every rank the same out_dir."
        )
    return info


def finish(root: Path, info: dict[str, Any], pending: list[int], ranks: Ranks, timeout: float) -> None:
    """Once the `pending` shards are done, rank 0 merges their records into store.json; all wait for it."""
    if ranks.distributed:
        torch.distributed.barrier()
        if ranks.rank == 0:
            _finalize(root, info)
        torch.distributed.barrier()
    elif ranks.rank == 0:
        _await_shards(root, info, pending, ranks, timeout)
        _finalize(root, info)
    else:
        _await_merge(root, pending, ranks, timeout)


def _await_shards(root: Path, info: dict[str, Any], pending: list[int], ranks: Ranks, timeout: float) -> None:
    """Rank 0 without a process group: poll until every pending shard has a record and its files."""
    waiting = set(pending)

    def check() -> tuple[bool, int]:
        waiting.difference_update([s for s in sorted(waiting) if shard_done(root, info, s)])
        return not waiting, len(pending) - len(waiting)

    def failure() -> str:
        owners = sorted({s % ranks.world_size for s in waiting})
        return (
            f"Rank 0: no shard of {root} was finished for {timeout:.0f} s; shards {sorted(waiting)[:8]} "
            f"of ranks {owners} are missing. That process probably failed: check its log, then run the "
            "same extraction again (with any number of processes) to resume."
        )

    poll(check, timeout, failure)


def _await_merge(root: Path, pending: list[int], ranks: Ranks, timeout: float) -> None:
    """Other ranks without a process group: poll until store.json is complete with the pending shards.

    They cannot watch .done/ like rank 0: rank 0 deletes it when it merges. New records there count as
    progress for the timeout.
    """

    def check() -> tuple[bool, int]:
        info = read_info(root)
        if info["complete"] and all(shard_done(root, info, s) for s in pending):
            return True, 0
        return False, len(list((root / DONE_DIR).glob("*.json")))

    poll(
        check,
        timeout,
        lambda: (
            f"Rank {ranks.rank}: {root} was not finished for {timeout:.0f} s without "
            "progress; check the other processes' logs, then run the same extraction "
            "again (with any number of processes) to resume."
        ),
    )


def _finalize(root: Path, info: dict[str, Any]) -> None:
    """Rank 0, once every shard is done: merge the shard records into store.json and drop .done/."""
    records = [shard_record(root, info, s) for s in range(len(info["shards"]))]
    write_info(root, {**info, "shards": records, "complete": True})
    remove_residue(root)  # .done/ and the temp files of killed earlier runs; no process writes any more


def open_info(root: Path, config: dict[str, Any], digest: str) -> dict[str, Any] | None:
    """The existing store's info (checked against this config), or None for a new store."""
    if not (root / STORE_JSON).is_file():
        return None
    info = read_info(root)
    if info["config_hash"] != digest:
        changed = sorted(k for k in config if info["config"].get(k) != config[k])
        raise StoreError(
            f"The activation store {root} was made with a different configuration (config hash "
            f"{info['config_hash'][:16]} != {digest[:16]}; differs in: {', '.join(changed)}). "
            "Use another out_dir (stores are named by their config hash) or delete that store."
        )
    return info


@contextlib.contextmanager
def rank_lock(root: Path, ranks: Ranks) -> Iterator[None]:
    """Hold .done/rank-<r>.lock while extracting as rank r: a second extraction of the same store as the
    same rank fails at once (the lock is released when its process ends, even by SIGKILL)."""
    if fcntl is None:
        yield
        return
    path = root / DONE_DIR / f"rank-{ranks.rank}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise StoreError(
                f"Another process (pid {holder}) is extracting into {root} as rank {ranks.rank} of "
                f"{ranks.world_size}. Wait for it to finish (running the same extraction again then "
                "returns its store at once), or stop it and run again to resume."
            ) from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            # Unlinked while still held, so no other process can take this file's lock meanwhile.
            path.unlink(missing_ok=True)
            if ranks.world_size == 1:  # other ranks may still be using .done/
                with contextlib.suppress(OSError):
                    path.parent.rmdir()  # only if empty: records of an interrupted run stay
            fcntl.flock(f, fcntl.LOCK_UN)
