"""The feature-statistics pass's per-chunk steps as three kernels (`mmsae.analysis.FeatureStats.update`).

Per chunk the torch version runs ~25 small kernels for its sums, each a pass over the chunk's N·k (token,
feature) pairs or over [N, d] float32 temporaries; on a GPU each costs a launch and a few µs whatever its
size. Here the pairs' count, sum, max and log10 histogram are one pass of atomics, and the reconstruction
sums one read of x and x̂. Totals go straight into the float64 accumulators, so chunk sums are never
rounded to float32 as a whole (each program's partial sum still is). The running top-k merge is one sort
of packed keys per feature in registers, where torch sorts the [2k, n] table along its first axis.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mmsae.kernels.triton_dense import _rows

PAIR_BLOCK = 1024
ROW_BLOCK, COL_BLOCK, ROWS_PER_PROGRAM = 16, 256, 128


@triton.jit
def _feature_sums_kernel(
    grp_ptr,
    raw_ptr,
    fire_ptr,
    sum_ptr,
    max_ptr,
    hist_ptr,
    M,
    lo,
    span,
    BINS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M
    grp = tl.load(grp_ptr + offs, mask=ok, other=0).to(tl.int64)
    raw = tl.load(raw_ptr + offs, mask=ok, other=0.0)
    one = tl.full([BLOCK], 1.0, tl.float64)
    tl.atomic_add(fire_ptr + grp, one, mask=ok, sem="relaxed")
    tl.atomic_add(sum_ptr + grp, raw.to(tl.float64), mask=ok, sem="relaxed")
    tl.atomic_max(max_ptr + grp, raw, mask=ok, sem="relaxed")
    # log10 as log2 · log10(2): libdevice's log10 has no CPU-interpreter twin. The bin arithmetic is the
    # reference's order, ((log10|v| − lo) / span) · bins; a value within an ulp of a bin edge may land in
    # the neighbouring bin. |v| = 0 gives −∞ and bin 0.
    b = tl.floor((tl.log2(tl.abs(raw)) * 0.30102999566398120 - lo) / span * BINS)
    b = tl.minimum(tl.where(b > 0, b, 0.0), BINS - 1).to(tl.int64)  # NaN: bin 0, never out of the buffer
    tl.atomic_add(hist_ptr + grp * BINS + b, one, mask=ok, sem="relaxed")


@triton.jit
def _residual_sums_kernel(
    x_ptr,
    x_hat_ptr,
    shift_ptr,
    x_sum_ptr,
    x_sq_ptr,
    sq_err_ptr,
    N,
    D,
    stride_x,
    stride_x_hat,
    BR: tl.constexpr,
    BD: tl.constexpr,
    ROWS: tl.constexpr,
):
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    col_ok = cols < D
    shift = tl.load(shift_ptr + cols, mask=col_ok, other=0.0)
    col_sum = tl.zeros([BD], tl.float32)
    sq = tl.zeros([BR, BD], tl.float32)
    err = tl.zeros([BR, BD], tl.float32)
    for r0 in range(0, ROWS, BR):
        rows = tl.program_id(0).to(tl.int64) * ROWS + r0 + tl.arange(0, BR)
        ok = (rows[:, None] < N) & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        x_hat = tl.load(x_hat_ptr + rows[:, None] * stride_x_hat + cols[None, :], mask=ok, other=0.0)
        xc = tl.where(ok, x - shift[None, :], 0.0)
        col_sum += tl.sum(xc, axis=0)
        sq += xc * xc
        r = x - x_hat.to(tl.float32)
        err += r * r
    tl.atomic_add(x_sum_ptr + cols, col_sum.to(tl.float64), mask=col_ok, sem="relaxed")
    tl.atomic_add(x_sq_ptr, tl.sum(tl.sum(sq, axis=1), axis=0).to(tl.float64), sem="relaxed")
    tl.atomic_add(sq_err_ptr, tl.sum(tl.sum(err, axis=1), axis=0).to(tl.float64), sem="relaxed")


def feature_sums_(
    grp_M: Tensor,
    raw_M: Tensor,
    fire: Tensor,
    total: Tensor,
    peak: Tensor,
    hist: Tensor,
    log10_range: tuple[float, float],
) -> None:
    """See `mmsae.kernels.feature_sums_`."""
    M = grp_M.shape[0]
    if M == 0:
        return
    lo, hi = log10_range
    _feature_sums_kernel[(triton.cdiv(M, PAIR_BLOCK),)](
        grp_M.contiguous(),
        raw_M.contiguous(),
        fire,
        total,
        peak,
        hist,
        M,
        float(lo),
        float(hi - lo),
        BINS=hist.shape[1],
        BLOCK=PAIR_BLOCK,
        num_warps=4,
    )


def residual_sums_(
    x_ND: Tensor, x_hat_ND: Tensor, shift_D: Tensor, x_sum: Tensor, x_sq: Tensor, sq_err: Tensor
) -> None:
    """See `mmsae.kernels.residual_sums_`."""
    N, D = x_ND.shape
    if N == 0:
        return
    x_ND, x_hat_ND = _rows(x_ND), _rows(x_hat_ND)
    grid = (triton.cdiv(N, ROWS_PER_PROGRAM), triton.cdiv(D, COL_BLOCK))
    _residual_sums_kernel[grid](
        x_ND,
        x_hat_ND,
        shift_D,
        x_sum,
        x_sq,
        sq_err,
        N,
        D,
        x_ND.stride(0),
        x_hat_ND.stride(0),
        BR=ROW_BLOCK,
        BD=COL_BLOCK,
        ROWS=ROWS_PER_PROGRAM,
        num_warps=4,
    )


EMPTY_KEY: tl.constexpr = tl.constexpr(-2147483648)
"""Key of an empty entry (value −∞: no entry), below every other value's key."""


