"""The read side of the store: `ActivationStore` opens a finished extraction and yields shuffled batches."""

from __future__ import annotations

import itertools
import os
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmsae.encoders.base import TokenActs
from mmsae.staging import DeviceStager, RowScreen
from mmsae.store.format import (
    DEFAULT_BUFFER_TOKENS,
    DEFAULT_PIECE_TOKENS,
    DTYPES,
    STORE_JSON,
    StoreError,
    n_recorded,
    read_info,
    shard_files,
)
from mmsae.store.shuffle import prefetch, resolve_hooks, shuffle_batches


def resolve_store_dir(path: str | os.PathLike) -> Path:
    """`path` if it is a store, else its single store child: extraction writes a store into
    out_dir/<encoder>-<hash>/, so the out_dir a user gave `mmsae extract` also opens the store."""
    path = Path(path)
    if (path / STORE_JSON).is_file() or not path.is_dir():
        return path
    children = sorted(p for p in path.iterdir() if (p / STORE_JSON).is_file())
    if len(children) == 1:
        return children[0]
    if children:
        listing = "\n  ".join(str(c) for c in children)
        raise StoreError(
            f"{path} holds {len(children)} activation stores (one per extraction config):\n  {listing}\n"
            "Name the one to use (e.g. source: <that path>), or delete the stale ones."
        )
    return path  # read_info says that it is not a store


