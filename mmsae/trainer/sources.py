"""Where an SAE's training activations come from: every accepted kind of data becomes a `Source`.

Accepted data (`as_source`):
- a torch Tensor, numpy array or `np.memmap` of shape [..., d] (reshuffled every pass),
- any iterable of [B, d] batches (re-batched to the requested batch size),
- an `mmsae.store.ActivationStore`, or a path to one (the store directory, or the out_dir an
  extraction wrote it into),
- any other store-like object with `.d_in` and `.batches(batch_size, hook=None, shuffle=True, seed=0)`
  (e.g. `mmsae.store.ActivationStream`),
- a dict `{"synthetic": {"d": ..., "n_directions": ..., "seed": ...}}` building
  `mmsae.datasets.synthetic.SyntheticActivations` lazily, so YAML configs can ask for it
  (or `{"store": path}`), or a `SyntheticActivations` itself.

A `Source` is the one interface through which the trainer reads data.
"""

from __future__ import annotations

import inspect
import itertools
import math
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from mmsae.datasets.synthetic import SyntheticActivations
from mmsae.staging import DeviceStager, RowScreen
from mmsae.store import ActivationStore
from mmsae.trainer.iterations import grouped


class ActivationStoreLike(Protocol):
    """What the trainer needs from an activation store."""

    d_in: int

    def batches(
        self, batch_size: int, hook: str | None = None, shuffle: bool = True, seed: int = 0
    ) -> Iterator[Tensor]: ...


class Source:
    """A re-playable stream of [batch_size, d_in] batches; one call of `stream` is one pass.

    Batches may keep the data's own dtype (fp16 halves the bytes to move): SAEModule converts to fp32 on the
    device.
    """

    d_in: int
    replayable: bool = True
    """False for one-shot iterators: their single pass is all the data there is."""
    on_gpu: bool = False
    """True once staged (`stage`): batches come out on the GPU, already screened for NaN/Inf."""

    def stage(self, device: torch.device, budget: float, screen: RowScreen) -> Source:
        """This source with its data (or shuffle buffer) on GPU `device`, if that takes at most `budget`
        bytes; else (or if it cannot be staged) itself."""
        return self

    def stream(self, batch_size: int, seed: int, n_tokens: int) -> Iterator[Tensor]:
        raise NotImplementedError

    def provenance(self) -> dict[str, str]:
        """SAE config fields the data itself records (a store: encoder, hook, site); none for raw arrays."""
        return {}

    def with_held_out(self, n_tokens: int) -> tuple[Source, Source | None]:
        """(training source, held-out source) when no validation data is given: by default none."""
        return self, None

    def validation_batches(self, batch_size: int, seed: int, n_tokens: int) -> list[Tensor]:
        """The held-out batches `validate` reads: one fixed-seed pass, so every validation run sees the
        same tokens; `n_tokens`=0 means all of it."""
        stream = self.stream(batch_size, seed, n_tokens)
        n_batches = math.ceil(n_tokens / batch_size) if n_tokens else None
        return list(itertools.islice(stream, n_batches))

    def global_batches(
        self, batch_size: int, seed: int, n_tokens: int, start: int = 0, stride: int = 1
    ) -> Iterator[Tensor]:
        """Batches start, start+stride, ... of the endless stream of passes (pass p is seeded seed+p)."""
        passes = (
            self.stream(batch_size, seed + p, n_tokens)
            for p in (itertools.count() if self.replayable else range(1))
        )
        return itertools.islice(itertools.chain.from_iterable(passes), start, None, stride)

    def global_blocks(
        self, batch_size: int, seed: int, n_tokens: int, sizes: list[int], start: int = 0, stride: int = 1
    ) -> Iterator[list[Tensor]]:
        """The batches of `global_batches` in consecutive blocks (lists) of `sizes` batches."""
        return grouped(self.global_batches(batch_size, seed, n_tokens, start, stride), sizes)


