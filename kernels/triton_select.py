"""Per-row top-k of 16-bit pre-activations by bisection on order-preserving integer keys.

torch.topk over B×n reads at ~10% of HBM bandwidth (it sorts). A 16-bit float maps to a 16-bit
integer key with the same order, so the k-th largest key of a segment held in registers is found
exactly by 16 rounds of "count the keys ≥ candidate" (one compare and one block sum each); a
prefix sum then compacts the elements above it, plus as many ties as needed, into k slots.
Rows longer than one segment take several rounds: every segment keeps its own top k, then the
same kernel runs on the S·k candidates (the top k of a row lies in the union of its segments'
top k) until one segment is left. Small segments with one warp keep the block sums in shuffles.

The default "group" method never searches a whole row: one streaming pass (or the encoder GEMM's
epilogue) writes the max of every run of 16–32 contiguous columns; the k-th largest maximum bounds
the row's k-th largest from below, so exactly k groups hold the top k, and the bisection runs on the
group maxima and then on those k groups' elements, each over the key range it can lie in.
"bound" and "bisect" remain for k whose groups do not fit one program (docs/kernels-notes.md).
fp32 rows (AuxK's pre-activations) take the group select only, with 32-bit keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import triton
import triton.language as tl
from torch import Tensor

from mmsae.kernels.triton_keys import _kth_largest_key, _ordered_key, _ordered_key_any
from mmsae.kernels.triton_select_bound import BoundConfig, _bound_select, bound_config

SELECT_DTYPES = (torch.bfloat16, torch.float16)
WIDE_SELECT_DTYPES = (torch.float32,)
"""fp32 rows take the group select only (32-bit keys, int32 group maxima): AuxK's fp32 pre-activations."""
SelectMethod = Literal["group", "bound", "bisect"]
MAX_K = 512
"""Larger k (AuxK's d/2) keeps torch.topk: a segment of 2k keys must fit in registers."""
MAX_GROUP_CANDIDATES = 8192
"""Elements of the chosen groups one program of the group select holds; larger k uses "bound"."""


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
    threshold = _kth_largest_key(key, want)

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


