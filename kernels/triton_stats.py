"""The feature-statistics pass's per-chunk sums in two kernels (`mmsae.analysis.FeatureStats.update`).

Per chunk the torch version runs ~25 small kernels for these sums, each a pass over the chunk's N·k
(token, feature) pairs or over [N, d] float32 temporaries; on a GPU each costs a launch and a few µs
whatever its size. Here the pairs' count, sum, max and log10 histogram are one pass of atomics, and the
reconstruction sums one read of x and x̂. Totals go straight into the float64 accumulators, so chunk
sums are never rounded to float32 as a whole (each program's partial sum still is).
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

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
    x_ND = x_ND if x_ND.stride(1) == 1 else x_ND.contiguous()
    x_hat_ND = x_hat_ND if x_hat_ND.stride(1) == 1 else x_hat_ND.contiguous()
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