class ArraySource(Source):
    """Rows of a tensor, numpy array or memmap, reshuffled every pass (last partial batch dropped)."""

    def __init__(self, data_ND: Tensor | np.ndarray, rows: range | None = None, on_gpu: bool = False):
        if data_ND.ndim < 2:
            raise ValueError(f"Activation array must be [n_tokens, d], got shape {tuple(data_ND.shape)}.")
        # Flatten leading dims ([B, T, d] -> [B·T, d]); a view for tensors and memmaps alike.
        self.data_ND = data_ND.reshape(-1, data_ND.shape[-1])
        self.d_in = int(self.data_ND.shape[-1])
        self.rows = rows if rows is not None else range(len(self.data_ND))
        if len(self.rows) == 0:
            raise ValueError("The activation array has no rows: pass a non-empty [n_tokens, d] array.")
        self.on_gpu = on_gpu

    def stage(self, device: torch.device, budget: float, screen: RowScreen) -> Source:
        data = self.data_ND[self.rows.start : self.rows.stop]
        resident = isinstance(data, Tensor) and data.device == device
        if not resident and len(self.rows) * self.d_in * data.dtype.itemsize > budget:
            return self
        stager = DeviceStager(device, screen)  # rows holding NaN/Inf are dropped once, here
        staged = stager.handover(*stager({"acts": data}, "the activation array"))["acts"]
        return ArraySource(staged, on_gpu=True)

    def with_held_out(self, n_tokens: int) -> tuple[Source, Source | None]:
        return self.split(n_tokens) if n_tokens > 0 else (self, None)

    def split(self, n_val: int) -> tuple[ArraySource, ArraySource]:
        """(train, held-out) with the last `n_val` rows held out."""
        if not 0 < n_val < len(self.rows):
            raise ValueError(
                f"val_tokens={n_val} must be in 1..{len(self.rows) - 1} for {len(self.rows)} rows."
            )
        cut = len(self.rows) - n_val
        return ArraySource(self.data_ND, self.rows[:cut]), ArraySource(self.data_ND, self.rows[cut:])

    def _gather(self, idx: Tensor) -> Tensor:
        if isinstance(self.data_ND, Tensor):
            return self.data_ND[idx]
        return torch.from_numpy(self.data_ND[idx.numpy()])  # fancy indexing copies: a writable array

    def _pass_indices(self, batch_size: int, seed: int) -> Tensor:
        """One pass's [n_batches, batch_size] row indices, each batch sorted (sequential-ish reads on a
        memmap; order within a batch is irrelevant), pinned when they go to a GPU."""
        if len(self.rows) < batch_size:
            raise ValueError(
                f"The activation array has {len(self.rows)} rows, fewer than "
                f"batch_size={batch_size}: lower batch_size or supply more tokens."
            )
        n = len(self.rows) // batch_size
        perm = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(seed))
        batches = perm[: n * batch_size].view(n, batch_size).sort(dim=1).values + self.rows.start
        return batches.pin_memory() if self._on_cuda() else batches

    def _on_cuda(self) -> bool:
        return isinstance(self.data_ND, Tensor) and self.data_ND.is_cuda

    def _index_batches(self, indices_BN: Tensor) -> Iterator[Tensor]:
        """A pass's index batches, moved to the GPU in one copy when the data is there."""
        if self._on_cuda():
            indices_BN = indices_BN.to(self.data_ND.device, non_blocking=True)
        yield from indices_BN

    def _index_passes(self, batch_size: int, seed: int, n_tokens: int) -> Iterator[Tensor]:
        """The index batches of passes seeded seed, seed+1, ...: each pass's shuffle (a host sort of every
        row, ~0.1 s per 2M rows) runs in a thread while the pass before it is read, so that a pass boundary
        does not stop the loop, which would drain the GPU's queue of steps. No pass past a run of `n_tokens`
        (0: not known) is shuffled ahead: its shuffle would only hold up the interpreter's exit."""
        per_pass = len(self.rows) // batch_size
        last = math.ceil(n_tokens / batch_size / per_pass) if n_tokens and per_pass else None
        pool = ThreadPoolExecutor(1, thread_name_prefix="mmsae-shuffle")
        try:
            upcoming: Future[Tensor] | None = pool.submit(self._pass_indices, batch_size, seed)
            for p in itertools.count(1):
                if upcoming is not None:
                    indices_BN = upcoming.result()
                else:  # read past the run's end: shuffled here
                    indices_BN = self._pass_indices(batch_size, seed + p - 1)
                ahead = last is None or p < last
                upcoming = pool.submit(self._pass_indices, batch_size, seed + p) if ahead else None
                yield from self._index_batches(indices_BN)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def stream(self, batch_size: int, seed: int, n_tokens: int) -> Iterator[Tensor]:
        return map(self._gather, self._index_batches(self._pass_indices(batch_size, seed)))

    def global_batches(
        self, batch_size: int, seed: int, n_tokens: int, start: int = 0, stride: int = 1
    ) -> Iterator[Tensor]:
        # Skip and stride over index batches, so resuming or sharding never reads the rows it drops.
        kept = itertools.islice(self._index_passes(batch_size, seed, n_tokens), start, None, stride)
        return map(self._gather, kept)

    def global_blocks(
        self, batch_size: int, seed: int, n_tokens: int, sizes: list[int], start: int = 0, stride: int = 1
    ) -> Iterator[list[Tensor]]:
        # One gather per block: the same rows in the same order as one gather per batch.
        kept = itertools.islice(self._index_passes(batch_size, seed, n_tokens), start, None, stride)
        for indices in grouped(kept, sizes):
            yield list(self._gather(torch.cat(indices)).split(batch_size))

    def validation_batches(self, batch_size: int, seed: int, n_tokens: int) -> list[Tensor]:
        """Every row once, in order, last batch possibly short."""
        starts = range(0, len(self.rows), batch_size)
        return [self._gather(torch.as_tensor(self.rows[i : i + batch_size])) for i in starts]