@triton.jit
def _group_max_kernel(
    pre_ptr,
    gmax_ptr,
    B,
    n,
    G,
    stride_pre,
    GS: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
    WIDE: tl.constexpr,
):
    """Max key of each run of GS contiguous columns, stored as int16 (key − 2¹⁵, same order), or for
    fp32 (WIDE) as int32 (key − 2³¹)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    ok = (rows[:, None] < B) & (cols[None, :] < n)
    x = tl.load(pre_ptr + rows[:, None].to(tl.int64) * stride_pre + cols[None, :], mask=ok, other=0.0)
    key = tl.where(ok, _ordered_key_any(x, WIDE), -1)
    gmax = tl.max(tl.reshape(key, (BR, BC // GS, GS)), axis=2)
    groups = tl.program_id(1) * (BC // GS) + tl.arange(0, BC // GS)
    # A stored group holds at least one column < n, so its max key is ≥ 0 and fits after the shift.
    store_ok = (rows[:, None] < B) & (groups[None, :] < G)
    gmax_ptrs = gmax_ptr + rows[:, None].to(tl.int64) * G + groups[None, :]
    if WIDE:
        tl.store(gmax_ptrs, (gmax - 2147483648).to(tl.int32), mask=store_ok)
    else:
        tl.store(gmax_ptrs, (gmax - 32768).to(tl.int16), mask=store_ok)


@triton.jit
def _kth_largest_in_range(key, want, lo, hi):
    """Largest t in [lo, hi] with #(key ≥ t) ≥ want, given #(key ≥ lo) ≥ want and #(key > hi) < want:
    log2(hi − lo) rounds instead of 16, and the keys near the top of a row span few values."""
    while lo < hi:
        mid = (lo + hi + 1) // 2
        enough = tl.sum((key >= mid).to(tl.int32), 0) >= want
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid - 1)
    return lo


@triton.jit
def _group_topk_kernel(
    pre_ptr,
    gmax_ptr,
    gid_ptr,
    val_ptr,
    idx_ptr,
    n,
    k,
    G,
    stride_pre,
    GS: tl.constexpr,
    G_POW2: tl.constexpr,
    K_POW2: tl.constexpr,
    WIDE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    pre_row = pre_ptr + row * stride_pre

    # 1. The k-th largest group maximum bounds the row's k-th largest key from below (the k best
    #    groups hold k distinct elements ≥ it). Every element above the bound lies in a group whose
    #    max is above it; of the groups tied at the bound, the lowest-indexed ones that make up k
    #    hold the lowest-column elements equal to it. So exactly k groups hold the row's top k.
    g = tl.arange(0, G_POW2)
    if WIDE:
        gkey = tl.load(gmax_ptr + row * G + g, mask=g < G, other=0).to(tl.int64) + 2147483648
        key_end = 4294967296
    else:
        gkey = tl.load(gmax_ptr + row * G + g, mask=g < G, other=0).to(tl.int32) + 32768
        key_end = 65536
    gkey = tl.where(g < G, gkey, -1)
    top = tl.max(gkey, 0)
    bound = _kth_largest_in_range(gkey, k, tl.min(tl.where(g < G, gkey, key_end), 0), top)
    above = gkey > bound
    tied = gkey == bound
    chosen = above | (tied & (tl.cumsum(tied.to(tl.int32), 0) <= k - tl.sum(above.to(tl.int32), 0)))
    slot = tl.cumsum(chosen.to(tl.int32), 0) - 1
    tl.store(gid_ptr + row * K_POW2 + slot, g, mask=chosen)
    tl.debug_barrier()  # the gather below reads slots that other threads of this program wrote

    # 2. Exact top k of those groups' k·GS elements, ties to the lowest column: groups are in
    #    column order, so the flattened candidate order is the column order. The k chosen maxima
    #    are ≥ bound, so the threshold lies in [bound, max candidate].
    slots = tl.arange(0, K_POW2)
    gid = tl.load(gid_ptr + row * K_POW2 + slots, mask=slots < k, other=0)
    cols = gid[:, None] * GS + tl.arange(0, GS)[None, :]
    ok = (slots[:, None] < k) & (cols < n)
    x = tl.reshape(tl.load(pre_row + cols, mask=ok, other=0.0), (K_POW2 * GS,))
    key = tl.where(tl.reshape(ok, (K_POW2 * GS,)), _ordered_key_any(x, WIDE), -1)
    cols = tl.reshape(cols, (K_POW2 * GS,))
    # The top of the range is taken from the candidates themselves: maxima made by the GEMM epilogue
    # skip NaNs, whose keys are above every number's.
    threshold = _kth_largest_in_range(key, k, bound, tl.max(key, 0))
    above = key > threshold
    equal = key == threshold
    n_above = tl.sum(above.to(tl.int32), 0)
    equal_rank = tl.cumsum(equal.to(tl.int32), 0) - 1
    keep = above | (equal & (equal_rank < k - n_above))
    out = tl.where(above, tl.cumsum(above.to(tl.int32), 0) - 1, n_above + equal_rank)
    tl.store(val_ptr + row * k + out, tl.maximum(x, 0.0), mask=keep)
    tl.store(idx_ptr + row * k + out, cols.to(tl.int64), mask=keep)


@dataclass(frozen=True)
class GroupConfig:
    """Launch shape of the group select: groups of `group` contiguous columns."""

    group: int
    num_warps: int
    max_rows: int = 16
    """Rows per program of the group-max pass (its columns per program: 1024)."""


def group_config(n: int, k: int) -> GroupConfig:
    # ~64k groups per row, ≥ 16 columns (32 bytes: one sector per group read) and ≤ 4096 groups
    # (step 1 stays in registers); the H100 sweeps' best at all four benchmark sizes (2 warps up to 2048
    # groups, 4 beyond).
    group = max(16, triton.next_power_of_2(triton.cdiv(n, 64 * k)))
    while triton.cdiv(n, group) > 4096:
        group *= 2
    while group > 1 and triton.cdiv(n, group) < 2 * k:  # short rows: enough groups to bound k
        group //= 2
    return GroupConfig(group, group_warps(triton.cdiv(n, group)))


def group_warps(n_groups: int) -> int:
    """Warps of the group select's program for rows of `n_groups` groups."""
    return 2 if n_groups <= 2048 else 4


def group_maxima(pre_BN: Tensor, cfg: GroupConfig) -> Tensor:
    """[B, G] int16: the max key of each run of `cfg.group` columns (key − 2¹⁵, same order); int32 and
    key − 2³¹ for fp32 rows."""
    B, n = pre_BN.shape
    G = triton.cdiv(n, cfg.group)
    block_cols = max(1024, cfg.group)
    wide = pre_BN.dtype in WIDE_SELECT_DTYPES
    gmax_BG = torch.empty(B, G, dtype=torch.int32 if wide else torch.int16, device=pre_BN.device)
    grid = (triton.cdiv(B, cfg.max_rows), triton.cdiv(n, block_cols))
    _group_max_kernel[grid](
        pre_BN,
        gmax_BG,
        B,
        n,
        G,
        pre_BN.stride(0),
        GS=cfg.group,
        BR=cfg.max_rows,
        BC=block_cols,
        WIDE=wide,
        num_warps=4,
    )
    return gmax_BG


