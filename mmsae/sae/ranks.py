"""Statistics that steer training, made the same on every DDP rank (as they are in one process).

A statistic computed from each rank's own batch (λ's L0, BatchTopK's θ) lets the ranks' states drift apart,
and the exported SAE holds rank 0's.
"""

from __future__ import annotations

import torch
from torch import Tensor


def ddp_active() -> bool:
    """Whether this process is one rank of an initialized process group (DDP)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def sum_over_ranks(stats: Tensor) -> Tensor:
    """`stats` summed in place over DDP's ranks; `stats` itself in one process."""
    if ddp_active():
        torch.distributed.all_reduce(stats)
    return stats


def ranks_mean(value: Tensor) -> Tensor:
    """The mean of a scalar's finite values over DDP's ranks (inf where none is finite); the value itself in
    one process."""
    if not ddp_active():
        return value  # one process: no extra kernels in every training step
    finite = value.isfinite()
    stats = sum_over_ranks(torch.stack([torch.where(finite, value, torch.zeros_like(value)), finite.float()]))
    return torch.where(stats[1] > 0, stats[0] / stats[1].clamp_min(1), torch.full_like(value, float("inf")))


__all__ = ["ddp_active", "ranks_mean", "sum_over_ranks"]