class IterableSource(Source):
    """Any iterable of [B, d] batches, re-batched to a fixed size; replayed unless a one-shot iterator."""

    def __init__(self, batches: Iterable[Tensor | np.ndarray]):
        self.batches = batches
        self.replayable = iter(batches) is not batches
        it = iter(batches)
        first = next(it, None)
        if first is None:
            raise ValueError(
                "The training data yielded no batches: pass a non-empty iterable of [B, d] tensors."
            )
        self.d_in = int(first.shape[-1])
        # A one-shot iterator cannot be restarted, so keep the batch we peeked at.
        self._pending = None if self.replayable else itertools.chain([first], it)

    def stream(self, batch_size: int, seed: int, n_tokens: int) -> Iterator[Tensor]:
        it = self._pending if self._pending is not None else iter(self.batches)
        self._pending = None
        buf: list[Tensor] = []
        held = 0
        for b in it:
            b = torch.as_tensor(b).reshape(-1, self.d_in).float()
            buf.append(b)
            held += len(b)
            while held >= batch_size:
                cat = torch.cat(buf)
                yield cat[:batch_size]
                buf, held = [cat[batch_size:]], held - batch_size


class StoreSource(Source):
    """An `ActivationStore`: it shuffles and shards its own files, and can stage its buffer on a GPU.

    Staged, a store that fits in the budget whole is loaded onto the GPU and trained as an array
    (`StagedStoreSource`): every pass a full reshuffle, the same batches as its tokens in memory. A shuffle
    buffer of part of a store only comes close to that (docs/benchmarks.md, "Activation store and
    extraction").
    """

    def __init__(
        self,
        store: ActivationStore,
        hook: str | None = None,
        staging: tuple[torch.device, RowScreen] | None = None,
    ):
        self.store, self.hook, self.staging = store, hook, staging
        self.on_gpu = staging is not None
        # A multi-hook store may hold several widths: ask for the one being trained on.
        self.d_in = int(store.dim(hook) if hook is not None else store.d_in)

    def provenance(self) -> dict[str, str]:
        return self.store.provenance(self.hook)

    def stage(self, device: torch.device, budget: float, screen: RowScreen) -> Source:
        if self.store.load_bytes(self.hook) <= budget:
            staged = self.store.load(self.hook, device, screen)  # rows holding NaN/Inf dropped once, here
            return StagedStoreSource(staged, self.store.provenance(self.hook))
        if self.store.staging_bytes(self.hook) <= budget:
            return StoreSource(self.store, self.hook, (device, screen))
        return self

    def global_batches(
        self, batch_size: int, seed: int, n_tokens: int, start: int = 0, stride: int = 1
    ) -> Iterator[Tensor]:
        tokens = self.store.token_counts()
        if (tokens[self.hook] if self.hook else sum(tokens.values())) < batch_size:
            raise _too_small(batch_size)
        # One endless stream: its shuffle buffer carries over between passes, where a new stream per pass
        # stalled the trainer while it refilled (256k tokens at the start of every pass). Stored dtype
        # (fp16/bf16): half the bytes through the buffer and the copy to the GPU; SAEModule converts to
        # fp32 on the device. Staged: the buffer lives on the GPU. Else pinned here, when every batch is
        # used, to spare the loader a second copy.
        device, screen = self.staging or (None, None)
        pin = device is None and stride == 1 and torch.cuda.is_available()
        batches = self.store.batches(
            batch_size,
            hook=self.hook,
            shuffle=True,
            seed=seed,
            dtype=None,
            epochs=None,
            pin_memory=pin,
            device=device,
            screen=screen,
        )
        yield from itertools.islice(batches, start, None, stride)

    def stream(self, batch_size: int, seed: int, n_tokens: int) -> Iterator[Tensor]:
        return _full_batches(self.store, self.hook, batch_size, seed)


