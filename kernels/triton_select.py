"""Per-row top-k of 16-bit pre-activations by bisection on order-preserving integer keys.

torch.topk over B×n reads at ~10% of HBM bandwidth (it sorts). A 16-bit float maps to a 16-bit
integer key with the same order, so the k-th largest key of a segment held in registers is found
exactly by 16 rounds of "count the keys ≥ candidate" (one compare and one block sum each); a
prefix sum then compacts the elements above it, plus as many ties as needed, into k slots.
Rows longer than one segment take several rounds: every segment keeps its own top k, then the
same kernel runs on the S·k candidates (the top k of a row lies in the union of its segments'
top k) until one segment is left. Small segments with one warp keep the block sums in shuffles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

SELECT_DTYPES = (torch.bfloat16, torch.float16)
MAX_K = 512
"""Larger k (AuxK's d/2) keeps torch.topk: a segment of 2k keys must fit in registers."""


@triton.jit
def _ordered_key(x):
    """16-bit float -> int32 in [0, 2¹⁶) whose integer order is the float order."""
    bits = x.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return tl.where(bits >= 0x8000, bits ^ 0xFFFF, bits | 0x8000)


@triton.jit
def _segment_topk_kernel(
    src_ptr,
    src_idx_ptr,
    val_ptr,
    idx_ptr,
    n,
    k,
    stride_src,
    stride_out,
    SEG: tl.constexpr,
    K_POW2: tl.constexpr,
    GATHER_IDX: tl.constexpr,
    RELU: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    seg = tl.program_id(1)
    offs = seg * SEG + tl.arange(0, SEG)
    valid = offs < n
    src = src_ptr + row * stride_src + offs
    key = tl.where(valid, _ordered_key(tl.load(src, mask=valid, other=0.0)), -1)
    want = tl.minimum(k, tl.sum(valid.to(tl.int32), 0))  # a short last segment keeps all it has

    # Largest t with #(key ≥ t) ≥ want, built bit by bit from the top: the want-th largest key.
    threshold = tl.zeros([], dtype=tl.int32)
    for bit in tl.static_range(15, -1, -1):
        candidate = threshold | (1 << bit)
        count = tl.sum((key >= candidate).to(tl.int32), 0)
        threshold = tl.where(count >= want, candidate, threshold)

    above = key > threshold
    equal = key == threshold
    n_above = tl.sum(above.to(tl.int32), 0)
    equal_rank = tl.cumsum(equal.to(tl.int32), 0) - 1
    keep = above | (equal & (equal_rank < want - n_above))
    slot = tl.where(above, tl.cumsum(above.to(tl.int32), 0) - 1, n_above + equal_rank)

    x = tl.load(src, mask=keep, other=0.0)  # reload only the k winners (L1/L2 hit)
    if RELU:
        x = tl.maximum(x, 0.0)
    if GATHER_IDX:
        global_idx = tl.load(src_idx_ptr + row * stride_src + offs, mask=keep, other=0)
    else:
        global_idx = offs.to(tl.int64)
    out = row * stride_out + seg * k
    tl.store(val_ptr + out + slot, x, mask=keep)
    tl.store(idx_ptr + out + slot, global_idx, mask=keep)
    # Slots a short segment cannot fill get -inf, so the next round never picks them.
    pad = tl.arange(0, K_POW2)
    pad_ok = (pad >= want) & (pad < k)
    tl.store(
        val_ptr + out + pad,
        tl.full([K_POW2], float("-inf"), tl.float32).to(val_ptr.dtype.element_ty),
        mask=pad_ok,
    )
    tl.store(idx_ptr + out + pad, tl.zeros([K_POW2], tl.int64), mask=pad_ok)


def select_config(n: int, k: int) -> tuple[int, int]:
    """(segment length, num_warps): one warp per 512 keys was fastest at all four benchmark sizes
    on H100 (docs/kernels-notes.md, v3); segments grow only to keep seg ≥ 2k."""
    seg = max(min(triton.next_power_of_2(n), 512), triton.next_power_of_2(2 * k))
    return seg, max(1, seg // 512)


def _select(
    src: Tensor, src_idx: Tensor | None, out_values: Tensor, out_indices: Tensor, k: int, seg: int, warps: int
) -> None:
    """Top k per segment; while a row has several segments, recurse on the S·k candidates."""
    B, n = src.shape
    n_segs = triton.cdiv(n, seg)
    final = n_segs == 1
    values, indices = out_values, out_indices
    if not final:
        values = src.new_empty(B, n_segs * k)
        indices = torch.empty(B, n_segs * k, dtype=torch.int64, device=src.device)
    _segment_topk_kernel[(B, n_segs)](
        src,
        src if src_idx is None else src_idx,
        values,
        indices,
        n,
        k,
        src.stride(0),
        values.stride(0),
        SEG=seg,
        K_POW2=triton.next_power_of_2(k),
        GATHER_IDX=src_idx is not None,
        RELU=final,
        num_warps=warps,
    )
    if not final:
        _select(values, indices, out_values, out_indices, k, seg, warps)


def topk_select_into(
    pre_BN: Tensor,
    k: int,
    values_BK: Tensor,
    indices_BK: Tensor,
    seg: int | None = None,
    num_warps: int | None = None,
) -> None:
    """Write relu(top-k values) and their indices of each row of `pre_BN` (unsorted) into the outputs."""
    if pre_BN.dtype not in SELECT_DTYPES:
        raise TypeError(
            f"the select kernel needs bf16/fp16 pre-activations, got {pre_BN.dtype}; use torch.topk."
        )
    n = pre_BN.shape[1]
    if not 0 < k <= min(n, MAX_K):
        raise ValueError(f"k={k} must be in [1, min(n={n}, {MAX_K})]; use torch.topk beyond.")
    if pre_BN.stride(1) != 1 or not (values_BK.is_contiguous() and indices_BK.is_contiguous()):
        raise ValueError("topk_select_into needs row-major pre-activations and contiguous outputs.")
    default_seg, default_warps = select_config(n, k)
    seg, warps = seg or default_seg, num_warps or default_warps
    if seg < 2 * k:
        raise ValueError(
            f"segment length {seg} must be at least 2k={2 * k} so that every round halves the row."
        )
    _select(pre_BN, None, values_BK, indices_BK, k, seg, warps)


def topk_select(pre_BN: Tensor, k: int) -> tuple[Tensor, Tensor]:
    values_BK = pre_BN.new_empty(pre_BN.shape[0], k)
    indices_BK = torch.empty(pre_BN.shape[0], k, dtype=torch.int64, device=pre_BN.device)
    topk_select_into(pre_BN, k, values_BK, indices_BK)
    return values_BK, indices_BK
