"""Training metrics written to the loggers without a host sync (`SAEModule`'s logging steps).

A host read of a GPU value (`.cpu()`, `.item()`) drains the GPU's queue, and the GPU then idles for the
host's loop time (~1–2 ms per read on an H200, against ~0.8 ms per training step): Lightning reads every
tensor given to `log_dict` with `.item()` when it writes its loggers. So on a logging step the metrics are
stacked into one tensor and copied to pinned host memory asynchronously, with an event recorded after the
copy, and read on the host later, when the copy is certainly done: at the next logging step (the GPU is then a
logging period past the event, so waiting on it drains nothing), before a checkpoint is written or a
validation runs (both read the GPU anyway; so a resume loses no row, and rows stay in step order), and at
the end of training, before Lightning closes the loggers. Each row is written under the step the metrics were
computed at, with Lightning's `epoch` column. On CPU the copy is immediate and the same code runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import Tensor


@dataclass
class _Copy:
    """The metrics of one logging step, on their way to the host."""

    step: int
    epoch: int
    names: list[str]
    values: Tensor  # on the host; pinned when copied from a GPU
    done: torch.cuda.Event | None  # recorded after the copy (None: copied from host memory, done)


class DeferredMetrics(L.Callback):
    """The training metrics of the last logging step, copied to the host without a sync and written to the
    loggers later (see the module docstring); attached by `SAEModule.configure_callbacks`."""

    def __init__(self, progress_bar: str | None = None) -> None:
        self.progress_bar = progress_bar  # the metric shown as 'fvu' in the progress bar
        self._pending: _Copy | None = None

    def record(self, module: L.LightningModule, metrics: dict[str, Tensor], step: int) -> None:
        """Start copying `metrics` (scalars computed at optimizer step `step`) to the host, once those of the
        previous logging step are written; show those in the progress bar. Call from `training_step`."""
        written = self.flush(module.trainer)
        if self.progress_bar in written:  # a host tensor: Lightning reads it with .item() on every step
            module.log("fvu", written[self.progress_bar], prog_bar=True, logger=False)
        device_values = torch.stack([v.detach().float() for v in metrics.values()])
        on_gpu = device_values.is_cuda
        values = torch.empty(device_values.shape, dtype=device_values.dtype, pin_memory=on_gpu)
        values.copy_(device_values, non_blocking=on_gpu)
        done = torch.cuda.Event() if on_gpu else None
        if done is not None:
            done.record(torch.cuda.current_stream(device_values.device))  # the stream that copies
        self._pending = _Copy(step, module.current_epoch, list(metrics), values, done)

    def flush(self, trainer: L.Trainer) -> dict[str, Tensor]:
        """Write the pending metrics to the trainer's loggers, `logged_metrics` and `callback_metrics`, after
        their copy (long done, except at the end of training); returns them as host scalars ({}: none)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return {}
        if pending.done is not None:
            pending.done.synchronize()  # this event only, not the stream: later steps keep running
        row = dict(zip(pending.names, pending.values.tolist(), strict=True))
        for logger in trainer.loggers:
            logger.log_metrics({**row, "epoch": pending.epoch}, step=pending.step)  # as Lightning writes
            logger.save()
        scalars = dict(zip(pending.names, pending.values.unbind(), strict=True))
        # Tensors, as `self.log` would have left them there.
        trainer.logged_metrics.update(scalars)
        trainer.callback_metrics.update(scalars)
        return scalars

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.flush(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: Any) -> None:
        self.flush(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.flush(trainer)
