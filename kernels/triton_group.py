"""Inference TopK encode that never writes the [B, n] pre-activations: group maxima, then only the chosen
groups re-scored.

The product's exact encode (`kernels.topk_encode`) writes all of pre = x·Wᵀ + b from its GEMM (1 GiB per
16k-token chunk at n = 32768) only to select k entries per row. The GEMM's epilogue already writes the max key
of every run of `group` contiguous columns (`triton_gemm`); the top k of a row lie in its k groups of largest
maxima (ties to the lowest group, as `triton_select`'s group select proves and uses), so `group_topk`:
1. runs the GEMM with the group maxima only, nothing else written;
2. chooses per row the `kept` groups of largest maxima, in ascending group order (`_choose_groups_kernel`);
3. sorts the (row, group) pairs by group, so that each run of pairs of one group is re-scored against that
   group's weight rows, read once (`_group_rescore_kernel`), rounding as the product's encode does;
4. takes the exact top k of each row's kept·group re-scored entries (`triton_select`; the slots are in column
   order, so its lowest-slot tie rule is the lowest-column one) and maps slots back to features.
With 16-bit maxima and kept = k the result is exactly `kernels.topk_encode`'s. With e4m3 maxima
(`fp8_weights`: the GEMM at twice the 16-bit rate) the chosen groups may miss a group of the exact top k, so
the caller keeps more (e.g. 2k); the values are still the exact ones of the features found.

Inference only: no autograd (the re-score has no backward); `group_topk_applies` says where it runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mmsae.kernels.triton_fp8 import e4m3_rows
from mmsae.kernels.triton_gemm import MAX_GROUP, fused_gemm_applies, linear_group_maxima
from mmsae.kernels.triton_keys import _ordered_key
from mmsae.kernels.triton_select import (
    MAX_K,
    SELECT_DTYPES,
    GroupConfig,
    _kth_largest_in_range,
    group_config,
    group_select_fits,
    group_warps,
    select_from_group_maxima,
    topk_select_into,
)

PAIRS_PER_PROGRAM = 128
"""(row, group) pairs per program of the re-score: one [128, group] tile per distinct group among them. At
(768, 32768, k = 32), 16384 rows and 64 groups kept per row: 0.250 ms against 0.263 with 64 pairs and 0.306
with 32 (BLOCK_D 64, 4 warps, each the fastest of its row; 8 warps or BLOCK_D 128/256 were slower; H100)."""
RESCORE_BLOCK_D = 64
SLOT_BLOCK = 1024


@triton.jit
def _choose_groups_kernel(gmax_ptr, gid_ptr, G, kept, G_POW2: tl.constexpr):
    """The `kept` groups of largest maxima of one row, ties to the lowest group, stored in ascending order:
    `triton_select._group_topk_kernel`'s step 1, without its second step (there is no pre to read)."""
    row = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, G_POW2)
    gkey = tl.load(gmax_ptr + row * G + g, mask=g < G, other=0).to(tl.int32) + 32768
    gkey = tl.where(g < G, gkey, -1)
    bound = _kth_largest_in_range(gkey, kept, tl.min(tl.where(g < G, gkey, 65536), 0), tl.max(gkey, 0))
    above = gkey > bound
    tied = gkey == bound
    chosen = above | (tied & (tl.cumsum(tied.to(tl.int32), 0) <= kept - tl.sum(above.to(tl.int32), 0)))
    slot = tl.cumsum(chosen.to(tl.int32), 0) - 1
    tl.store(gid_ptr + row * kept + slot, g, mask=chosen)


