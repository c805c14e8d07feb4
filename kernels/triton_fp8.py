"""Rows to e4m3 with one float32 scale each, in one Triton pass: the operands of the scaled e4m3 GEMM.

Each row is divided by its scale, max(|row|) / 448 (floored so that an all-zero row divides by a tiny number
instead of by zero), so its largest magnitude becomes e4m3's largest finite value and nothing saturates. The
GEMM multiplies the scales back in its epilogue (`triton_gemm.linear_group_maxima(scales=...)`). Tokens are
quantised per chunk (`e4m3_rows(x_BD)`), the encoder's rows once per pass (`e4m3_rows(W_ND)`: one scale per
feature). The same values as `(t.float() / scale).to(torch.float8_e4m3fn)`: IEEE divisions (Triton's `/` on
fp32 is an approximate one) and round to nearest even done in fp32 arithmetic, so that the cast only converts
exactly representable values (Triton's CPU interpreter drops the carry when a value rounds up into the next
binade, 124 → 64 instead of 128, and rounds ties away from zero).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max
E4M3_SCALE_MIN = torch.finfo(torch.float32).tiny
"""Smallest row scale: an all-zero row divides by it instead of by zero."""
ELEMENTS_PER_PROGRAM = 1024
"""Rows per program × padded row length, 4 warps: whole rows in registers (one read of t), 8 values per
thread up to d = 1024, one row per program beyond. At [16384, 768] (centred, H100): 0.035 ms with one row per
program, against 0.039–0.21 for 2–16 rows and 1–8 warps; separate centring and quantising took 0.076."""
ROWS_PER_PROGRAM = 16


@triton.jit
def _round_to_e4m3(v):
    """fp32 v (|v| ≤ 448) rounded to nearest even at e4m3's precision, still fp32: adding and subtracting
    2^(e + 20) (e: v's binary exponent, at least e4m3's −6, below which its steps are 2⁻⁹) leaves v with 3
    mantissa bits, rounded by the fp32 adder; a carry into the next binade comes out right. The sign bit is
    copied back (−0 stays −0, as torch's cast keeps it)."""
    bits = v.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
    magic = ((e + 147) << 23).to(tl.float32, bitcast=True)
    r = (tl.abs(v) + magic) - magic
    r = (r.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)
    return tl.where(v == v, r, v)  # NaN stays NaN


@triton.jit
def _e4m3_rows_kernel(
    t_ptr,
    q_ptr,
    s_ptr,
    shift_ptr,
    lp_ptr,
    R,
    D,
    stride_t,
    SCALE_MIN: tl.constexpr,
    E4M3: tl.constexpr,
    CENTRE: tl.constexpr,
    BR: tl.constexpr,
    BD: tl.constexpr,
):
    """BR whole rows per program: their absmax, their scales, and the rows divided by them as e4m3. With
    CENTRE, the rows are first (t − shift) rounded to lp's dtype, stored there too: what is quantised is
    that 16-bit copy, as if it had been passed in."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BD)
    ok = (rows[:, None] < R) & (cols[None, :] < D)
    rows64 = rows[:, None].to(tl.int64)
    t = tl.load(t_ptr + rows64 * stride_t + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    if CENTRE:
        shift = tl.load(shift_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
        lp = (t - shift[None, :]).to(lp_ptr.dtype.element_ty)
        tl.store(lp_ptr + rows64 * D + cols[None, :], lp, mask=ok)
        t = tl.where(ok, lp.to(tl.float32), 0.0)
    s = tl.math.div_rn(tl.maximum(tl.max(tl.abs(t), axis=1), SCALE_MIN), tl.full([BR], E4M3, tl.float32))
    q = _round_to_e4m3(tl.math.div_rn(t, tl.broadcast_to(s[:, None], (BR, BD))))
    tl.store(q_ptr + rows64 * D + cols[None, :], q.to(tl.float8e4nv), mask=ok)
    tl.store(s_ptr + rows, s, mask=rows < R)


def e4m3_rows(t_RD: Tensor, out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """(t / scale as [R, D] float8_e4m3fn, [R] float32 scales), scale = max(max|row|, E4M3_SCALE_MIN) / 448.

    `out`: a (q_RD, scale_R) pair to write into (contiguous, those dtypes), so a pass over chunks of one
    size allocates once."""
    if t_RD.dim() != 2 or t_RD.stride(1) != 1:
        raise ValueError(f"e4m3_rows takes row-major [R, D] rows, got shape {tuple(t_RD.shape)}.")
    R, D = t_RD.shape
    if out is None:
        q_RD = torch.empty(R, D, dtype=torch.float8_e4m3fn, device=t_RD.device)
        scale_R = torch.empty(R, dtype=torch.float32, device=t_RD.device)
    else:
        q_RD, scale_R = out
        if q_RD.shape != (R, D) or q_RD.dtype != torch.float8_e4m3fn or not q_RD.is_contiguous():
            raise ValueError(f"out's values must be a contiguous [{R}, {D}] float8_e4m3fn tensor.")
        if scale_R.shape != (R,) or scale_R.dtype != torch.float32 or not scale_R.is_contiguous():
            raise ValueError(f"out's scales must be a contiguous [{R}] float32 tensor.")
    _launch(t_RD, q_RD, scale_R, None, None)
    return q_RD, scale_R


def centred_e4m3_rows(x_BD: Tensor, b_D: Tensor, dtype: torch.dtype) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """((x − b) rounded once to the 16-bit `dtype`, `e4m3_rows` of that copy), in one read of x: what
    `triton_dense.center_cast(x, b, dtype)` and then `e4m3_rows` give, one pass instead of two (an encode
    from fp8 candidates needs both, the GEMM the e4m3 rows and the re-score the 16-bit ones)."""
    if x_BD.dim() != 2 or b_D.shape != (x_BD.shape[1],):
        raise ValueError(f"x {tuple(x_BD.shape)}, b {tuple(b_D.shape)}: want [B, d] and [d].")
    if dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"the centred copy must be 16-bit, got {dtype}.")
    x_BD = x_BD if x_BD.stride(1) == 1 else x_BD.contiguous()
    B, d = x_BD.shape
    lp_BD = torch.empty(B, d, dtype=dtype, device=x_BD.device)
    q_BD = torch.empty(B, d, dtype=torch.float8_e4m3fn, device=x_BD.device)
    scale_B = torch.empty(B, dtype=torch.float32, device=x_BD.device)
    _launch(x_BD, q_BD, scale_B, b_D.contiguous(), lp_BD)
    return lp_BD, (q_BD, scale_B)


def _launch(
    t_RD: Tensor, q_RD: Tensor, scale_R: Tensor, shift_D: Tensor | None, lp_RD: Tensor | None
) -> None:
    R, D = t_RD.shape
    if R == 0 or D == 0:
        scale_R.fill_(E4M3_SCALE_MIN / E4M3_MAX)
        return
    BD = triton.next_power_of_2(D)
    BR = max(1, min(ROWS_PER_PROGRAM, ELEMENTS_PER_PROGRAM // BD))
    _e4m3_rows_kernel[(triton.cdiv(R, BR),)](
        t_RD,
        q_RD,
        scale_R,
        t_RD if shift_D is None else shift_D,  # any pointer where there is no shift
        q_RD if lp_RD is None else lp_RD,
        R,
        D,
        t_RD.stride(0),
        SCALE_MIN=E4M3_SCALE_MIN,
        E4M3=E4M3_MAX,
        CENTRE=shift_D is not None,
        BR=BR,
        BD=BD,
        num_warps=4,
    )
