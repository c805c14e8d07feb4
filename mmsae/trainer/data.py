"""Training data for SAEs: anything that yields [B, d] activations, cut to a fixed token budget.

Accepted sources (`as_source`):
- a torch Tensor, numpy array or `np.memmap` of shape [..., d] (reshuffled every pass),
- any iterable of [B, d] batches (re-batched to the requested batch size),
- an `mmsae.store.ActivationStore`, or a path to one (the store directory, or the out_dir an
  extraction wrote it into),
- any other store-like object with `.d_in` and `.batches(batch_size, hook=None, shuffle=True, seed=0)`
  (e.g. `mmsae.store.ActivationStream`),
- a dict `{"synthetic": {"d": ..., "n_features": ..., "seed": ...}}` building
  `mmsae.datasets.synthetic.SyntheticActivations` lazily, so YAML configs can ask for it
  (or `{"store": path}`), or a `SyntheticActivations` itself.

Each becomes a `Source`, the one interface through which the trainer reads data.
`SAEDataModule` turns a source into a `DataLoader` over `TokenBudget`, an IterableDataset that yields
exactly `tokens // (batch_size · world_size)` batches per rank, takes every world_size-th batch of one
global stream (so DDP ranks never see the same batch) and skips the batches already trained on when a
run resumes from a checkpoint.
"""

from __future__ import annotations

import inspect
import itertools
import math
import os
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from mmsae.datasets.synthetic import SyntheticActivations
from mmsae.staging import DeviceStager, RowScreen, stage_budget
from mmsae.store import ActivationStore, prefetch


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

    def _index_batches(self, batch_size: int, seed: int) -> Iterator[Tensor]:
        """One pass's index batches, each sorted (sequential-ish reads on a memmap; order within a batch is
        irrelevant); moved to the GPU in one copy when the data is there."""
        if len(self.rows) < batch_size:
            raise ValueError(
                f"The activation array has {len(self.rows)} rows, fewer than "
                f"batch_size={batch_size}: lower batch_size or supply more tokens."
            )
        n = len(self.rows) // batch_size
        perm = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(seed))
        batches = perm[: n * batch_size].view(n, batch_size).sort(dim=1).values + self.rows.start
        if isinstance(self.data_ND, Tensor) and self.data_ND.is_cuda:
            batches = batches.pin_memory().to(self.data_ND.device, non_blocking=True)
        yield from batches

    def stream(self, batch_size: int, seed: int, n_tokens: int) -> Iterator[Tensor]:
        return map(self._gather, self._index_batches(batch_size, seed))

    def global_batches(
        self, batch_size: int, seed: int, n_tokens: int, start: int = 0, stride: int = 1
    ) -> Iterator[Tensor]:
        # Skip and stride over index batches, so resuming or sharding never reads the rows it drops.
        passes = (self._index_batches(batch_size, seed + p) for p in itertools.count())
        kept = itertools.islice(itertools.chain.from_iterable(passes), start, None, stride)
        return map(self._gather, kept)

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
    """An `ActivationStore`: it shuffles and shards its own files, and can stage its buffer on a GPU."""

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
        if self.store.staging_bytes(self.hook) > budget:
            return self
        return StoreSource(self.store, self.hook, (device, screen))

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
            f"Data dict must be {{'synthetic': {{d, n_features, seed}}}} or {{'store': path}}, "
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


class TokenBudget(IterableDataset):
    """One rank's share of a fixed token budget: `len(self)` batches of [batch_size, d]."""

    def __init__(
        self,
        source: Source,
        batch_size: int,
        n_batches: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
        screen: RowScreen | None = None,
    ):
        self.source, self.batch_size, self.n_batches = source, batch_size, n_batches
        self.seed, self.rank, self.world_size, self.start = seed, rank, world_size, start
        self.screen = screen or RowScreen()

    def __len__(self) -> int:
        return self.n_batches

    # Lightning checks loaders for these to know that a mid-epoch resume continues where it stopped. The
    # position itself travels in SAEDataModule's state (restored before this loader is built, as `start`).
    def state_dict(self) -> dict[str, int]:
        return {}

    def load_state_dict(self, state: dict[str, int]) -> None:
        pass

    def __iter__(self) -> Iterator[Tensor]:
        n_tokens = self.n_batches * self.batch_size * self.world_size
        first = self.start * self.world_size + self.rank
        stream = self.source.global_batches(self.batch_size, self.seed, n_tokens, first, self.world_size)
        batches = itertools.islice(stream, self.n_batches - self.start)
        if self.source.on_gpu:  # screened when staged; its shard reads and copies run in a thread of its own
            return batches
        batches = (self.screen(b, f"batch {i + self.start}") for i, b in enumerate(batches))
        if torch.cuda.is_available():  # pinned host memory: Lightning's copy to the GPU is then asynchronous
            batches = (b.pin_memory() if b.device.type == "cpu" else b for b in batches)
        # Gathering, screening, shard reads and pinning run in a thread, overlapping the GPU step. (Eight
        # batches ahead measured no better on the H100 machine: store/memory training 0.71 vs 0.87 with two.)
        return prefetch(batches, depth=2)


