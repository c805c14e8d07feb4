"""Training data for SAEs: anything that yields [B, d] activations, cut to a fixed token budget.

`mmsae.trainer.sources.as_source` turns every accepted kind of data into a `Source`.
`SAEDataModule` turns a source into a `DataLoader` over `TokenBudget`, an IterableDataset that yields
exactly `tokens // (batch_size · world_size)` batches per rank, takes every world_size-th batch of one
global stream (so DDP ranks never see the same batch) and skips the batches already trained on when a
run resumes from a checkpoint. With `steps_per_iteration` = K > 1 it yields them as lists of K consecutive
batches (`mmsae.trainer.iterations`), one per Lightning loop iteration.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from mmsae.staging import RowScreen, stage_budget
from mmsae.store import prefetch
from mmsae.trainer.iterations import as_batches, block_sizes, n_blocks
from mmsae.trainer.sources import (
    ActivationStoreLike,
    ArraySource,
    IterableSource,
    Source,
    StoreLikeSource,
    StoreSource,
    SyntheticSource,
    as_source,
)


class TokenBudget(IterableDataset):
    """One rank's share of a fixed token budget: `n_batches` batches of [batch_size, d], one per item, or
    with `steps_per_iteration` = K > 1 in blocks (lists) of K, ending on multiples of K: `len(self)` items."""

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
        steps_per_iteration: int = 1,
    ):
        self.source, self.batch_size, self.n_batches = source, batch_size, n_batches
        self.seed, self.rank, self.world_size, self.start = seed, rank, world_size, start
        self.screen = screen or RowScreen()
        self.steps_per_iteration = steps_per_iteration

    def __len__(self) -> int:
        return n_blocks(self.n_batches, self.steps_per_iteration)

    # Lightning checks loaders for these to know that a mid-epoch resume continues where it stopped. The
    # position itself travels in SAEDataModule's state (restored before this loader is built, as `start`).
    def state_dict(self) -> dict[str, int]:
        return {}

    def load_state_dict(self, state: dict[str, int]) -> None:
        pass

    def __iter__(self) -> Iterator[Tensor] | Iterator[list[Tensor]]:
        n_tokens = self.n_batches * self.batch_size * self.world_size
        first = self.start * self.world_size + self.rank
        if self.steps_per_iteration > 1:
            return self._blocks(n_tokens, first)
        stream = self.source.global_batches(self.batch_size, self.seed, n_tokens, first, self.world_size)
        batches = itertools.islice(stream, self.n_batches - self.start)
        if self.source.on_gpu:  # screened when staged; its shard reads and copies run in a thread of its own
            return batches
        batches = (self._on_host(b, i + self.start) for i, b in enumerate(batches))
        # Gathering, screening, shard reads and pinning run in a thread, overlapping the GPU step. (Eight
        # batches ahead measured no better on the H100 machine: store/memory training 0.71 vs 0.87 with two.)
        return prefetch(batches, depth=2)

    def _blocks(self, n_tokens: int, first: int) -> Iterator[list[Tensor]]:
        sizes = block_sizes(self.start, self.n_batches, self.steps_per_iteration)
        blocks = self.source.global_blocks(
            self.batch_size, self.seed, n_tokens, sizes, first, self.world_size
        )
        if self.source.on_gpu:
            return blocks
        starts = itertools.accumulate([self.start, *sizes])
        blocks = ([self._on_host(b, i) for i, b in enumerate(block, s)] for s, block in zip(starts, blocks))
        return prefetch(blocks, depth=1)  # a block already holds K batches: one ahead is K ahead

    def _on_host(self, batch_BD: Tensor, index: int) -> Tensor:
        batch_BD = self.screen(batch_BD, f"batch {index}")
        if torch.cuda.is_available() and batch_BD.device.type == "cpu":
            return (
                batch_BD.pin_memory()
            )  # pinned host memory: Lightning's copy to the GPU is then asynchronous
        return batch_BD


def first_batches(
    loader: Iterable[Tensor | list[Tensor]], n_batches: int, rows: int, device: torch.device
) -> list[Tensor]:
    """The loader's first `n_batches` batches on `device`, and more until they hold ≥ `rows` rows (or it
    ends): the sample a trainer's data-dependent init reads (input scale, b_dec, e.g. archetypal anchors)."""
    batches: list[Tensor] = []
    for batch_BD in itertools.chain.from_iterable(map(as_batches, loader)):  # a block: its batches
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
        stage: keep the training data on the training GPU (`mmsae.staging`): an array whole, a store whole
            (then trained as an array) or else its shuffle buffer. None = when it fits in a quarter of the
            GPU's free memory, True = always, False = never (batches are gathered on the host and copied
            each step).

    Batches come out with their non-finite (NaN/Inf) rows dropped, counted in `screen.dropped`. They come
    one per loader item, or in blocks of `steps_per_iteration` (a list per item), which `SAEModule` sets
    for the run (its `steps_per_iteration`).
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
        self.steps_per_iteration = 1
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
            self.steps_per_iteration,
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


__all__ = [  # the sources live in mmsae.trainer.sources and stay importable from here
    "ActivationStoreLike",
    "ArraySource",
    "IterableSource",
    "SAEDataModule",
    "Source",
    "StoreLikeSource",
    "StoreSource",
    "SyntheticSource",
    "TokenBudget",
    "as_source",
    "first_batches",
]
