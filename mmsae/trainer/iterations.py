"""Several optimizer steps per Lightning loop iteration (`SAEModule(steps_per_iteration=...)`).

Lightning's loop around each batch (fetching it, callback and logger hooks, progress bar, loop bookkeeping)
costs ~0.3–0.4 ms of host time. Next to a training step replayed as one CUDA graph (~1 ms at d=768,
batch 4096 on an H200) that is a quarter of the trainer's time. So `SAEDataModule` can hand Lightning
blocks of K consecutive batches, and `SAEModule.training_step` runs K optimizer steps on one block: the loop
is paid once per K steps, and what is trained does not change (same batches in the same order, one
`global_step`, scheduler step and dead-clock update per optimizer step, metrics on the same steps).

Blocks end on multiples of K (and at the end of the run), so whatever Lightning does at the end of an
iteration lands on the same steps as with K=1 as long as K divides its period: checkpoints
(`ModelCheckpoint(every_n_train_steps=...)`), log writes (`log_every_n_steps`) and `max_steps`.
`choose_steps_per_iteration` picks such a K, or checks a requested one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor

MAX_AUTO_STEPS = 16
"""The largest K chosen automatically: 16 steps already cut the loop's share to a few percent."""


def step_periods(trainer: L.Trainer) -> dict[str, int]:
    """The periods, in optimizer steps, at which Lightning acts at the end of a loop iteration."""
    periods = {}
    if trainer.log_every_n_steps > 0:
        periods["log_every_n_steps"] = trainer.log_every_n_steps
    for i, callback in enumerate(trainer.checkpoint_callbacks):
        every = getattr(callback, "_every_n_train_steps", 0) if isinstance(callback, ModelCheckpoint) else 0
        if every > 0:
            periods[f"every_n_train_steps of checkpoint callback {i}"] = every
    if trainer.max_steps > 0:
        periods["max_steps"] = trainer.max_steps
    return periods


def _validates_mid_epoch(trainer: L.Trainer) -> bool:
    """Lightning counts `val_check_interval` in loop iterations: it would validate K times more rarely."""
    interval = trainer.val_check_interval
    return isinstance(interval, int) or interval < 1.0


def choose_steps_per_iteration(requested: int | None, trainer: L.Trainer, graphs: bool, blocks: bool) -> int:
    """K for this run: `requested`, checked, or (None) the largest K ≤ `MAX_AUTO_STEPS` that divides every
    period of `step_periods` where it pays (`graphs`: steps replayed as CUDA graphs, whose host time is then
    mostly Lightning's loop; an eager step launches ~6 ms of Python (`mmsae.trainer.graphs`), next to which
    the loop is small, so K=1 there). `blocks`: whether the data comes from an `SAEDataModule`, the only
    loader that makes blocks."""
    periods = step_periods(trainer)
    if requested is None:
        if not (graphs and blocks) or _validates_mid_epoch(trainer):
            return 1
        common = math.gcd(*periods.values()) if periods else 0
        return max(k for k in range(1, MAX_AUTO_STEPS + 1) if common % k == 0)
    if requested == 1:
        return 1
    if not blocks:
        raise ValueError(
            f"steps_per_iteration={requested} needs an SAEDataModule (it hands Lightning blocks of batches); "
            "with another loader pass steps_per_iteration=1 or None."
        )
    for name, period in periods.items():
        if period % requested:
            divisors = [k for k in range(1, min(period, MAX_AUTO_STEPS) + 1) if period % k == 0]
            raise ValueError(
                f"steps_per_iteration={requested} does not divide {name}={period}: Lightning acts on it at "
                f"the end of a loop iteration, which then falls on other steps. Pass a divisor of {period} "
                f"(e.g. {divisors[-1]}) or None (chosen automatically)."
            )
    if _validates_mid_epoch(trainer):
        raise ValueError(
            f"steps_per_iteration={requested} with val_check_interval={trainer.val_check_interval}: "
            "Lightning counts that interval in loop iterations, not steps: pass steps_per_iteration=1 or "
            "None."
        )
    return requested


def check_steps_per_iteration(value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"steps_per_iteration={value!r} must be a positive integer or None (automatic).")


def check_resumed_steps(saved: int, requested: int | None, checkpoint: Any) -> None:
    """A resumed run keeps the K of its checkpoint: Lightning counts the loop progress in it in iterations of
    K."""
    if requested is not None and requested != saved:
        raise ValueError(
            f"The checkpoint {checkpoint} was trained with steps_per_iteration={saved} (Lightning's progress "
            f"in it counts those iterations): resume with steps_per_iteration={saved} or None, "
            f"not {requested}."
        )


def block_sizes(start: int, n_batches: int, k: int) -> list[int]:
    """Batches per block, from batch `start` to `n_batches`, blocks ending on multiples of `k` and at the
    end: a run resumed at any step has the same block ends as one that never stopped."""
    ends = [*range((start // k + 1) * k, n_batches, k), n_batches] if start < n_batches else []
    return [end - begin for begin, end in zip([start, *ends], ends)]


def n_blocks(n_batches: int, k: int) -> int:
    return math.ceil(n_batches / k)


def grouped(items: Iterator[Any], sizes: list[int]) -> Iterator[list[Any]]:
    """`items` as lists of `sizes` items (fewer at the end if `items` runs out), never reading past them."""
    for size in sizes:
        group = [item for _, item in zip(range(size), items)]
        if not group:
            return
        yield group


def run_steps(trainer: L.Trainer, k: int) -> int:
    """Optimizer steps of the run (what `trainer.estimated_stepping_batches` counts with one step per loop
    iteration): the steps of the iterations Lightning runs per epoch, times the epochs, at most max_steps."""
    iterations = trainer.estimated_stepping_batches  # sets up the loader: num_training_batches is known
    if k == 1:
        return int(iterations)
    steps_per_epoch = trainer.train_dataloader.n_batches  # a `TokenBudget`: K > 1 needs an SAEDataModule
    per_epoch = min(int(trainer.num_training_batches) * k, steps_per_epoch)
    total = per_epoch * max(trainer.max_epochs, 1)
    return min(total, trainer.max_steps) if trainer.max_steps != -1 else total


def count_replayed_step(optimizer: Any) -> None:
    """What `LightningOptimizer.step` counts (global_step), for a graph replay: its Python ran only at
    capture."""
    optimizer._on_before_step()
    optimizer._on_after_step()


def count_inner_step(trainer: L.Trainer) -> None:
    """Lightning counts the steps its loggers label rows with (`_batches_that_stepped`) once per iteration,
    after it: each step of a block but the last counts itself, so rows keep the step labels of K=1."""
    trainer.fit_loop.epoch_loop._batches_that_stepped += 1


def as_batches(batch: Tensor | list[Tensor]) -> list[Tensor]:
    """The batches of one loop iteration: a block (a list) or one batch."""
    return batch if isinstance(batch, list) else [batch]