class StagedStoreSource(ArraySource):
    """A store's activations loaded whole onto a GPU (`StoreSource.stage`): an array with the store's
    provenance."""

    def __init__(self, data_ND: Tensor, provenance: dict[str, str]):
        super().__init__(data_ND, on_gpu=True)
        self._provenance = provenance

    def provenance(self) -> dict[str, str]:
        return self._provenance


class StoreLikeSource(Source):
    """Any other object with `.d_in` and `.batches(batch_size, hook=, shuffle=, seed=, dtype=)` (e.g. an
    `ActivationStream`): each pass is one call of `batches`."""

    def __init__(self, store: ActivationStoreLike, hook: str | None = None):
        self.store, self.hook = store, hook
        dim = getattr(store, "dim", None)  # a multi-hook source may hold several widths
        self.d_in = int(dim(hook) if hook is not None and dim is not None else store.d_in)

    def stream(self, batch_size: int, seed: int, n_tokens: int) -> Iterator[Tensor]:
        return _full_batches(self.store, self.hook, batch_size, seed)


def _too_small(batch_size: int) -> ValueError:
    return ValueError(
        "The activation store holds fewer tokens than one batch "
        f"(batch_size={batch_size}): lower batch_size or extract more examples."
    )


def _full_batches(store: Any, hook: str | None, batch_size: int, seed: int) -> Iterator[Tensor]:
    """One shuffled pass of a store's full batches (its short last batch would break the fixed size)."""
    n_full = 0
    for b in store.batches(batch_size, hook=hook, shuffle=True, seed=seed, dtype=None):
        if len(b) == batch_size:
            n_full += 1
            yield b
    if n_full == 0:  # else every further pass would come back empty too, forever
        raise _too_small(batch_size)


class SyntheticSource(Source):
    """Sparse superpositions of known features (`mmsae.datasets.synthetic`).

    The generator's stream is a pure function of its own seed and the token position, and it never
    repeats: one pass covers any budget, and held-out tokens come from far beyond any training run.
    """

    replayable = False
    HELD_OUT_OFFSET = 2**40

    def __init__(self, generator: Any = None, offset: int = 0, **options: Any):
        self.generator = SyntheticActivations(**options) if generator is None else generator
        self.offset = offset
        self.d_in = int(self.generator.d)

    def held_out(self) -> SyntheticSource:
        return SyntheticSource(self.generator, offset=self.HELD_OUT_OFFSET)

    def with_held_out(self, n_tokens: int) -> tuple[Source, Source | None]:
        return self, self.held_out() if n_tokens > 0 else None

    def stream(self, batch_size: int, seed: int, n_tokens: int) -> Iterator[Tensor]:
        return (b.float() for b in self.generator.batches(batch_size, n_tokens, offset=self.offset))


def as_source(data: Any, hook: str | None = None) -> Source:
    """Wrap any accepted data type (see the module docstring) as a `Source`."""
    if isinstance(data, Source):
        return data
    if isinstance(data, (str, os.PathLike)):
        return StoreSource(ActivationStore(data), hook)
    if isinstance(data, ActivationStore):
        return StoreSource(data, hook)
    if isinstance(data, dict):
        if set(data) == {"synthetic"}:
            return SyntheticSource(**data["synthetic"])
        if set(data) == {"store"}:
            return as_source(data["store"], hook)
        raise ValueError(
            f"Data dict must be {{'synthetic': {{d, n_directions, seed}}}} or {{'store': path}}, "
            f"got keys {sorted(data)}."
        )
    if isinstance(data, (Tensor, np.ndarray)):
        return ArraySource(data)
    if isinstance(data, SyntheticActivations):
        return SyntheticSource(data)
    # getattr_static: a store's d_in may be a property that raises for multi-width stores.
    if callable(getattr(data, "batches", None)) and inspect.getattr_static(data, "d_in", None) is not None:
        return StoreLikeSource(data, hook)
    if isinstance(data, Iterable):
        return IterableSource(data)
    raise TypeError(
        f"Cannot train on {type(data).__name__}: pass a Tensor/ndarray/memmap of [n, d], an "
        "iterable of [B, d] batches, an activation store (or its path) or {'synthetic': {...}}."
    )


__all__ = [
    "ActivationStoreLike",
    "ArraySource",
    "IterableSource",
    "Source",
    "StoreLikeSource",
    "StoreSource",
    "SyntheticSource",
    "as_source",
]
