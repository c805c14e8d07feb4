"""Torch paths for CPU tensors that skip the reference's dense [B, n] intermediates.

The reference decoder (`reference.sparse_decode`) scatters the codes into a dense [B, n] matrix and
multiplies it by W_dec: B·n·d multiply-adds where B·k·d suffice, and it stays the ground truth the kernels
are tested against. On the CPU, `F.embedding_bag`'s weighted sum gathers the k rows instead, forward and
backward; it has no CUDA bf16 backward, so CUDA and 16-bit tensors keep the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

GATHER_DTYPES = (torch.float32, torch.float64)


def gather_decode_applies(values: Tensor, indices: Tensor, W_dec: Tensor) -> bool:
    """Non-empty CPU codes and decoder of one fp32/fp64 dtype, int64 indices, outside CPU autocast (empty
    codes take the reference, whose dense product of no rows costs nothing)."""
    return (
        values.device.type == "cpu"
        and W_dec.device.type == "cpu"
        and values.dtype == W_dec.dtype
        and values.dtype in GATHER_DTYPES
        and indices.dtype == torch.int64
        and values.numel() > 0
        and values.shape == indices.shape
        and not torch.is_autocast_enabled("cpu")
    )


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, bias: Tensor | None = None) -> Tensor:
    """Σ_j values[..., j] · W_dec[indices[..., j]] (+ bias) by a weighted `embedding_bag` sum."""
    lead, k = values.shape[:-1], values.shape[-1]
    out = F.embedding_bag(indices.reshape(-1, k), W_dec, per_sample_weights=values.reshape(-1, k), mode="sum")
    out = out.reshape(*lead, W_dec.shape[1])
    return out if bias is None else out + bias
