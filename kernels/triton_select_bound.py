"""The "bound" method of the per-row top-k select, for k whose groups do not fit one program of the
group select (`triton_select`, docs/kernels-notes.md): one program per row keeps the maxima of G groups,
bisects them for a lower bound on the row's k-th largest, compacts the elements ≥ it into a few slots and
runs the exact select on those.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from mmsae.kernels.triton_keys import _kth_largest_key, _ordered_key


@triton.jit
def _row_keys(pre_row, cand_val_row, offs, m, overflow, in_cand):
    """Values and keys of source elements `offs` < m: the row itself after an overflow, else the
    compacted candidates (both loads are predicated, only one touches memory)."""
    ok = offs < m
    x_row = tl.load(pre_row + offs, mask=ok & overflow, other=0.0)
    x_cand = tl.load(cand_val_row + offs, mask=ok & in_cand, other=0.0)
    x = tl.where(overflow, x_row, x_cand)
    return x, tl.where(ok, _ordered_key(x), -1)


@triton.jit
def _bound_topk_kernel(
    pre_ptr,
    cand_val_ptr,
    cand_idx_ptr,
    val_ptr,
    idx_ptr,
    n,
    k,
    stride_pre,
    GROUPS: tl.constexpr,
    CAP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    pre_row = pre_ptr + row * stride_pre
    cand_val_row = cand_val_ptr + row * CAP
    cand_idx_row = cand_idx_ptr + row * CAP
    cols = tl.arange(0, GROUPS)

    # 1. Group g = the columns ≡ g (mod GROUPS). The k groups with the largest maxima hold k
    #    distinct elements ≥ the k-th largest maximum, so it bounds the k-th largest key from below.
    group_max = tl.full([GROUPS], -1, tl.int32)
    for c0 in range(0, n, GROUPS):
        offs = c0 + cols
        ok = offs < n
        group_max = tl.maximum(group_max, tl.where(ok, _ordered_key(tl.load(pre_row + offs, mask=ok)), -1))
    bound = _kth_largest_key(group_max, k)

    # 2. Compact the elements ≥ bound (≈ k·(1 + k/2·GROUPS) on random rows), in column order.
    n_cand = tl.zeros([], dtype=tl.int32)
    for c0 in range(0, n, GROUPS):
        offs = c0 + cols
        ok = offs < n
        x = tl.load(pre_row + offs, mask=ok, other=0.0)
        is_cand = ok & (_ordered_key(x) >= bound)
        slot = n_cand + tl.cumsum(is_cand.to(tl.int32), 0) - 1
        fits = is_cand & (slot < CAP)
        tl.store(cand_val_row + slot, x, mask=fits)
        tl.store(cand_idx_row + slot, offs, mask=fits)
        n_cand += tl.sum(is_cand.to(tl.int32), 0)
    tl.debug_barrier()  # step 3 reads slots that other threads of this program wrote

    # 3. Exact top k of the candidates; a row with more than CAP (ties, adversarial rows) takes
    #    the same chunked bisection over the whole row instead. Ties go to the lowest column.
    overflow = n_cand > CAP
    in_cand = n_cand <= CAP
    m = tl.where(overflow, n, n_cand)
    slots = tl.arange(0, CAP)
    threshold = tl.zeros([], dtype=tl.int32)
    for bit in tl.static_range(15, -1, -1):
        candidate = threshold | (1 << bit)
        count = tl.zeros([], dtype=tl.int32)
        for c0 in range(0, m, CAP):
            _, key = _row_keys(pre_row, cand_val_row, c0 + slots, m, overflow, in_cand)
            count += tl.sum((key >= candidate).to(tl.int32), 0)
        threshold = tl.where(count >= k, candidate, threshold)

    n_above = tl.zeros([], dtype=tl.int32)
    for c0 in range(0, m, CAP):
        _, key = _row_keys(pre_row, cand_val_row, c0 + slots, m, overflow, in_cand)
        n_above += tl.sum((key > threshold).to(tl.int32), 0)
    above_before = tl.zeros([], dtype=tl.int32)
    equal_before = tl.zeros([], dtype=tl.int32)
    out = row * k
    for c0 in range(0, m, CAP):
        src = c0 + slots
        x, key = _row_keys(pre_row, cand_val_row, src, m, overflow, in_cand)
        above = key > threshold
        equal = key == threshold
        equal_rank = equal_before + tl.cumsum(equal.to(tl.int32), 0) - 1
        keep = above | (equal & (equal_rank < k - n_above))
        slot = tl.where(above, above_before + tl.cumsum(above.to(tl.int32), 0) - 1, n_above + equal_rank)
        cand_idx = tl.load(cand_idx_row + src, mask=keep & in_cand, other=0)
        tl.store(val_ptr + out + slot, tl.maximum(x, 0.0), mask=keep)
        tl.store(idx_ptr + out + slot, tl.where(overflow, src, cand_idx).to(tl.int64), mask=keep)
        above_before += tl.sum(above.to(tl.int32), 0)
        equal_before += tl.sum(equal.to(tl.int32), 0)


@dataclass(frozen=True)
class BoundConfig:
    """Launch shape of the bound select: GROUPS column groups, CAP candidate slots per row."""

    groups: int
    cap: int
    num_warps: int


def bound_config(n: int, k: int) -> BoundConfig:
    groups = max(1024, triton.next_power_of_2(k))
    # Expected candidates ≈ k(1 + k/2·groups) ≤ 1.25k: 4k slots make an overflow rare.
    return BoundConfig(groups, max(128, triton.next_power_of_2(4 * k)), 4)


def _bound_select(pre_BN: Tensor, values_BK: Tensor, indices_BK: Tensor, k: int, cfg: BoundConfig) -> None:
    B, n = pre_BN.shape
    cand_val = pre_BN.new_empty(B, cfg.cap)
    cand_idx = torch.empty(B, cfg.cap, dtype=torch.int32, device=pre_BN.device)
    _bound_topk_kernel[(B,)](
        pre_BN,
        cand_val,
        cand_idx,
        values_BK,
        indices_BK,
        n,
        k,
        pre_BN.stride(0),
        GROUPS=cfg.groups,
        CAP=cfg.cap,
        num_warps=cfg.num_warps,
    )
