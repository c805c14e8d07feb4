"""Moving training activations onto the GPU ahead of the trainer, so that the host only reads them.

Shuffling on the host costs two random-access copies per token (into a shuffle buffer and out of it into a
batch) plus the copy to the GPU, all on a CPU that also runs the training loop; at the trainer's speed
(1–2 M tokens/s of 1.5 KB each) that alone limited it. Staged data is instead copied to the GPU in large
sequential pieces, from a loader thread, on a CUDA stream of its own (so the copies overlap training), and
shuffled there by index kernels. `DeviceStager` does the copy and screens the data for non-finite rows on
the way (`RowScreen`, on the GPU, syncing only its own stream): a check of each batch where it is used would
stall the GPU every step.
"""

from __future__ import annotations

import warnings
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

STAGE_SHARE = 0.25
"""Staged data may take this share of the GPU memory that is free when training starts."""


def stage_budget(device: torch.device, stage: bool | None) -> float:
    """Bytes of training data that may be staged on `device`: `stage` None = a share of its free memory,
    True = no limit, False (or no GPU) = none."""
    if stage is False or device.type != "cuda":
        if stage:
            raise ValueError(
                f"stage=True keeps the training data on the GPU, but training runs on {device}: "
                "train on a CUDA device or leave stage unset."
            )
        return 0.0
    return float("inf") if stage else STAGE_SHARE * torch.cuda.mem_get_info(device)[0]


Rows = TypeVar("Rows", Tensor, dict[str, Tensor])


def finite_rows_mask(x_N: Tensor) -> Tensor:
    """[n] bool: which rows of x hold no NaN/Inf."""
    x_ND = x_N.reshape(len(x_N), -1)
    # NaN propagates through max and min, and ±inf is its row's max or min: two row reductions find every
    # non-finite row exactly, without a [n, d] mask. (A row sum can overflow on finite rows, and on the host
    # an fp16 sum is 4× slower than these two.)
    return torch.isfinite(x_ND.amax(-1)) & torch.isfinite(x_ND.amin(-1))


class RowScreen:
    """Drops the rows holding NaN/Inf from batches (dicts: a row of any tensor drops that row of all),
    counting them in `dropped` and warning on the first; data with no finite row at all is an error.

    Counts are kept per `where` (a place in the data stream, e.g. "batch 12"), so data read twice (the
    trainer's first batches, sampled once to initialise the SAE and then trained on) counts once.
    """

    def __init__(self) -> None:
        self.dropped_at: dict[str, int] = {}

    @property
    def dropped(self) -> int:
        return sum(self.dropped_at.values())

    def __call__(self, rows: Rows, where: str) -> Rows:
        tensors = rows if isinstance(rows, dict) else {"": rows}
        masks = [finite_rows_mask(t) for t in tensors.values()]
        finite_N = masks[0] if len(masks) == 1 else torch.stack(masks).all(0)
        n_bad = len(finite_N) - int(finite_N.sum())  # on a GPU this waits for the current stream only
        if n_bad == 0:
            return rows
        if n_bad == len(finite_N):
            raise ValueError(
                f"{where} has only non-finite (NaN/Inf) activations: the data is corrupt "
                "(fp16 overflow during extraction?). Re-extract it in bf16/fp32."
            )
        if not self.dropped_at:
            warnings.warn(
                f"mmsae: skipping non-finite activation rows (first in {where}); their count is "
                "logged as train/skipped_rows.",
                stacklevel=2,
            )
        self.dropped_at[where] = n_bad
        kept = {name: t[finite_N] for name, t in tensors.items()}
        return kept if isinstance(rows, dict) else kept[""]


class DeviceStager:
    """Copies aligned host tensors ({name: [n, ...]}, e.g. the hooks of one store shard) to one GPU.

    Call it from a loader thread: it copies through page-locked pieces on its own stream, drops the rows
    holding NaN/Inf (`screen`), and returns the device tensors and an event; `handover`, called where they
    are used, makes that stream wait for the event and ties their memory to it (`record_stream`), so it is
    not reused before the trainer has read them.
    """

    PIECE_BYTES = 64 << 20  # page-locked staging per copy: bounded, however large a shard is

    def __init__(self, device: torch.device, screen: RowScreen | None = None):
        self.device, self.screen = device, screen or RowScreen()
        self.stream = torch.cuda.Stream(device)

    def __call__(
        self, host: dict[str, Tensor | np.ndarray], where: str
    ) -> tuple[dict[str, Tensor], torch.cuda.Event]:
        if any(isinstance(t, Tensor) and t.is_cuda for t in host.values()):
            # Already on a GPU (written by work queued on the caller's stream): screened, not copied.
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            out = self.screen({name: self._copy(t) for name, t in host.items()}, where)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        return out, ready

    def handover(self, tensors: dict[str, Tensor], ready: torch.cuda.Event) -> dict[str, Tensor]:
        """The tensors, once the current stream has been told to wait for their copy (no host wait)."""
        consumer = torch.cuda.current_stream(self.device)
        consumer.wait_event(ready)
        for t in tensors.values():
            t.record_stream(consumer)
        return tensors

    def _copy(self, host_N: Tensor | np.ndarray) -> Tensor:
        if isinstance(host_N, Tensor) and host_N.is_cuda:
            return host_N.to(self.device)
        out_N = torch.empty(host_N.shape, dtype=_torch_dtype(host_N), device=self.device)
        step = max(1, self.PIECE_BYTES // max(1, out_N[:1].numel() * out_N.element_size()))
        for i in range(0, len(host_N), step):
            piece = host_N[i : i + step]
            if isinstance(piece, np.ndarray):  # a writable copy: torch refuses read-only (memmap) arrays
                piece = torch.from_numpy(np.array(piece))
            # A fresh pinned piece each time: the host allocator reuses its block once this copy is done.
            out_N[i : i + step].copy_(piece.pin_memory(), non_blocking=True)
        return out_N


def _torch_dtype(x: Tensor | np.ndarray) -> torch.dtype:
    return x.dtype if isinstance(x, Tensor) else torch.from_numpy(np.empty(0, dtype=x.dtype)).dtype