@triton.jit
def _group_rescore_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    pair_ptr,
    grp_ptr,
    out_ptr,
    gmax_ptr,
    P,
    N,
    D,
    KEPT,
    GS: tl.constexpr,
    GW: tl.constexpr,
    BP: tl.constexpr,
    BD: tl.constexpr,
):
    """BP pairs sorted by group: for each distinct group among them, x[rows]·W[group]ᵀ + b over its GS
    features (fp32 accumulation, fp32 bias, one rounding to out's dtype, as the product's GEMM), stored at
    each pair's own place, pair·GS (pair = row·KEPT + its rank in the row), and the max key of those GS
    entries at gmax[pair]: the select's group maxima, without a pass over the re-scored rows. Columns ≥ N
    (a last group cut short) get −∞. GW = max(GS, 16): the dot's narrowest tile."""
    p = tl.program_id(0) * BP + tl.arange(0, BP)
    ok = p < P
    pair = tl.load(pair_ptr + p, mask=ok, other=0).to(tl.int64)
    grp = tl.where(ok, tl.load(grp_ptr + p, mask=ok, other=0).to(tl.int32), 2147483647)
    rows = pair // KEPT
    f = tl.arange(0, GW)
    g = tl.min(grp, 0)
    last = tl.max(tl.where(ok, grp, -1), 0)
    while g <= last:
        mine = ok & (grp == g)
        cols = g.to(tl.int64) * GS + f
        valid = (f < GS) & (cols < N)
        acc = tl.zeros((BP, GW), dtype=tl.float32)
        for d0 in range(0, D, BD):
            dd = d0 + tl.arange(0, BD)
            x = tl.load(
                x_ptr + rows[:, None] * D + dd[None, :], mask=mine[:, None] & (dd < D)[None, :], other=0.0
            )
            w = tl.load(
                w_ptr + cols[:, None] * D + dd[None, :], mask=valid[:, None] & (dd < D)[None, :], other=0.0
            )
            acc = tl.dot(x, tl.trans(w), acc)
        bias = tl.load(b_ptr + cols, mask=valid, other=0.0).to(tl.float32)
        pre = tl.where(valid[None, :], acc + bias[None, :], float("-inf")).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + pair[:, None] * GS + f[None, :], pre, mask=mine[:, None] & (f < GS)[None, :])
        gmax = _ordered_key(tl.max(pre, 1).to(out_ptr.dtype.element_ty))  # reductions widen 16-bit floats
        tl.store(gmax_ptr + pair, (gmax - 32768).to(tl.int16), mask=mine)
        g = tl.min(tl.where(grp > g, grp, 2147483647), 0)


