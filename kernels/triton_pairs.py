"""A chunk's (token, feature) pairs put in the top-k merge's order: one pass builds each pair's 32-bit sort
key, one pass gathers the sorted pairs. In torch these are ~10 element-wise and index kernels per chunk of
an encode-only pass (`mmsae.analysis.stats_ops`), each a full read and write of the chunk's pairs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

PAIR_BLOCK = 1024


@triton.jit
def _pair_keys_kernel(grp_ptr, v_ptr, key_ptr, M, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < M
    grp = tl.load(grp_ptr + i, mask=ok, other=0).to(tl.int64)
    v = tl.load(v_ptr + i, mask=ok, other=0.0)
    bits = v.to(tl.int16, bitcast=True).to(tl.int32)  # sign-extended: bits < 0 for negative values
    ordered = tl.where(bits < 0, bits ^ 0x7FFF, bits)  # increases with the value
    # NaN (exponent all ones, mantissa not 0; tested on the bits, which the interpreter compares right)
    # above every number, whatever its sign bit.
    ordered = tl.where((bits & 0x7FFF) > 0x7F80, 32767, ordered)
    key = grp * 65536 - ordered + (32767 - 2147483648)
    tl.store(key_ptr + i, key.to(tl.int32), mask=ok)


@triton.jit
def _gather_pairs_kernel(
    order_ptr, grp_ptr, v_ptr, grp_out_ptr, v_out_ptr, row_out_ptr, M, PER_ROW, BLOCK: tl.constexpr
):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < M
    o = tl.load(order_ptr + i, mask=ok, other=0)
    tl.store(grp_out_ptr + i, tl.load(grp_ptr + o, mask=ok, other=0), mask=ok)
    tl.store(v_out_ptr + i, tl.load(v_ptr + o, mask=ok, other=0.0).to(tl.float32), mask=ok)
    tl.store(row_out_ptr + i, o // PER_ROW, mask=ok)


def pair_keys(grp_M: Tensor, v_M: Tensor) -> Tensor:
    """See `mmsae.kernels.pair_keys`."""
    M = grp_M.shape[0]
    key_M = torch.empty(M, dtype=torch.int32, device=grp_M.device)
    if M:
        _pair_keys_kernel[(triton.cdiv(M, PAIR_BLOCK),)](
            grp_M.contiguous(), v_M.contiguous(), key_M, M, BLOCK=PAIR_BLOCK, num_warps=4
        )
    return key_M


def gather_pairs(order_M: Tensor, grp_M: Tensor, v_M: Tensor, per_row: int) -> tuple[Tensor, Tensor, Tensor]:
    """See `mmsae.kernels.gather_pairs`."""
    M = order_M.shape[0]
    out = (
        torch.empty(M, dtype=grp_M.dtype, device=grp_M.device),
        torch.empty(M, dtype=torch.float32, device=grp_M.device),
        torch.empty(M, dtype=torch.int64, device=grp_M.device),
    )
    if M:
        _gather_pairs_kernel[(triton.cdiv(M, PAIR_BLOCK),)](
            order_M.contiguous(), grp_M, v_M.contiguous(), *out, M, per_row, BLOCK=PAIR_BLOCK, num_warps=4
        )
    return out