@triton.jit
def _merge_run_kernel(
    top_v_ptr,
    top_meta_ptr,
    start_ptr,
    v_ptr,
    row_ptr,
    meta_ptr,
    n,
    K: tl.constexpr,
    KP: tl.constexpr,
    BF: tl.constexpr,
    DISTINCT: tl.constexpr,
):
    """BF features per program, each merging its run of the chunk's sorted entries into its running top K,
    in place. The run is read KP entries at a time while its next entry beats the K-th of the top. An
    entry's rank is the number of kept entries that precede it (larger value; on a tie the running top, then
    the earlier entry of the run), so no sort is needed: each kept entry is stored at its rank (a top entry
    only if it moved), the slots past the kept ones are emptied, and the top is read back for the next
    window. With DISTINCT an entry whose example a preceding entry holds is not kept."""
    f = tl.program_id(0) * BF + tl.arange(0, BF)
    f_ok = f < n
    s = tl.arange(0, KP)
    in_top = f_ok[:, None] & (s < K)[None, :]
    off = s[None, :].to(tl.int64) * n + f[:, None]
    t_v = tl.load(top_v_ptr + off, mask=in_top, other=float("-inf"))
    t_key = _value_key(t_v)
    pos = tl.load(start_ptr + f, mask=f_ok, other=0)
    end = tl.load(start_ptr + f + 1, mask=f_ok, other=0)
    head = _value_key(tl.load(v_ptr + pos, mask=pos < end, other=float("-inf")))
    active = head > tl.min(tl.where(s[None, :] < K, t_key, 2147483647), axis=1)  # beats the K-th entry
    while tl.max(active.to(tl.int32), axis=0) > 0:
        idx = pos[:, None] + s[None, :]
        w_ok = active[:, None] & (idx < end[:, None])
        w_v = tl.load(v_ptr + idx, mask=w_ok, other=float("-inf"))
        w_key = _value_key(w_v)
        w_row = tl.load(row_ptr + idx, mask=w_ok, other=0) * 3
        w_ex = tl.load(meta_ptr + w_row, mask=w_ok, other=-1)
        t_ex = tl.load(top_meta_ptr + off * 3, mask=in_top & active[:, None], other=-1)
        # [BF, i, j]: entry j precedes entry i (tt: both in the top, tw: j in the window, ...)
        first = s[None, None, :] < s[None, :, None]
        tt = (t_key[:, None, :] > t_key[:, :, None]) | ((t_key[:, None, :] == t_key[:, :, None]) & first)
        tw = w_key[:, None, :] > t_key[:, :, None]
        wt = t_key[:, None, :] >= w_key[:, :, None]
        ww = (w_key[:, None, :] > w_key[:, :, None]) | ((w_key[:, None, :] == w_key[:, :, None]) & first)
        t_real, w_real = t_key != EMPTY_KEY, w_key != EMPTY_KEY
        t_live, w_live = t_real, w_real
        if DISTINCT:  # an example's first entry in this order holds it; no chains: its first is never held
            t_live = t_real & ~_held(tt, t_ex, t_ex, t_real) & ~_held(tw, t_ex, w_ex, w_real)
            w_live = w_real & ~_held(wt, w_ex, t_ex, t_real) & ~_held(ww, w_ex, w_ex, w_real)
        t_rank = _count(tt, t_live) + _count(tw, w_live)
        w_rank = _count(wt, t_live) + _count(ww, w_live)
        t_moves = active[:, None] & t_live & (t_rank < K) & (t_rank != s[None, :])
        w_kept = w_live & (w_rank < K)
        kept = tl.sum(t_live.to(tl.int32), axis=1) + tl.sum(w_live.to(tl.int32), axis=1)
        emptied = in_top & active[:, None] & (s[None, :] >= kept[:, None])
        t_tok = tl.load(top_meta_ptr + off * 3 + 1, mask=t_moves, other=-1)
        t_ts = tl.load(top_meta_ptr + off * 3 + 2, mask=t_moves, other=-1)
        w_tok = tl.load(meta_ptr + w_row + 1, mask=w_kept, other=-1)
        w_ts = tl.load(meta_ptr + w_row + 2, mask=w_kept, other=-1)
        tl.debug_barrier()  # every read of the top before any write to it
        t_to = t_rank.to(tl.int64) * n + f[:, None]
        _store_entry(top_v_ptr, top_meta_ptr, t_to, t_v, t_ex, t_tok, t_ts, t_moves)
        w_to = w_rank.to(tl.int64) * n + f[:, None]
        _store_entry(top_v_ptr, top_meta_ptr, w_to, w_v, w_ex, w_tok, w_ts, w_kept)
        _store_entry(top_v_ptr, top_meta_ptr, off, float("-inf"), -1, -1, -1, emptied)
        tl.debug_barrier()  # every write before the next window's reads
        t_v = tl.load(top_v_ptr + off, mask=in_top, other=float("-inf"))
        t_key = _value_key(t_v)
        pos = tl.where(active, pos + KP, pos)
        head = _value_key(tl.load(v_ptr + pos, mask=active & (pos < end), other=float("-inf")))
        active = active & (head > tl.min(tl.where(s[None, :] < K, t_key, 2147483647), axis=1))


