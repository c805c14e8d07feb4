"""What the benchmarks share for timing: draining a device before and after a timed region."""

from __future__ import annotations

import torch


def sync(device: torch.device | str | None = None) -> None:
    """Wait for every kernel queued on `device` (None: the current CUDA device, if there is one); a no-op on
    the CPU, whose work is done when the call returns."""
    device = torch.device(device) if device is not None else None
    if device is None and torch.cuda.is_available():
        torch.cuda.synchronize()
    elif device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