def first_batches(loader: Iterable[Tensor], n_batches: int, rows: int, device: torch.device) -> list[Tensor]:
    """The loader's first `n_batches` batches on `device`, and more until they hold ≥ `rows` rows (or it
    ends): the sample a trainer's data-dependent init reads (input scale, b_dec, e.g. archetypal anchors)."""
    batches: list[Tensor] = []
    for batch_BD in loader:
        batches.append(batch_BD.to(device))
        if len(batches) >= n_batches and sum(map(len, batches)) >= rows:
            break
    return batches


class SAEDataModule(L.LightningDataModule):
    """Training and held-out activations for `SAEModule`.

    Args:
        source: the training data (see `as_source`); a path opens an `mmsae.store.ActivationStore`.
        tokens: training token budget over all devices; the run is exactly this many tokens long.
        batch_size: tokens per batch per device.
        hook: hook point to read from a multi-hook store; also recorded in the SAE config.
        val_source: held-out data for `validate`; None holds out `val_tokens` rows of an array source
            or draws `val_tokens` fresh tokens from a synthetic source.
        val_tokens: held-out tokens when `val_source` is None (0 = no validation data).
        seed: shuffling seed (pass p of the data uses seed + p).
        stage: keep the training data on the training GPU (`mmsae.staging`): an array whole, a store's
            shuffle buffer. None = when it fits in a quarter of the GPU's free memory, True = always,
            False = never (batches are gathered on the host and copied each step).

    Batches come out with their non-finite (NaN/Inf) rows dropped, counted in `screen.dropped`.
    """

    def __init__(
        self,
        source: Any,
        tokens: int = 10_000_000,
        batch_size: int = 4096,
        hook: str | None = None,
        val_source: Any = None,
        val_tokens: int = 0,
        seed: int = 0,
        stage: bool | None = None,
    ):
        super().__init__()
        if batch_size <= 0 or tokens <= 0:
            raise ValueError(f"tokens ({tokens}) and batch_size ({batch_size}) must be positive.")
        self.tokens, self.batch_size, self.hook, self.seed = tokens, batch_size, hook, seed
        self.val_tokens, self.stage = val_tokens, stage
        self.screen = RowScreen()  # rows dropped this run (SAEModule logs them as train/skipped_rows)
        self._staged: tuple[torch.device, Source] | None = None
        self._resume_batches = 0  # global batches already trained on (set when resuming)
        self.train_source = as_source(source, hook)
        self.val_source = None if val_source is None else as_source(val_source, hook)
        if self.val_source is None:
            self.train_source, self.val_source = self.train_source.with_held_out(val_tokens)
        if self.val_source is not None and self.val_source.d_in != self.d_in:
            raise ValueError(f"val_source has d={self.val_source.d_in}, the training data d={self.d_in}.")

    @property
    def d_in(self) -> int:
        return self.train_source.d_in

    def provenance(self) -> dict[str, str]:
        return self.train_source.provenance()

    def train_dataloader(self) -> TokenBudget:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        n_batches = self.tokens // (self.batch_size * world)
        if n_batches == 0:
            raise ValueError(
                f"tokens={self.tokens} is less than one batch ({self.batch_size} × {world} devices)."
            )
        start = min(self._resume_batches // world, n_batches)
        device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
        dataset = TokenBudget(
            self._train_source_on(device),
            self.batch_size,
            n_batches,
            self.seed,
            rank,
            world,
            start,
            self.screen,
        )
        # The dataset itself, not a DataLoader around it: batches are already made (and prefetched in a
        # thread), and Lightning would warn that a sized IterableDataset under a DataLoader can have a wrong
        # length with several workers.
        return dataset

    def _train_source_on(self, device: torch.device) -> Source:
        """The training source, staged on `device` if allowed and it fits (decided once per device)."""
        if self._staged is None or self._staged[0] != device:
            budget = stage_budget(device, self.stage)
            source = self.train_source.stage(device, budget, self.screen) if budget > 0 else self.train_source
            self._staged = (device, source)
        return self._staged[1]

    # Lightning restores datamodule state before it builds the train loader (the trainer's step is
    # restored only later), so the stream position on resume travels here.
    def state_dict(self) -> dict[str, int]:
        world = self.trainer.world_size if self.trainer else 1
        return {"batches_done": int(self.trainer.global_step * world) if self.trainer else 0}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume_batches = int(state["batches_done"])

    def val_dataloader(self) -> DataLoader | list:
        if self.val_source is None:
            if self.trainer is not None and self.trainer.state.fn == "fit":
                return []  # fitting without held-out data: no validation loop
            raise ValueError(
                "No validation data: set val_source, or val_tokens > 0 with an array or "
                "synthetic source (e.g. --data.val_tokens 65536)."
            )
        batches = self.val_source.validation_batches(self.batch_size, self.seed, self.val_tokens)
        if not batches:
            raise ValueError("The validation data yielded no batches: check val_source / val_tokens.")
        screen = RowScreen()
        batches = [screen(b, f"validation batch {i}") for i, b in enumerate(batches)]
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        return DataLoader(batches[rank::world], batch_size=None)