@triton.jit
def _store_entry(top_v_ptr, top_meta_ptr, to, value, ex, tok, ts, mask):
    tl.store(top_v_ptr + to, value, mask=mask)
    tl.store(top_meta_ptr + to * 3, ex, mask=mask)
    tl.store(top_meta_ptr + to * 3 + 1, tok, mask=mask)
    tl.store(top_meta_ptr + to * 3 + 2, ts, mask=mask)


@triton.jit
def _value_key(v):
    """int32 key increasing with the float32 value v, as a stable descending sort orders values: one NaN
    above every number, −0.0 equal to +0.0; −∞ (no entry) gets EMPTY_KEY."""
    v = tl.where(v != v, float("nan"), tl.where(v == 0.0, 0.0, v))
    bits = v.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return tl.where(v == float("-inf"), EMPTY_KEY, key)


@triton.jit
def _held(precedes, ex_i, ex_j, real_j):
    """[BF, i]: whether an entry j that precedes entry i holds i's example."""
    same = (ex_j[:, None, :] == ex_i[:, :, None]) & precedes & real_j[:, None, :]
    return tl.max(same.to(tl.int32), axis=2) > 0


@triton.jit
def _count(precedes, live_j):
    return tl.sum((precedes & live_j[:, None, :]).to(tl.int32), axis=2)


MERGE_BLOCK = 4096
"""Entries of each [BF, KP, KP] comparison one program holds: BF = MERGE_BLOCK / KP² features."""


def merge_sorted_top_(
    top_v: Tensor,
    top_meta: Tensor,
    grp_M: Tensor,
    v_M: Tensor,
    row_M: Tensor,
    meta_N3: Tensor,
    distinct: bool,
) -> None:
    """See `mmsae.kernels.merge_sorted_top_`."""
    k, n = top_v.shape
    if not (top_v.is_contiguous() and top_meta.is_contiguous()):
        raise ValueError("merge_sorted_top_ works in place on contiguous top tables.")
    if n == 0 or k == 0:
        return
    start = torch.searchsorted(grp_M, torch.arange(n + 1, device=grp_M.device, dtype=grp_M.dtype))
    kp = triton.next_power_of_2(k)
    bf = max(1, min(64, MERGE_BLOCK // (kp * kp)))
    _merge_run_kernel[(triton.cdiv(n, bf),)](
        top_v,
        top_meta,
        start,
        v_M.contiguous(),
        row_M.contiguous(),
        meta_N3.contiguous(),
        n,
        K=k,
        KP=kp,
        BF=bf,
        DISTINCT=distinct,
        num_warps=4,
    )