def group_topk(
    x_BD: Tensor,
    W_ND: Tensor,
    b_N: Tensor,
    k: int,
    *,
    kept: int | None = None,
    fp8_weights: tuple[Tensor, Tensor] | None = None,
    x8: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """(relu'd values in x's dtype, int64 feature indices), [B, k] each, unsorted, of relu(topk(x·Wᵀ + b)).

    x and W: 16-bit, one dtype; b is rounded to it first, as the product's encode casts it. `kept` groups per
    row are re-scored (default and minimum k; at most all of them). Without `fp8_weights` the groups are
    chosen by the exact 16-bit maxima: with kept = k, the same features and values as `kernels.topk_encode`
    (ties to the lowest column). With `fp8_weights` = `triton_fp8.e4m3_rows(W)` (made once per pass), x is
    quantised per call and the groups are chosen by the e4m3 GEMM's maxima: a group of the exact top k may be
    missed, so keep more (`fp8_encode` keeps 1.5k); the values are the exact ones of the features found.
    `x8`: x's e4m3 rows where the caller made them already (`triton_fp8.centred_e4m3_rows`). No autograd."""
    n, d = W_ND.shape
    if x_BD.dim() != 2 or x_BD.shape[1] != d or b_N.shape != (n,):
        raise ValueError(
            f"x {tuple(x_BD.shape)}, W {tuple(W_ND.shape)}, b {tuple(b_N.shape)}: want [B, d], [n, d], [n]."
        )
    if x_BD.dtype not in SELECT_DTYPES or W_ND.dtype != x_BD.dtype:
        raise TypeError(f"group_topk takes 16-bit x and W of one dtype, got {x_BD.dtype} and {W_ND.dtype}.")
    if not 0 < k <= min(n, MAX_K):
        raise ValueError(f"k={k} must be in [1, min(n={n}, {MAX_K})].")
    group = group_config(n, k).group
    n_groups = triton.cdiv(n, group)
    kept = min(k if kept is None else kept, n_groups)
    if kept < min(k, n_groups):
        raise ValueError(f"kept={kept} groups cannot hold the top k={k}; keep at least k.")
    x_BD, W_ND = x_BD.contiguous(), W_ND.contiguous()
    with torch.no_grad():
        b_N = b_N.to(x_BD.dtype)  # as `triton_ops._linear_topk` takes it: rounded to the GEMM's dtype
        if x_BD.shape[0] == 0:
            return x_BD.new_empty(0, k), torch.empty(0, k, dtype=torch.int64, device=x_BD.device)
        gmax_BG = _group_maxima(x_BD, W_ND, b_N, group, fp8_weights, x8)
        groups_BK = choose_groups(gmax_BG, kept)
        return _top_of_groups(*rescore_groups(x_BD, W_ND, b_N, groups_BK, group), groups_BK, group, k)


def _group_maxima(
    x_BD: Tensor,
    W_ND: Tensor,
    b_N: Tensor,
    group: int,
    fp8_weights: tuple[Tensor, Tensor] | None,
    x8: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """[B, G] int16 maxima keys in x's dtype: of the exact pre, or of the e4m3 GEMM's estimate of it."""
    if fp8_weights is None:
        return linear_group_maxima(x_BD, W_ND, b_N, group, write_pre=False)[1]
    W8_ND, w_scale_N = fp8_weights
    if W8_ND.shape != W_ND.shape:
        raise ValueError(f"fp8 weights {tuple(W8_ND.shape)} are not W's {tuple(W_ND.shape)}.")
    x8_BD, x_scale_B = e4m3_rows(x_BD) if x8 is None else x8
    if x8_BD.shape != x_BD.shape:
        raise ValueError(f"x's e4m3 rows {tuple(x8_BD.shape)} are not x's {tuple(x_BD.shape)}.")
    scales = (x_scale_B, w_scale_N)
    return linear_group_maxima(
        x8_BD, W8_ND, b_N, group, write_pre=False, scales=scales, out_dtype=x_BD.dtype
    )[1]


def choose_groups(gmax_BG: Tensor, kept: int) -> Tensor:
    """[B, kept] int32: each row's `kept` groups of largest int16 maxima keys, ties to the lowest group, in
    ascending order (so the re-scored entries are in column order and the select's ties go to the lowest
    column)."""
    B, G = gmax_BG.shape
    if not 0 < kept <= G:
        raise ValueError(f"kept={kept} must be in [1, {G} groups].")
    groups_BK = torch.empty(B, kept, dtype=torch.int32, device=gmax_BG.device)
    # One warp up to 2048 groups: 0.066 / 0.123 ms against 0.077 / 0.139 with two at (n, k) = (16384, 32) and
    # (65536, 32), 16384 rows; 4 warps at 4096 groups (H100).
    _choose_groups_kernel[(B,)](
        gmax_BG, groups_BK, G, kept, G_POW2=triton.next_power_of_2(G), num_warps=1 if G <= 2048 else 4
    )
    return groups_BK


def rescore_groups(
    x_BD: Tensor, W_ND: Tensor, b_N: Tensor, groups_BK: Tensor, group: int
) -> tuple[Tensor, Tensor]:
    """([B, kept·group] in x's dtype: row b's entries of its groups `groups_BK[b]` in that order, rounded as
    the product's GEMM rounds them, −∞ past column n; [B, kept] int16: the max key of each group's entries,
    as `triton_select.group_maxima` with groups of `group` columns gives them).

    The (row, group) pairs are sorted by group (a stable sort of the group ids, so rows stay ascending within
    a group: the x rows a program gathers are near each other) and each program re-scores its run of pairs
    group by group: a group's weight rows are read once per program, not once per pair. Group ids fit int16
    up to 32767 groups (`group_config` makes at most 4096): a 16-bit radix sort makes half the passes."""
    B, kept = groups_BK.shape
    n, d = W_ND.shape
    flat = groups_BK.reshape(-1)
    keys = flat.to(torch.int16) if triton.cdiv(n, group) <= 32767 else flat
    grp_sorted, pair = torch.sort(keys, stable=True)
    pre_BC = torch.empty(B, kept * group, dtype=x_BD.dtype, device=x_BD.device)
    gmax_BK = torch.empty(B, kept, dtype=torch.int16, device=x_BD.device)
    P = flat.shape[0]
    _group_rescore_kernel[(triton.cdiv(P, PAIRS_PER_PROGRAM),)](
        x_BD,
        W_ND,
        b_N,
        pair,
        grp_sorted,
        pre_BC,
        gmax_BK,
        P,
        n,
        d,
        kept,
        GS=group,
        GW=max(group, 16),
        BP=PAIRS_PER_PROGRAM,
        BD=RESCORE_BLOCK_D,
        num_warps=4,
    )
    return pre_BC, gmax_BK


def _top_of_groups(
    pre_BC: Tensor, gmax_BK: Tensor, groups_BK: Tensor, group: int, k: int
) -> tuple[Tensor, Tensor]:
    """The product's exact select (relu'd values, ties to the lowest slot = the lowest column) on the
    re-scored entries, from the re-score's group maxima; slots mapped back to features."""
    B = pre_BC.shape[0]
    values_BK = pre_BC.new_empty(B, k)
    slots_BK = torch.empty(B, k, dtype=torch.int64, device=pre_BC.device)
    cfg = GroupConfig(group, group_warps(gmax_BK.shape[1]))
    if group_select_fits(k, cfg) and k <= gmax_BK.shape[1]:
        select_from_group_maxima(pre_BC, gmax_BK, k, cfg, values_BK, slots_BK)
    else:
        topk_select_into(pre_BC, k, values_BK, slots_BK)
    _slot_features_kernel[(triton.cdiv(B * k, SLOT_BLOCK),)](
        slots_BK, groups_BK, B * k, k, groups_BK.shape[1], GS=group, BLOCK=SLOT_BLOCK, num_warps=4
    )
    return values_BK, slots_BK


@triton.jit
def _slot_features_kernel(slot_ptr, gid_ptr, M, k, KEPT, GS: tl.constexpr, BLOCK: tl.constexpr):
    """Slots of the re-scored rows to features, in place: slot s of row r is column s % GS of group
    gid[r, s // GS] (one pass instead of torch's divide, gather, cast, multiply, modulo and add)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < M
    slot = tl.load(slot_ptr + i, mask=ok, other=0)
    gid = tl.load(gid_ptr + (i // k) * KEPT + slot // GS, mask=ok, other=0).to(tl.int64)
    tl.store(slot_ptr + i, gid * GS + slot % GS, mask=ok)


def group_topk_applies(
    x_BD: Tensor, W_ND: Tensor, k: int, kept: int | None = None, *, fp8: bool = False
) -> bool:
    """Where `group_topk` runs its kernels as measured: Hopper with the fused GEMM's conditions
    (`fused_gemm_applies`: contiguous 16-bit operands of one dtype, 16-byte-aligned rows, groups of at most
    MAX_GROUP columns from `group_config(n, k)`), 0 < k ≤ MAX_K, kept ≥ k; with `fp8`, e4m3 rows of x and W
    16-byte aligned too (d % 16 = 0). Inference only: not where autograd would want a gradient of x or W."""
    if x_BD.dim() != 2 or W_ND.dim() != 2 or x_BD.shape[1] != W_ND.shape[1] or x_BD.shape[0] == 0:
        return False
    n, d = W_ND.shape
    if x_BD.dtype not in SELECT_DTYPES or not 0 < k <= min(n, MAX_K) or (kept is not None and kept < k):
        return False
    if torch.is_grad_enabled() and (x_BD.requires_grad or W_ND.requires_grad):
        return False
    group = group_config(n, k).group
    return group <= MAX_GROUP and fused_gemm_applies(x_BD, W_ND, group) and not (fp8 and d % 16)