def select_from_group_maxima(
    pre_BN: Tensor, gmax_BG: Tensor, k: int, cfg: GroupConfig, values_BK: Tensor, indices_BK: Tensor
) -> None:
    """The group select's second step, from maxima made by `group_maxima` or a GEMM epilogue."""
    B, n = pre_BN.shape
    G = gmax_BG.shape[1]
    wide = pre_BN.dtype in WIDE_SELECT_DTYPES
    if gmax_BG.dtype != (torch.int32 if wide else torch.int16):
        raise TypeError(f"group maxima of {pre_BN.dtype} rows cannot be {gmax_BG.dtype}; use group_maxima.")
    if not 0 < k <= G:
        raise ValueError(f"the group select needs 0 < k ≤ groups; got k={k} for {G} groups of {cfg.group}.")
    K_POW2 = triton.next_power_of_2(k)
    gid = torch.empty(B, K_POW2, dtype=torch.int32, device=pre_BN.device)
    _group_topk_kernel[(B,)](
        pre_BN,
        gmax_BG,
        gid,
        values_BK,
        indices_BK,
        n,
        k,
        G,
        pre_BN.stride(0),
        GS=cfg.group,
        G_POW2=triton.next_power_of_2(G),
        K_POW2=K_POW2,
        WIDE=wide,
        num_warps=cfg.num_warps,
    )


def group_select_fits(k: int, cfg: GroupConfig) -> bool:
    """Whether one program of the group select holds the k chosen groups' elements."""
    return triton.next_power_of_2(k) * cfg.group <= MAX_GROUP_CANDIDATES


def select_config(n: int, k: int) -> tuple[int, int]:
    """(segment length, num_warps): one warp per 512 keys was fastest at all four benchmark sizes
    on H100 (docs/kernels-notes.md); segments grow only to keep seg ≥ 2k."""
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
    method: SelectMethod = "group",
    seg: int | None = None,
    num_warps: int | None = None,
    bound: BoundConfig | None = None,
    group: GroupConfig | None = None,
) -> None:
    """Write relu(top-k values) and their indices of each row of `pre_BN` (unsorted) into the outputs.

    method "group" (default): maxima of contiguous column groups in one streaming pass, then
    the exact select on the k groups that hold the top k; "bound": strided
    group maxima and candidate compaction inside one program per row; "bisect": segmented
    bisection over the whole row, tuned by `seg` and `num_warps`.
    """
    n = pre_BN.shape[1]
    if pre_BN.dtype in WIDE_SELECT_DTYPES and method != "group":
        raise ValueError(f"fp32 rows take the group select only, not {method!r}; use torch.topk.")
    if pre_BN.dtype not in SELECT_DTYPES + WIDE_SELECT_DTYPES:
        raise TypeError(
            f"the select kernel needs bf16/fp16/fp32 pre-activations, got {pre_BN.dtype}; use torch.topk."
        )
    if not 0 < k <= min(n, MAX_K):
        raise ValueError(f"k={k} must be in [1, min(n={n}, {MAX_K})]; use torch.topk beyond.")
    if pre_BN.stride(1) != 1 or not (values_BK.is_contiguous() and indices_BK.is_contiguous()):
        raise ValueError("topk_select_into needs row-major pre-activations and contiguous outputs.")
    if method == "group":
        cfg = group or group_config(n, k)
        if group_select_fits(k, cfg):
            select_from_group_maxima(pre_BN, group_maxima(pre_BN, cfg), k, cfg, values_BK, indices_BK)
            return
        if pre_BN.dtype in WIDE_SELECT_DTYPES:
            raise ValueError(f"k={k} is too large for the group select of fp32 rows; use torch.topk.")
        method = "bound"  # large k: the chosen groups' elements would not fit in one program
    if method == "bound":
        _bound_select(pre_BN, values_BK, indices_BK, k, bound or bound_config(n, k))
        return
    if method != "bisect":
        raise ValueError(f"Unknown select method {method!r}; use 'group', 'bound' or 'bisect'.")
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