class ActivationStore:
    """Read side of a finished extraction: widths, per-token metadata and shuffled batches.

    `path` is the store directory, or the out_dir an extraction wrote it into when that holds one store.
    `batches(..., shuffle=False)` yields tokens in store order, which is the order of `meta(hook)`.
    """

    def __init__(self, path: str | os.PathLike, verify: bool = True):
        self.path = resolve_store_dir(path)
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
        for i, s in enumerate(shards):
            if not isinstance(s, dict) or set(self.info["hooks"]) - set(s.get("hooks", {})):
                raise StoreError(
                    f"{self.path / STORE_JSON}: shard {i}'s record lacks hooks {sorted(self.info['hooks'])}: "
                    "store.json was edited or damaged. Restore it, or delete the store directory and run "
                    "the same extraction again."
                )

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
            raise self._size_error(path, stat.st_size, expected, crc, fix)
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

    def _size_error(self, path: Path, size: int, expected: int, crc: str, fix: str) -> StoreError:
        """Which file is wrong when a shard's size disagrees with store.json: a shard whose bytes still
        match their recorded checksum is whole, so store.json's token count or width was changed."""
        if f"{zlib.crc32(np.fromfile(path, dtype=np.uint8)):08x}" == crc:
            return StoreError(
                f"{self.path / STORE_JSON} does not match its shard files: {path} is intact (its crc32 "
                f"matches the record) but holds {size} bytes where store.json's token count and width "
                f"give {expected}. store.json was edited or damaged: restore it, or delete the store "
                "directory and run the same extraction again."
            )
        return StoreError(f"Shard file {path} has {size} bytes, expected {expected} (truncated?). {fix}")

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

    def load(
        self, hook: str | None = None, device: str | torch.device = "cpu", screen: RowScreen | None = None
    ) -> Tensor:
        """Every activation of `hook` as one [N, d] tensor in store order and the stored dtype, on `device`
        (to a GPU: shard by shard from a loader thread, `load_bytes` of its memory at the peak), without the
        rows holding NaN/Inf when a `screen` is given (which counts them)."""
        (key,), _ = resolve_hooks(self.hooks, hook, None)
        device = torch.device(device)
        pieces = self._pieces(key, None)  # whole shards, in order
        order = ((0, i, rows) for i, rows in pieces)
        out_ND = torch.empty(
            (self.token_counts()[key], self.dim(key)), dtype=DTYPES[self.dtype], device=device
        )
        filled = 0
        for (i, _), shard in zip(pieces, self._shard_chunks(order, [key], device, screen)):
            acts_ND = shard[key]
            if screen is not None and device.type == "cpu":  # a GPU copy is screened on its way
                acts_ND = screen(acts_ND, f"shard {i} of {self.path}")
            out_ND[filled : filled + len(acts_ND)].copy_(acts_ND)
            filled += len(acts_ND)
        return out_ND[:filled]

    def load_bytes(self, hook: str | None = None) -> int:
        """Device memory `load(hook, device="cuda")` takes at its peak: the store and two shards in flight."""
        return self.store_bytes(hook) + self.staging_bytes(hook, buffer_tokens=0)

    def staging_bytes(self, hook: str | None = None, buffer_tokens: int = DEFAULT_BUFFER_TOKENS) -> int:
        """GPU memory `batches(..., device="cuda")` holds: the shuffle buffer, the shard being consumed and
        the one being copied in."""
        keys, n_tokens, row_bytes = self._row_sizes(hook)
        biggest = max((s["hooks"][h]["n_tokens"] for s in self.info["shards"] for h in keys), default=0)
        return (min(buffer_tokens, n_tokens) + 2 * biggest) * row_bytes

    def store_bytes(self, hook: str | None = None) -> int:
        """Bytes of the hook's activations: every shard, as stored."""
        _, n_tokens, row_bytes = self._row_sizes(hook)
        return n_tokens * row_bytes

    def _row_sizes(self, hook: str | None) -> tuple[list[str], int, int]:
        """(the hooks read, tokens per hook, bytes per token of them all) for `hook`."""
        keys, _ = resolve_hooks(self.hooks, hook, None)
        row_bytes = sum(self.dim(h) for h in keys) * DTYPES[self.dtype].itemsize
        return keys, self.token_counts()[keys[0]], row_bytes

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
        piece_tokens: int = DEFAULT_PIECE_TOKENS,
    ) -> Iterator[Tensor | dict[str, Tensor]]:
        """Token batches [batch_size, d] (dicts {hook: batch} when `hooks=[...]` is given) over `epochs`
        passes of the store (None: endlessly).

        Shuffled, the store is read in pieces of `piece_tokens` consecutive tokens in a seeded random order
        over all its shards (pass p seeded `seed + p`, one piece prefetched in a thread) into an in-memory
        shuffle buffer of `buffer_tokens` tokens; every token comes once per pass. The buffer carries over
        from one pass to the next, so a new pass never waits for it to refill. (Whole shards in a random
        order fed the buffer a few shards' images at a time, in extraction order: on DINOv2-S tokens of
        photos in folder order, with half the store in the buffer, an SAE trained one pass reached held-out
        FVU 0.323-0.324 against 0.282-0.283 with a full reshuffle; pieces of 16384 tokens reach 0.283-0.284,
        docs/benchmarks.md, "Activation store and extraction".) A shard's checksum is verified when it is
        first read, so a shuffled first pass checks most shards within its first pieces (the whole shard is
        read then: stores larger than the page cache are read about twice in that pass). Unshuffled, shards
        are read in order.
        `dtype=None` keeps the stored dtype (half the bytes to move; convert on the device); `pin_memory`
        returns page-locked batches (for asynchronous copies to a GPU).

        `device="cuda[:i]"` keeps the shuffle buffer on that GPU (`mmsae.staging`): pieces are copied to it
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
        if piece_tokens < 1:
            raise ValueError(f"piece_tokens={piece_tokens} must be at least 1.")
        passes = itertools.count() if epochs is None else range(epochs)
        pieces = self._pieces(keys[0], piece_tokens if shuffle else None)

        def piece_order(p: int) -> Iterable[tuple[int, slice]]:
            order = (
                np.random.default_rng(seed + p).permutation(len(pieces)) if shuffle else range(len(pieces))
            )
            return (pieces[j] for j in order)

        order = ((p, i, rows) for p in passes for i, rows in piece_order(p))
        chunks = self._shard_chunks(order, keys, device, screen)
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        # A pool larger than the store would only hold several copies of it.
        buffer_tokens = min(buffer_tokens, max(n_tokens, batch_size))
        for batch in shuffle_batches(chunks, batch_size, buffer_tokens, generator, drop_last, pin_memory):
            out = batch if dtype is None else {h: t.to(dtype) for h, t in batch.items()}
            yield out if as_dict else out[keys[0]]

    def _pieces(self, hook: str, piece_tokens: int | None) -> list[tuple[int, slice]]:
        """(shard, rows) of every piece of `piece_tokens` consecutive tokens (None: whole shards)."""
        pieces = []
        for i, shard in enumerate(self.info["shards"]):
            n = shard["hooks"][hook]["n_tokens"]
            step = piece_tokens or max(n, 1)
            pieces += [(i, slice(start, start + step)) for start in range(0, n, step)]
        return pieces

    def _shard_chunks(
        self,
        order: Iterator[tuple[int, int, slice]],
        keys: list[str],
        device: str | torch.device | None,
        screen: RowScreen | None,
    ) -> Iterator[dict[str, Tensor]]:
        """The pieces of `keys` in (pass, shard, rows) `order`, read one ahead in a thread; on a CUDA
        `device` copied there and screened."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"device={device}: the store's shuffle buffer lives on the host or a CUDA GPU.")

        def read(p: int, i: int, rows: slice) -> dict[str, Tensor]:
            return {h: self.shard_acts(h, i)[rows] for h in keys}

        if device.type == "cuda":
            stager = DeviceStager(device, screen)

            def stage(p: int, i: int, rows: slice) -> tuple[dict[str, Tensor], torch.cuda.Event]:
                # The screen counts per place: each piece of a shard is one.
                where = f"pass {p}, shard {i} rows {rows.start}:{rows.stop} of {self.path}"
                return stager(read(p, i, rows), where)

            return itertools.starmap(stager.handover, prefetch(itertools.starmap(stage, order)))

        return prefetch(itertools.starmap(read, order))
