"""The end of a run: `last.ckpt` at the final step, so that rerunning a finished run trains nothing; and a
gloo process group closed before the interpreter exits.

Lightning writes `last.ckpt` together with the periodic checkpoints (`every_n_train_steps`), and at the end
of training only if it wrote none before. So a run whose length is not a multiple of the period ended with
`last.ckpt` at its last multiple: a rerun of the finished command (a resume, `ckpt_path="last"`) retrained
the steps after it, wrote its SAEs again and appended those steps' metric rows to a resumed CSV log a second
time. Written at the end, `last.ckpt` records a finished loop; Lightning then skips training when it resumes
from it, and nothing is written.
"""

from __future__ import annotations

import atexit
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from mmsae.sae.ranks import ddp_active


class FinalCheckpoint(L.Callback):
    """Writes the `last` checkpoint of every `ModelCheckpoint(save_last=...)` at the end of training, where it
    is older than the final step, and says so when a resumed run finds nothing left to train; attached by
    `SAEModule.configure_callbacks`.

    Only a run that ends (`on_train_end`: its data or `max_steps` done, or stopped by a callback) writes it: a
    killed or failed run keeps its last periodic checkpoint and resumes from there. The file is written as
    Lightning writes every checkpoint (`trainer.save_checkpoint`: a temporary file, then moved into place);
    one that a kill truncated anyway is named before a resume reads it (`check_readable`)."""

    def __init__(self) -> None:
        self._trained = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        close_gloo_at_exit()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._trained = True  # not called when Lightning resumes a finished loop: it skips training

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.save_last:
                save_final_last(callback, trainer)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._trained and trainer.ckpt_path is not None:
            rank_zero_info(
                f"mmsae: the run is already complete: {trainer.ckpt_path} was written at its end "
                f"(step {trainer.global_step}); nothing was trained and its SAEs were left as they are. "
                "Train into another out_dir (or delete that run's checkpoints) to train again."
            )


def save_final_last(callback: ModelCheckpoint, trainer: L.Trainer) -> None:
    """Write `callback`'s last checkpoint as it writes it after a periodic one, unless it wrote one at this
    step already (or writes none now: fast_dev_run, ...)."""
    # Lightning's own skip rules and writer: private, but what its on_train_end calls for the same file.
    if callback._should_skip_saving_checkpoint(trainer):
        return
    candidates: dict[str, Any] = callback._monitor_candidates(trainer)
    if callback.save_last == "link" and callback.monitor is None and callback.save_top_k != 0:
        # 'link' points last.ckpt at the newest top-k file: that must be of this step too.
        callback._save_topk_checkpoint(trainer, candidates)
    callback._save_last_checkpoint(trainer, candidates)


def close_gloo_at_exit() -> None:
    """Destroy a gloo process group when the interpreter exits, as Lightning does for NCCL only: left to the
    interpreter's own teardown, about one CPU DDP run in 25 aborted after its work was done ("terminate called
    without an active exception", exit status 134), which fails any script or CI job around it."""
    if ddp_active() and torch.distributed.get_backend() == "gloo":
        atexit.unregister(_destroy_group)  # once per process, however many runs it makes
        atexit.register(_destroy_group)


def _destroy_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
