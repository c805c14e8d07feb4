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


@triton.jit
def _merge_top_kernel(
    top_v_ptr,
    top_meta_ptr,
    best_v_ptr,
    best_meta_ptr,
    out_v_ptr,
    out_meta_ptr,
    n,
    K: tl.constexpr,
    K2: tl.constexpr,
    BF: tl.constexpr,
):
    """Per feature (a column of the [K, n] tops), the K largest of its 2K entries, ties to the running top
    and then to the lower row (a stable sort's order): one sort of packed int64 keys, (value key, 2K − 1 −
    entry), the value's order-preserving 32-bit key in the high half."""
    f = tl.program_id(0) * BF + tl.arange(0, BF)
    j = tl.arange(0, K2)
    f_ok = (f < n)[:, None]
    from_top = (j < K)[None, :]
    real = f_ok & (j < 2 * K)[None, :]
    off = tl.where(from_top, j[None, :], j[None, :] - K).to(tl.int64) * n + f[:, None]
    v = tl.where(
        from_top,
        tl.load(top_v_ptr + off, mask=real & from_top, other=float("-inf")),
        tl.load(best_v_ptr + off, mask=real & ~from_top, other=float("-inf")),
    )
    packed = tl.sort(_merge_keys(v, j[None, :], real, K), dim=1, descending=True)

    entry = 2 * K - 1 - (packed & 0xFFFFFFFF)  # the first K are real entries: there are 2K ≥ K of them
    keep = f_ok & (j < K)[None, :]
    src_top = entry < K
    src = tl.where(src_top, entry, entry - K) * n + f[:, None]
    value = tl.where(
        src_top,
        tl.load(top_v_ptr + src, mask=keep & src_top, other=0.0),
        tl.load(best_v_ptr + src, mask=keep & ~src_top, other=0.0),
    )
    out = j[None, :].to(tl.int64) * n + f[:, None]
    tl.store(out_v_ptr + out, value, mask=keep)
    _store_merged_meta(top_meta_ptr, best_meta_ptr, out_meta_ptr, src, src_top, out, keep, value)


@triton.jit
def _merge_keys(v, entry, real, K: tl.constexpr):
    """int64 keys whose descending order is a stable descending sort of the values v of entries 0..2K−1:
    the value's order-preserving 32-bit key in the high half, 2K − 1 − entry in the low half (ties to the
    lower entry). Keys compare as the sort compares values: one NaN above every number, −0.0 equal to +0.0;
    entries that are not `real` sort last."""
    v = tl.where(v != v, float("nan"), tl.where(v == 0.0, 0.0, v))
    bits = v.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)  # signed, increases with v
    return tl.where(real, key * 4294967296 + (2 * K - 1 - entry), -9223372036854775807)


@triton.jit
def _store_merged_meta(top_meta_ptr, best_meta_ptr, out_meta_ptr, src, src_top, out, keep, value):
    """Each kept entry's (example, token, timestep) from the table it came from, −1 where its value is −∞
    (no example: dropped duplicates leave their ids behind)."""
    empty = value == float("-inf")
    for c in tl.static_range(3):
        meta = tl.where(
            src_top,
            tl.load(top_meta_ptr + src * 3 + c, mask=keep & src_top, other=-1),
            tl.load(best_meta_ptr + src * 3 + c, mask=keep & ~src_top, other=-1),
        )
        tl.store(out_meta_ptr + out * 3 + c, tl.where(empty, -1, meta), mask=keep)


MERGE_FEATURES = 64


def merge_top(top_v: Tensor, top_meta: Tensor, best_v: Tensor, best_meta: Tensor) -> tuple[Tensor, Tensor]:
    """See `mmsae.kernels.merge_top`."""
    k, n = top_v.shape
    out_v, out_meta = torch.empty_like(top_v), torch.empty_like(top_meta)
    _merge_top_kernel[(triton.cdiv(n, MERGE_FEATURES),)](
        top_v.contiguous(),
        top_meta.contiguous(),
        best_v.contiguous(),
        best_meta.contiguous(),
        out_v,
        out_meta,
        n,
        K=k,
        K2=triton.next_power_of_2(2 * k),
        BF=MERGE_FEATURES,
        num_warps=4,
    )
    return out_v, out_meta
