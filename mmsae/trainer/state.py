"""Training state that is not the SAE: dead-feature clocks, and the run configuration a resume must match.

Both live in the Lightning checkpoint (the `SAEModule`'s buffers and its `mmsae_run` entry), never in a
published `sae.safetensors`: an SAE is its weights and its config (as in sparsify and SAELens, whose trainers
keep these counters).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from mmsae.legacy_names import module_getattr
from mmsae.sae import SAE, DeadFeatures

DEAD_COUNT_EVERY = 50
"""Steps between two host-side dead counts, at most; fewer where the dead window is shorter
(`DeadFeatureClock.count_every`), so that AuxK starts soon after the window first opens. A count comes
into force one refresh after it is taken (it is copied to the host while the GPU runs on), so AuxK sizes
itself by a count at most two refreshes old."""

DEAD_WINDOW_TOKENS = 10_000_000
"""The default dead window of long runs (Gao et al.'s 10M tokens)."""
DEAD_WINDOW_RUN_FRACTION = 1 / 64
"""The default dead window is at most this share of the run's tokens: with 10M tokens, AuxK would never act
in a run of a few million tokens, and features killed early (short runs train at a raised lr) stay dead. Short
runs keep killing features to the end, and one that dies within the last window is never revived: in 192-step
runs on DINOv2-S tokens (n = 1024, k = 16, two seeds) TopK, BatchTopK and Matryoshka kept 1.8–3.1 % of their
features dead with a 16-step window, 0.0–0.2 % with a 4-step one, at FVU within 0.3 % (docs/benchmarks.md,
"Every variant at a CPU size")."""
DEAD_WINDOW_MIN_STEPS = 4
"""... and at least this many optimizer steps: a feature idle for fewer batches may just be rare."""


def default_dead_window(
    run_tokens: int, step_tokens: int, run_fraction: float = DEAD_WINDOW_RUN_FRACTION
) -> int:
    """The dead window (tokens) of an SAE whose config leaves `dead_tokens` unset: 10M, or `run_fraction` (a
    64th) of the run where that is less, but never under 4 steps of `step_tokens`."""
    scaled = min(DEAD_WINDOW_TOKENS, int(run_tokens * run_fraction))
    return max(scaled, DEAD_WINDOW_MIN_STEPS * step_tokens)


THRESHOLD_HORIZON_STEPS = 100
"""The longest EMA horizon of a BatchTopK θ whose config leaves `threshold_decay` unset."""


def threshold_decay_for_run(total_steps: int, decay_steps: int) -> float:
    """θ's EMA decay for a run of `total_steps` whose lr decays over its last `decay_steps`: a horizon of half
    that phase (a tenth of the run without one), 1 to 100 steps. θ then averages the batches of the nearly
    final weights instead of the larger scores of early training: a 100-step horizon in a 120-step run left
    held-out L0 at 60 % of k on DINOv2-S tokens."""
    horizon = max(1.0, min(THRESHOLD_HORIZON_STEPS, max(decay_steps, total_steps // 10) / 2))
    return 1.0 - 1.0 / horizon


def fit_to_run(
    saes: Iterable[SAE],
    clocks: Iterable[DeadFeatureClock],
    total_steps: int,
    decay_steps: int,
    step_tokens: int | None,
) -> None:
    """Scale each default dead window (`default_dead_window`), BatchTopK θ horizon
    (`threshold_decay_for_run`) and an SAE's own run-length defaults (its `fit_to_run`, if any: ReLU and
    Gated's `target_l0` controller) to a run of `total_steps` steps of `step_tokens` tokens (None: unknown);
    the SAE's cfg records them."""
    for sae, clock in zip(saes, clocks):
        clock.fit_to_run(total_steps, step_tokens, sae.dead_window_run_fraction or DEAD_WINDOW_RUN_FRACTION)
        sae.cfg.dead_tokens = clock.dead_tokens
        if getattr(sae.cfg, "threshold_decay", 0.0) is None:
            sae.cfg.threshold_decay = threshold_decay_for_run(total_steps, decay_steps)
        sae.fit_to_run(total_steps)


class DeadFeatureClock(nn.Module):
    """Tokens since each feature of one SAE last fired; a feature idle for `dead_tokens` tokens is dead.

    `dead_tokens=None` (the SAE config's default) is `DEAD_WINDOW_TOKENS` until the trainer knows the run's
    length and calls `fit_to_run` (`default_dead_window`). The clock is float64, so DDP all-reduce and bf16
    never matter. The trainer advances it every step and calls `refresh_count` every `count_every` steps; the
    mask itself is always current, and the host-side count that sizes AuxK (`count`) is the one taken at the
    refresh before: it reaches the host by an asynchronous copy, so the host never waits for the GPU for it
    (a wait drains the GPU's queue, which then idles through the host's loop: with a refresh every 9 steps
    the trainer ran at 0.77 of its own graphed step at batch 4096 on an H200, without the wait at 0.86;
    docs/benchmarks.md "Trainer throughput").
    """

    def __init__(self, n_features: int, dead_tokens: int | None = None):
        super().__init__()
        self.explicit = dead_tokens is not None
        self.dead_tokens = DEAD_WINDOW_TOKENS if dead_tokens is None else dead_tokens
        self.count_every = DEAD_COUNT_EVERY
        self.register_buffer("tokens_since_fired", torch.zeros(n_features, dtype=torch.float64))
        # The count in force and the one taken at the last refresh (−1: none yet), both checkpointed: a
        # resumed run sizes AuxK with the counts the uninterrupted run was using, so it continues exactly.
        self.register_buffer("count_in_force", torch.full((), -1, dtype=torch.int64))
        self.register_buffer("count_taken", torch.full((), -1, dtype=torch.int64))
        self._count: int | None = None
        self._taken_host: Tensor | None = None  # count_taken on its way to the host (pinned on CUDA)
        self._taken_copied: torch.cuda.Event | None = None

    def fit_to_run(
        self, run_steps: int, step_tokens: int | None, run_fraction: float = DEAD_WINDOW_RUN_FRACTION
    ) -> None:
        """Scale the window to a run of `run_steps` steps of `step_tokens` tokens (None: unknown, the window
        stays) and `run_fraction` (`default_dead_window`); an explicit `dead_tokens` is kept. Counts are
        refreshed at least four times per window, so the count in force is at most half a window old."""
        if not self.explicit and step_tokens is not None:
            self.dead_tokens = default_dead_window(run_steps * step_tokens, step_tokens, run_fraction)
        if step_tokens is not None:
            window_steps = math.ceil(self.dead_tokens / step_tokens)
            self.count_every = max(1, min(DEAD_COUNT_EVERY, window_steps // 4))

    def mask(self) -> Tensor:
        return self.tokens_since_fired >= self.dead_tokens

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        self._count, self._taken_host, self._taken_copied = None, None, None  # the loaded counts rule

    def count(self) -> int:
        """The dead count in force, on the host (read from the device once, after a resume)."""
        if self._count is None:
            self._count = int(self.count_in_force)
            if self._count < 0:  # nothing in force yet (a new clock): count now
                self._count = int(self.mask().sum())
                self.count_in_force.fill_(self._count)
        return self._count

    def refresh_count(self) -> None:
        """Bring the count taken at the previous refresh into force and take a new one, whose copy to the
        host runs behind the GPU's queue. Waiting for the previous copy does not drain the queue: the GPU
        passed that point `count_every` steps ago, or the host is that far ahead of it."""
        if self._taken_host is not None:
            if self._taken_copied is not None:
                self._taken_copied.synchronize()
            taken = int(self._taken_host)
        else:  # a new clock or a resumed one: the taken count is read from the device once
            taken = int(self.count_taken)
        self._count = self.count() if taken < 0 else taken
        self.count_in_force.fill_(self._count)
        self.count_taken.copy_(self.mask().sum())
        if self.count_taken.is_cuda:
            if self._taken_host is None or self._taken_copied is None:
                self._taken_host = torch.empty((), dtype=torch.int64, pin_memory=True)
                self._taken_copied = torch.cuda.Event()
            self._taken_host.copy_(self.count_taken, non_blocking=True)
            self._taken_copied.record()
        else:
            self._taken_host, self._taken_copied = self.count_taken.clone(), None

    def dead(self) -> DeadFeatures:
        """What an SAE's `loss` reads."""
        return DeadFeatures(self.mask(), self.count())

    @torch.no_grad()
    def update(self, fired_N: Tensor, n_tokens: int | Tensor) -> None:
        """Advance the clock by `n_tokens` and reset features in `fired_N` ([n] bool)."""
        # masked_fill_, not clock[fired] = 0: boolean indexing sizes its result on the host (a stream sync,
        # and illegal inside a CUDA graph capture).
        self.tokens_since_fired.add_(n_tokens).masked_fill_(fired_N, 0)


# Hyperparameters that only say where or how fast a run goes, not what it trains: a resume may change them.
RESUMABLE = frozenset({"out_dir", "cuda_graphs", "init_batches", "steps_per_iteration"})


def run_config(hparams: dict[str, Any]) -> dict[str, Any]:
    """The settings that define what a run trains (a resume must match them), as plain JSON-able values."""
    return {k: v for k, v in hparams.items() if k not in RESUMABLE}


def check_resume(saved: dict[str, Any], now: dict[str, Any], checkpoint: str | Path | None) -> None:
    """Refuse to resume a checkpoint of another configuration: name each differing setting and the way out."""
    old, new = _flatten(saved), _flatten(now)
    diffs = [
        f"{name}: checkpoint {old.get(name, '(unset)')!r}, now {new.get(name, '(unset)')!r}"
        for name in sorted(set(old) | set(new))
        if old.get(name, "(unset)") != new.get(name, "(unset)")
    ]
    if diffs:
        where = f" {checkpoint}" if checkpoint else ""
        raise ValueError(
            f"The checkpoint{where} belongs to a run with another configuration ("
            + "; ".join(diffs)
            + "). Train into another out_dir, or delete that run's checkpoints to start over; to resume it, "
            "rerun with its settings."
        )


def upgrade_checkpoint(checkpoint: dict[str, Any], n_saes: int) -> None:
    """Rewrite, in place, a Lightning checkpoint of an earlier version, which kept the dead-feature clocks on
    the SAEs and stepped under Lightning's automatic optimisation, into the present layout."""
    state = checkpoint["state_dict"]
    for i in range(n_saes):
        legacy = state.pop(f"saes.{i}.tokens_since_fired", None)
        if legacy is not None:
            state.setdefault(f"clocks.{i}.tokens_since_fired", legacy)
        for buffer in ("count_in_force", "count_taken"):
            state.setdefault(f"clocks.{i}.{buffer}", torch.full((), -1, dtype=torch.int64))
    loop = checkpoint.get("loops", {}).get("fit_loop", {})
    automatic = loop.get("epoch_loop.automatic_optimization.optim_progress", {}).get("optimizer", {})
    manual = loop.get("epoch_loop.manual_optimization.optim_step_progress")
    if manual is not None and "step" in automatic and manual["total"]["completed"] == 0:
        # The optimizer steps taken so far (global_step) are counted by the manual loop now.
        loop["epoch_loop.manual_optimization.optim_step_progress"] = automatic["step"]


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{'saes': [{'k': 4}]} → {'saes[0].k': 4}: a difference is named by the setting, not its section."""
    if isinstance(value, dict):
        items = [(f"{prefix}.{k}" if prefix else str(k), v) for k, v in value.items()]
    elif isinstance(value, list):
        items = [(f"{prefix}[{i}]", v) for i, v in enumerate(value)]
    else:
        return {prefix: value}
    flat: dict[str, Any] = {}
    for name, v in items:
        flat.update(_flatten(v, name) if isinstance(v, (dict, list)) else {name: v})  # {} adds nothing
    return flat


def check_readable(ckpt_path: str | Path) -> None:
    """Fail early, naming the file and the fix, when a checkpoint to resume from cannot be read (a kill while
    Lightning wrote it leaves a truncated file)."""
    path = Path(ckpt_path)
    if not path.is_file():
        return  # Lightning reports a missing path itself
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated zip, bad pickle stream, ...: all mean the file is unusable
        raise ValueError(
            f"Cannot resume from {path}: the checkpoint is truncated or corrupt ({type(e).__name__}: "
            f"{str(e).splitlines()[0]}); a kill while it was written? Delete it and resume from another "
            f"checkpoint in {path.parent} (`--ckpt_path PATH`; `--ckpt_path last` and `mmsae.train` take the "
            f"newest readable one themselves), or delete {path.parent} to start the run over."
        ) from e


def resume_point(last: Path) -> str:
    """What a rerun into a run's folder resumes from, given where its last checkpoint is written: "last" (a
    new run where there is none) or, where a kill truncated it, the newest readable checkpoint beside it,
    with a warning."""
    try:
        check_readable(last)
        return "last"
    except ValueError as unreadable:
        others = [p for p in last.parent.glob("*.ckpt") if p.name != last.name]
        for path in sorted(others, key=lambda p: p.stat().st_mtime_ns, reverse=True):
            try:
                check_readable(path)
            except ValueError:
                continue
            rank_zero_warn(
                f"mmsae: {last} is truncated or corrupt (a kill while it was written?): resuming from "
                f"{path}, the newest readable checkpoint; the steps after it are trained again."
            )
            return str(path)
        raise unreadable


__getattr__ = module_getattr(__name__)  # old public names (mmsae.legacy_names)
