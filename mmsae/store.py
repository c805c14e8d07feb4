"""The activation store: immutable sharded activations on disk, read back as shuffled token batches.

Layout of a store directory (named by a hash of the extraction config, see `mmsae.extract`):

    store.json                    format, config + hash, layout, per-hook width and meta columns, shards
    <hook>/<shard:05d>.acts.bin   raw C-order [n_tokens, d] array in the store dtype
    <hook>/<shard:05d>.meta.bin   raw C-order [n_tokens, n_meta] int64 (example_id, token_index, ...)
    .done/<shard:05d>.json        while extracting: the record of each finished shard

Shard files are written under a temporary name and renamed when complete; only then is the shard's record
(token count and crc32 of each file) written to .done/, so every recorded shard is whole. Each shard has
its own record file so that several extraction processes never overwrite each other's progress; when
all shards are done, one process merges the records into store.json and deletes .done/. Raw files plus a
JSON header (rather than .npy) let the writer stream a shard whose final length is not known up front.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import tempfile
import threading
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmsae.checkpoint import atomic_write_bytes
from mmsae.encoders.base import TokenActs
from mmsae.staging import DeviceStager, RowScreen

FORMAT = "mmsae-activations/1"
STORE_JSON = "store.json"
DONE_DIR = ".done"  # a dot name: no hook (a module path) can clash with it
DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
DEFAULT_BUFFER_TOKENS = 1 << 18


class StoreError(RuntimeError):
    """A store on disk is incomplete, corrupt or does not match what was asked of it."""


# ------------------------------------------------------------------------------------------ file format
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
    return info


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


def remove_stale_temps(root: Path) -> int:
    """Delete temp files a killed writer left behind; returns how many."""
    stale = [p for p in root.rglob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


# Checksums run here while the writing thread copies the same bytes into the file: zlib.crc32 and file
# writes both release the GIL, so a chunk costs max(write, crc) instead of their sum.
_CRC_POOL = ThreadPoolExecutor(1, thread_name_prefix="mmsae-crc32")


class ShardFile:
    """One shard file being written: temp file + running crc32; `commit` renames it into place."""

    def __init__(self, final: Path):
        final.parent.mkdir(parents=True, exist_ok=True)
        self.final = final
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
        self.tmp = Path(tmp)
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


# ------------------------------------------------------------------------------------------ batching
def resolve_hooks(available: list[str], hook: str | None, hooks: list[str] | None) -> tuple[list[str], bool]:
    """Which hooks `.batches` reads, and whether it yields dicts (several hooks) or tensors (one)."""
    if hooks is not None:
        if hook is not None:
            raise ValueError("Pass either hook= (tensor batches) or hooks=[...] (dict batches), not both.")
        keys, as_dict = list(hooks), True
    elif hook is not None:
        keys, as_dict = [hook], False
    elif len(available) == 1:
        keys, as_dict = available, False
    else:
        raise ValueError(f"This source has several hooks {available}: pass hook=... or hooks=[...].")
    missing = [h for h in keys if h not in available]
    if missing or not keys:
        raise KeyError(f"Hooks {missing or keys} are not available; this source has {available}.")
    return keys, as_dict


def shuffle_batches(
    chunks: Iterable[dict[str, Tensor]],
    batch_size: int,
    buffer_tokens: int,
    generator: torch.Generator | None,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> Iterator[dict[str, Tensor]]:
    """Re-batch token chunks (dicts of aligned [n, d] tensors, on the host or all on one GPU) through a
    shuffle buffer on the chunks' device.

    Each token is yielded exactly once. With a generator, tokens enter a pool of `buffer_tokens` slots;
    once it is full, each incoming token evicts a uniformly drawn resident one, which is emitted (a token
    stays for a geometric number of rounds, as in tf.data's shuffle buffer); the pool is emitted in random
    order at the end. Every token is copied twice (into the pool, and out of it straight into its batch),
    whatever the buffer size; with `pin_memory` batches are page-locked, ready for an asynchronous copy to
    the GPU. Without a generator, tokens come out in order (views of the chunks where they align).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if generator is None:
        out = _Rebatcher(batch_size)
        for chunk in chunks:
            yield from out.push(chunk)
        yield from out.flush(drop_last)
        return
    capacity = max(buffer_tokens, batch_size)
    filling: list[dict[str, Tensor]] = []  # the pool is only built once it is full: small stores stay small
    n_filled = 0
    pool: dict[str, Tensor] | None = None
    batches = _BatchFiller(batch_size, pin_memory)
    for chunk in chunks:
        n, start = len(next(iter(chunk.values()))), 0
        if pool is None:
            start = min(n, capacity - n_filled)
            filling.append({h: t[:start] for h, t in chunk.items()})
            n_filled += start
            if n_filled < capacity:
                continue
            pool = {h: torch.cat([c[h] for c in filling]) for h in chunk}
            filling = []
        while start < n:  # each incoming token evicts a distinct random resident
            stop = min(n, start + capacity)
            slots = _on(torch.randperm(capacity, generator=generator)[: stop - start], pool)
            # Slot blocks end where output batches end, so every batch is filled in place, never concatenated.
            i = 0
            while i < stop - start:
                block = slots[i : i + batches.room()]
                yield from batches.take(pool, block)
                for h, p in pool.items():  # slots are distinct: no later block reads what this one writes
                    p.index_copy_(0, block, chunk[h][start + i : start + i + len(block)])
                i += len(block)
            start = stop
    if pool is None and filling:
        pool = {h: torch.cat([c[h] for c in filling]) for h in filling[0]}
    if pool is not None:
        yield from batches.take(
            pool, _on(torch.randperm(len(next(iter(pool.values()))), generator=generator), pool)
        )
    yield from batches.flush(drop_last)


def _on(slots: Tensor, pool: dict[str, Tensor]) -> Tensor:
    """Slot indices (drawn on the host, so a GPU pool shuffles exactly as a host one) on the pool's device."""
    device = next(iter(pool.values())).device
    return slots if device.type == "cpu" else slots.pin_memory().to(device, non_blocking=True)


class _BatchFiller:
    """Copies pool rows straight into fixed-size output batches: one copy per token on the way out.

    Batches are fresh tensors (their consumer may keep them), page-locked if asked: the CUDA host allocator
    caches those blocks and reuses one only after the copies that read it have finished.
    """

    def __init__(self, batch_size: int, pin_memory: bool):
        self.batch_size, self.pin_memory = batch_size, pin_memory
        self.batch: dict[str, Tensor] | None = None
        self.filled = 0

    def room(self) -> int:
        return self.batch_size - self.filled

    def take(self, pool: dict[str, Tensor], rows: Tensor) -> Iterator[dict[str, Tensor]]:
        """Append pool[rows] to the batch being filled, yielding each batch that fills up."""
        i = 0
        while i < len(rows):
            if self.batch is None:
                self.batch = {
                    h: torch.empty(
                        (self.batch_size, *p.shape[1:]),
                        dtype=p.dtype,
                        device=p.device,
                        pin_memory=self.pin_memory and p.device.type == "cpu",
                    )
                    for h, p in pool.items()
                }
            m = min(self.room(), len(rows) - i)
            for h, p in pool.items():
                torch.index_select(p, 0, rows[i : i + m], out=self.batch[h][self.filled : self.filled + m])
            self.filled += m
            i += m
            if self.filled == self.batch_size:
                yield self.batch
                self.batch, self.filled = None, 0

    def flush(self, drop_last: bool) -> Iterator[dict[str, Tensor]]:
        if self.batch is not None and not drop_last:
            yield {h: t[: self.filled] for h, t in self.batch.items()}
        self.batch, self.filled = None, 0


class _Rebatcher:
    """Cuts a stream of row chunks into batches of exactly `batch_size` rows (the last may be short)."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.carry: dict[str, Tensor] | None = None

    def push(self, chunk: dict[str, Tensor]) -> Iterator[dict[str, Tensor]]:
        n, start = len(next(iter(chunk.values()))), 0
        if self.carry is not None:  # complete the carried rows with the chunk's first ones only
            start = min(n, self.batch_size - len(next(iter(self.carry.values()))))
            head = {h: torch.cat([self.carry[h], t[:start]]) for h, t in chunk.items()}
            self.carry = None
            if len(next(iter(head.values()))) < self.batch_size:
                self.carry = head
                return
            yield head
        full = start + (n - start) // self.batch_size * self.batch_size
        for i in range(start, full, self.batch_size):
            yield {h: t[i : i + self.batch_size] for h, t in chunk.items()}
        if full < n:
            self.carry = {h: t[full:] for h, t in chunk.items()}

    def flush(self, drop_last: bool) -> Iterator[dict[str, Tensor]]:
        if self.carry is not None and not drop_last:
            yield self.carry
        self.carry = None


def prefetch(items: Iterator[Any], depth: int = 1) -> Iterator[Any]:
    """Run an iterator `depth` items ahead in a thread (file reads and crc32 release the GIL)."""
    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def worker() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(("done", None))
        except BaseException as e:  # re-raised in the consumer
            q.put(("error", e))

    thread = threading.Thread(target=worker, daemon=True, name="mmsae-prefetch")
    thread.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "done":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()


# ------------------------------------------------------------------------------------------ the store
class ActivationStore:
    """Read side of a finished extraction: widths, per-token metadata and shuffled batches.

    `batches(..., shuffle=False)` yields tokens in store order, which is the order of `meta(hook)`.
    """

    def __init__(self, path: str | os.PathLike, verify: bool = True):
        self.path = Path(path)
        self.info = read_info(self.path)
        self.verify = verify
        # Files whose crc32 matched, keyed by (path, size, mtime): later passes over the data skip the
        # check (it was the reader's slowest step), while a file rewritten since is checked again.
        self._verified: set[tuple[Path, int, int]] = set()
        shards = self.info["shards"]
        if not self.info.get("complete") or any(s is None for s in shards):
            done = n_recorded(self.path, self.info)
            raise StoreError(
                f"Activation store {self.path} is incomplete ({done}/{len(shards)} shards): the "
                "extraction was interrupted or is still running. Run the same extraction again "
                "(with any number of processes) to resume it."
            )
        self.dtype = self.info["config"]["dtype"]

    # ---------------------------------------------------------------- description
    @property
    def hooks(self) -> list[str]:
        return list(self.info["hooks"])

    @property
    def n_shards(self) -> int:
        return len(self.info["shards"])

    def dim(self, hook: str | None = None) -> int:
        (key,), _ = resolve_hooks(self.hooks, hook, None)
        return int(self.info["hooks"][key]["d"])

    @property
    def d_in(self) -> int:
        """Width of the stored activations (all hooks must share it; else use `dim(hook)`)."""
        dims = {self.info["hooks"][h]["d"] for h in self.hooks}
        if len(dims) > 1:
            raise ValueError(f"Hooks of {self.path} have different widths {dims}: use store.dim(hook).")
        return int(dims.pop())

    def site(self, hook: str | None = None) -> str:
        """What was recorded at `hook`: 'output' (the module's output) or 'update' (output − input)."""
        (key,), _ = resolve_hooks(self.hooks, hook, None)
        return self.info["config"].get("sites", {}).get(key, "output")  # stores before sites: outputs

    def provenance(self, hook: str | None = None) -> dict[str, str]:
        """The SAE config fields an SAE trained on `hook` of this store inherits: encoder, hook, site."""
        (key,), _ = resolve_hooks(self.hooks, hook, None)
        return {"encoder": self.info["config"]["encoder"], "hook": key, "site": self.site(key)}

    def token_counts(self) -> dict[str, int]:
        return {h: sum(s["hooks"][h]["n_tokens"] for s in self.info["shards"]) for h in self.hooks}

    @property
    def n_tokens(self) -> int:
        """Tokens of the (single) hook; with several hooks see `token_counts()`."""
        counts = set(self.token_counts().values())
        if len(counts) > 1:
            raise ValueError(f"Hooks of {self.path} hold different token counts: use store.token_counts().")
        return counts.pop()

    @property
    def skipped(self) -> list[dict[str, Any]]:
        """Examples the extraction could not read (index, source, reason)."""
        return [item for s in self.info["shards"] for item in s["skipped"]]

    def __repr__(self) -> str:
        return (
            f"ActivationStore({str(self.path)!r}, encoder={self.info['config']['encoder']!r}, "
            f"hooks={self.hooks}, tokens={self.token_counts()}, dtype={self.dtype})"
        )

    # ---------------------------------------------------------------- reading
    def _read(
        self, path: Path, shape: tuple[int, int], dtype: torch.dtype, crc: str, hook: str, shard: int
    ) -> Tensor:
        expected = shape[0] * shape[1] * dtype.itemsize
        fix = (
            f"Delete {path} and run the same extraction again: it recomputes only missing shards "
            f"(hook {hook!r}, shard {shard})."
        )
        try:
            stat = path.stat()
        except FileNotFoundError as e:
            raise StoreError(f"Shard file {path} is missing. {fix}") from e
        if stat.st_size != expected:
            raise StoreError(
                f"Shard file {path} has {stat.st_size} bytes, expected {expected} (truncated?). {fix}"
            )
        if expected == 0:
            return torch.empty(shape, dtype=dtype)
        # Mapped, not read: the tensor is the page cache itself (no allocation, zero-fill or copy per pass).
        # Copy-on-write only so that torch accepts the array as writable; nothing writes to it. Shards are
        # replaced by rename, never rewritten in place, so a mapping stays valid while it is in use.
        buf = np.memmap(path, dtype=np.uint8, mode="c")
        key = (path, stat.st_size, stat.st_mtime_ns)
        if self.verify and key not in self._verified:
            if (got := f"{zlib.crc32(buf):08x}") != crc:
                raise StoreError(f"Shard file {path} is corrupt: crc32 {got} != recorded {crc}. {fix}")
            self._verified.add(key)
        return torch.from_numpy(buf).view(dtype).view(shape)

    def shard_acts(self, hook: str, shard: int) -> Tensor:
        """Activations [n, d] of one shard of one hook, in the store dtype."""
        rec = self.info["shards"][shard]["hooks"][hook]
        shape = (rec["n_tokens"], self.info["hooks"][hook]["d"])
        path = shard_files(self.path, hook, shard)[0]
        return self._read(path, shape, DTYPES[self.dtype], rec["acts_crc32"], hook, shard)

    def shard_meta(self, hook: str, shard: int) -> Tensor:
        """Per-token metadata [n, n_meta] int64 of one shard (columns in info["hooks"][hook])."""
        rec = self.info["shards"][shard]["hooks"][hook]
        shape = (rec["n_tokens"], len(self.info["hooks"][hook]["meta_columns"]))
        path = shard_files(self.path, hook, shard)[1]
        return self._read(path, shape, torch.int64, rec["meta_crc32"], hook, shard)

    def meta(self, hook: str | None = None) -> dict[str, np.ndarray]:
        """Per-token metadata columns (example_id, token_index, [timestep, cond]) in store order."""
        (key,), _ = resolve_hooks(self.hooks, hook, None)
        meta = torch.cat([self.shard_meta(key, i) for i in range(self.n_shards)]).numpy()
        return {col: meta[:, j] for j, col in enumerate(self.info["hooks"][key]["meta_columns"])}

    def token_acts(
        self, hook: str | None = None, batch_size: int = 8192, dtype: torch.dtype = torch.float32
    ) -> Iterator[TokenActs]:
        """The store in order as `TokenActs` (activations with their per-token metadata), e.g. for
        `mmsae.analysis.feature_stats`, whose top examples then point back to examples and patches."""
        (key,), _ = resolve_hooks(self.hooks, hook, None)
        columns = self.info["hooks"][key]["meta_columns"]
        for shard in range(self.n_shards):
            acts_ND, meta_NM = self.shard_acts(key, shard), self.shard_meta(key, shard)
            for start in range(0, len(acts_ND), batch_size):
                rows = slice(start, start + batch_size)
                yield TokenActs(acts_ND[rows].to(dtype), {c: meta_NM[rows, j] for j, c in enumerate(columns)})

    def staging_bytes(self, hook: str | None = None, buffer_tokens: int = DEFAULT_BUFFER_TOKENS) -> int:
        """GPU memory `batches(..., device="cuda")` holds: the shuffle buffer, the shard being consumed and
        the one being copied in."""
        keys, _ = resolve_hooks(self.hooks, hook, None)
        n_tokens = self.token_counts()[keys[0]]
        biggest = max((s["hooks"][h]["n_tokens"] for s in self.info["shards"] for h in keys), default=0)
        row_bytes = sum(self.dim(h) for h in keys) * DTYPES[self.dtype].itemsize
        return (min(buffer_tokens, n_tokens) + 2 * biggest) * row_bytes

    def batches(
        self,
        batch_size: int,
        hook: str | None = None,
        shuffle: bool = True,
        seed: int = 0,
        buffer_tokens: int = DEFAULT_BUFFER_TOKENS,
        hooks: list[str] | None = None,
        drop_last: bool = False,
        dtype: torch.dtype | None = torch.float32,
        epochs: int | None = 1,
        pin_memory: bool = False,
        device: str | torch.device | None = None,
        screen: RowScreen | None = None,
    ) -> Iterator[Tensor | dict[str, Tensor]]:
        """Token batches [batch_size, d] (dicts {hook: batch} when `hooks=[...]` is given) over `epochs`
        passes of the store (None: endlessly).

        Shards are read sequentially (in a seeded random order per pass when shuffling, pass p seeded
        `seed + p`, one shard prefetched in a thread) into an in-memory shuffle buffer of `buffer_tokens`
        tokens; every token comes once per pass. The buffer carries over from one pass to the next, so a
        new pass never waits for it to refill. `dtype=None` keeps the stored dtype (half the bytes to move;
        convert on the device); `pin_memory` returns page-locked batches (for asynchronous copies to a GPU).

        `device="cuda[:i]"` keeps the shuffle buffer on that GPU (`mmsae.staging`): shards are copied to it
        from the loader thread, rows holding NaN/Inf are dropped there (by `screen`, which counts them), and
        batches come out on the GPU, shuffled exactly as on the host when no row is dropped.
        """
        keys, as_dict = resolve_hooks(self.hooks, hook, hooks)
        for i, s in enumerate(self.info["shards"]):
            counts = {s["hooks"][h]["n_tokens"] for h in keys}
            if len(counts) > 1:
                raise ValueError(
                    f"Hooks {keys} hold different token counts (shard {i}); read them one at a time."
                )
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs={epochs}: read at least one pass, or None for an endless stream.")
        n_tokens = self.token_counts()[keys[0]]
        if epochs is None and n_tokens == 0:
            raise ValueError(
                f"The store {self.path} holds no tokens: an endless stream of it would never "
                "yield. Extract some examples first."
            )
        passes = itertools.count() if epochs is None else range(epochs)

        def shard_order(p: int) -> Iterable[int]:
            return (
                np.random.default_rng(seed + p).permutation(self.n_shards)
                if shuffle
                else range(self.n_shards)
            )

        order = ((p, int(i)) for p in passes for i in shard_order(p))
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type == "cuda":
            stager = DeviceStager(device, screen)
            staged = prefetch(
                stager({h: self.shard_acts(h, i) for h in keys}, f"pass {p}, shard {i} of {self.path}")
                for p, i in order
            )
            chunks: Iterable[dict[str, Tensor]] = itertools.starmap(stager.handover, staged)
        elif device.type == "cpu":
            chunks = prefetch({h: self.shard_acts(h, i) for h in keys} for _, i in order)
        else:
            raise ValueError(f"device={device}: the store's shuffle buffer lives on the host or a CUDA GPU.")
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        # A pool larger than the store would only hold several copies of it.
        buffer_tokens = min(buffer_tokens, max(n_tokens, batch_size))
        for batch in shuffle_batches(chunks, batch_size, buffer_tokens, generator, drop_last, pin_memory):
            out = batch if dtype is None else {h: t.to(dtype) for h, t in batch.items()}
            yield out if as_dict else out[keys[0]]
