"""Batching for every activation source: hook selection, the shuffle buffer and a prefetching thread."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor


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
    # numpy draws m distinct slots in O(m); torch.randperm(capacity)[:m] cost O(capacity) per chunk, which
    # made a store read in pieces of 16,384 tokens through a 262,144-token buffer a fifth slower.
    rng = np.random.default_rng(int(torch.randint(2**62, (), generator=generator)))
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
            slots = _on(torch.from_numpy(rng.choice(capacity, stop - start, replace=False)), pool)
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
