"""The store's writer: forward results → shard files, through a background thread, checksummed and atomic.

Casts and device→host copies are asynchronous (`stage_for_host`); `ShardWriter` waits for each copy and
streams it into the current shard's temp files, computing each file's crc32 on the way; a shard is renamed
into place and recorded only when complete (see `mmsae.store.format`).
"""

from __future__ import annotations

import errno
import os
import queue
import threading
import zlib
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from mmsae.encoders.base import TokenActs
from mmsae.fileio import create_temp
from mmsae.store.format import DTYPES, n_recorded, per_token_meta, shard_files, write_record

if TYPE_CHECKING:
    from tqdm import tqdm

    from mmsae.inputs import InputBatch

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)

# Checksums run here while the writing thread copies the same bytes into the file: zlib.crc32 and file
# writes both release the GIL, so a chunk costs max(write, crc) instead of their sum.
_CRC_POOL = ThreadPoolExecutor(1, thread_name_prefix="mmsae-crc32")


class ShardFile:
    """One shard file being written: temp file + running crc32; `commit` renames it into place."""

    def __init__(self, final: Path):
        self.final = final
        fd, self.tmp = create_temp(final)
        self.file = os.fdopen(fd, "wb")
        self.crc = 0

    def write(self, array: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(array)).cast("B")
        crc = _CRC_POOL.submit(zlib.crc32, data, self.crc)
        self.file.write(data)
        self.crc = crc.result()

    def commit(self) -> str:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.final)
        return f"{self.crc:08x}"

    def discard(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


class ShardWriter(threading.Thread):
    """Background thread: waits for each async device→host copy and streams it into shard temp files.

    Queue items: ("append", shard, {hook: (acts, meta)}, event), ("skipped", shard, [..]),
    ("commit", shard), or None to stop. A shard's record is written only after its files are renamed
    into place; on error or stop, the uncommitted shard's temp files are deleted.
    """

    def __init__(self, root: Path, info: dict[str, Any], max_pending: int = 4):
        super().__init__(daemon=True, name="mmsae-shard-writer")
        self.root, self.info = root, info
        self.queue: queue.Queue[tuple[Any, ...] | None] = queue.Queue(maxsize=max_pending)
        self.error: BaseException | None = None
        self.files: dict[str, tuple[ShardFile, ShardFile]] = {}
        self.counts: dict[str, int] = {}
        self.skipped: list[dict[str, Any]] = []

    def put(self, item: tuple[Any, ...] | None) -> None:
        while True:  # poll so a dead writer surfaces its error instead of blocking forever
            self.raise_error()
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def raise_error(self) -> None:
        if self.error is None:
            return
        err = self.error
        if isinstance(err, OSError) and err.errno in _DISK_FULL:
            done = n_recorded(self.root, self.info)
            raise OSError(
                err.errno,
                f"Out of disk space writing the activation store {self.root} ({err}). "
                f"The partial shard was deleted; {done} finished shards are kept. Free space or "
                "choose another out_dir, then run the same extraction again to resume.",
            ) from err
        raise err

    def run(self) -> None:
        try:
            while (item := self.queue.get()) is not None:
                getattr(self, f"_{item[0]}")(*item[1:])
        except BaseException as e:
            self.error = e
            while self.queue.get() is not None:  # drain so the producer never blocks on a full queue
                pass
        finally:
            for acts_file, meta_file in self.files.values():
                acts_file.discard()
                meta_file.discard()

    def _append(self, shard: int, arrays: dict[str, tuple[Tensor, Tensor]], event: Any) -> None:
        if not self.files:
            self.files = {h: tuple(ShardFile(p) for p in shard_files(self.root, h, shard)) for h in arrays}
            self.counts = dict.fromkeys(arrays, 0)
        if event is not None:
            event.synchronize()
        for hook, (acts, meta) in arrays.items():
            acts_file, meta_file = self.files[hook]
            acts_file.write(acts.view(torch.uint8).numpy())  # raw bytes: numpy has no bfloat16
            meta_file.write(meta.numpy())
            self.counts[hook] += acts.shape[0]

    def _skipped(self, shard: int, skipped: list[dict[str, Any]]) -> None:
        self.skipped.extend(skipped)

    def _commit(self, shard: int) -> None:
        record: dict[str, Any] = {"skipped": self.skipped, "hooks": {}}
        if not self.files:  # every example of the shard was unreadable: still write empty files
            self.files = {
                h: tuple(ShardFile(p) for p in shard_files(self.root, h, shard)) for h in self.info["hooks"]
            }
            self.counts = dict.fromkeys(self.info["hooks"], 0)
        for hook, (acts_file, meta_file) in self.files.items():
            record["hooks"][hook] = {
                "n_tokens": self.counts[hook],
                "acts_crc32": acts_file.commit(),
                "meta_crc32": meta_file.commit(),
            }
        self.files, self.skipped = {}, []
        write_record(self.root, shard, record)


def stage_for_host(
    acts: dict[str, TokenActs],
    dtype: torch.dtype,
    copy_stream: torch.cuda.Stream | None,
) -> tuple[dict[str, tuple[Tensor, Tensor]], Any]:
    """Cast on the device and start async copies into pinned host memory; returns the arrays + event.

    The copies run on `copy_stream`, so the next batch's forward overlaps them (on the compute stream a
    ViT-B/16 batch's 77 MB would stall it ~4 ms of each ~26 ms).
    """
    out, copies = {}, []
    for hook, ta in acts.items():
        meta = per_token_meta(ta)
        acts_ND = ta.acts_ND.to(dtype)
        meta_NM = torch.stack([meta[k].to(torch.int64) for k in sorted(meta)], 1)
        if acts_ND.is_cuda:
            out[hook] = (
                torch.empty(acts_ND.shape, dtype=dtype, pin_memory=True),
                torch.empty(meta_NM.shape, dtype=torch.int64, pin_memory=True),
            )
            copies += [(out[hook][0], acts_ND), (out[hook][1], meta_NM)]
        else:
            out[hook] = (acts_ND.contiguous(), meta_NM.contiguous())
    if not copies:
        return out, None
    compute = torch.cuda.current_stream(copies[0][1].device)
    stream = compute if copy_stream is None else copy_stream
    stream.wait_stream(compute)  # the casts are done
    with torch.cuda.stream(stream):
        for host, on_device in copies:
            host.copy_(on_device, non_blocking=True)
            on_device.record_stream(stream)  # the allocator must not reuse it before the copy ends
    event = torch.cuda.Event()
    event.record(stream)
    return out, event


def write_shards(
    root: Path,
    info: dict[str, Any],
    plan: Sequence[tuple[int, bool]],
    batches: Iterable[tuple[InputBatch, dict[str, TokenActs]]],
    bar: tqdm | None = None,
) -> list[int]:
    """Stream forward results into shard files: batch i goes to shard plan[i][0] and commits it if plan[i][1].

    Casts and device→host copies are asynchronous; a background thread writes. Of the store's `info`, only
    "hooks", "shards" (for the disk-full message) and config "dtype" are read. Returns the indices that
    decode="device" left to PIL. benchmarks/bench_extract.py times the store's own cost with it, on
    batches of device-resident pixels.
    """
    dtype = DTYPES[info["config"]["dtype"]]
    writer = ShardWriter(root, info)
    writer.start()
    fallback: list[int] = []
    copy_stream: torch.cuda.Stream | None = None
    try:
        for (shard, last), (batch, acts) in zip(plan, batches):
            if batch.indices:
                device = next(iter(acts.values())).acts_ND.device
                if device.type == "cuda" and copy_stream is None:
                    copy_stream = torch.cuda.Stream(device)
                writer.put(("append", shard, *stage_for_host(acts, dtype, copy_stream)))
            if batch.skipped:
                writer.put(("skipped", shard, batch.skipped))
            if last:
                writer.put(("commit", shard))
            fallback += batch.fallback
            if bar is not None:
                bar.update(len(batch.indices) + len(batch.skipped))
    finally:
        writer.queue.put(None)  # the writer drains this even after an error
        writer.join()
    writer.raise_error()
    return fallback
