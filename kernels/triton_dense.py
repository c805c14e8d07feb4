"""Dense [B, d] row kernels around the sparse ones, each replacing a chain of torch element-wise ops that
would read and write the activations several times (docs/kernels-notes.md):

- `center_cast`: (x − b) in the GEMM's dtype in one pass (torch: a promoting subtract to fp32, then a cast).
- `recon_sums` + `scaled_diff`: the normalised MSE Σ(x − x̂)² / Σ(x − x̄)² in one pass and its gradient
  2·g·(x̂ − x) / Σ(x − x̄)² in another (torch: ~10 kernels forward and ~6 backward at size 1 of the
  benchmark, 0.5 ms of a 2.8 ms step).
- `col_sums`: column sums in fp32, optionally weighted per row or writing a 16-bit copy in the same pass (the
  decoder's backward: its bias gradient, and the 16-bit output gradient its gathers read at half the bytes;
  the encoder's: the centring bias's gradient, a GEMV over the 16-bit W_enc the GEMM read).

Sums are fp32 and deterministic: each program writes its partial sums, torch adds them up.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_B, BLOCK_D = 16, 256
SUM_ROWS, SUM_COLS = 128, 64
"""`col_sums` tile: one [128, 64] tile per program, 1 warp (2 for 4-byte inputs): 8.6 µs for a bf16
[16384, 768] on the H100, against 22.9 µs for [32, 256] tiles with 4 warps."""


@triton.jit
def _tile(row0, col0, B, d, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows (int64, [BLOCK_B, 1]), columns ([1, BLOCK_D]) and in-bounds mask of the tile at (row0, col0)."""
    rows = row0 + tl.arange(0, BLOCK_B)[:, None]
    cols = col0 + tl.arange(0, BLOCK_D)[None, :]
    return rows.to(tl.int64), cols, (rows < B) & (cols < d)


@triton.jit
def _center_cast_kernel(
    x_ptr, b_ptr, out_ptr, B, d, stride_x, stride_out, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr
):
    rows, cols, ok = _tile(tl.program_id(0) * BLOCK_B, tl.program_id(1) * BLOCK_D, B, d, BLOCK_B, BLOCK_D)
    x = tl.load(x_ptr + rows * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cols < d, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows * stride_out + cols, (x - b).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _recon_sums_kernel(
    x_ptr, xh_ptr, mean_ptr, part_ptr, B, d, stride_x, stride_xh, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr
):
    pid = tl.program_id(0)
    err = tl.zeros([BLOCK_B], dtype=tl.float32)
    var = tl.zeros([BLOCK_B], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        rows, cols, ok = _tile(pid * BLOCK_B, d0, B, d, BLOCK_B, BLOCK_D)
        x = tl.load(x_ptr + rows * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        xh = tl.load(xh_ptr + rows * stride_xh + cols, mask=ok, other=0.0).to(tl.float32)
        mu = tl.load(mean_ptr + cols, mask=cols < d, other=0.0)
        e = xh - x
        c = tl.where(ok, x - mu, 0.0)
        err += tl.sum(e * e, 1)
        var += tl.sum(c * c, 1)
    tl.store(part_ptr + pid, tl.sum(err, 0))
    tl.store(part_ptr + tl.num_programs(0) + pid, tl.sum(var, 0))


@triton.jit
def _scaled_diff_kernel(
    x_ptr,
    xh_ptr,
    scale_ptr,
    out_ptr,
    B,
    d,
    stride_x,
    stride_xh,
    stride_out,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows, cols, ok = _tile(tl.program_id(0) * BLOCK_B, tl.program_id(1) * BLOCK_D, B, d, BLOCK_B, BLOCK_D)
    x = tl.load(x_ptr + rows * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    xh = tl.load(xh_ptr + rows * stride_xh + cols, mask=ok, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr)
    tl.store(out_ptr + rows * stride_out + cols, ((xh - x) * scale).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _col_sums_kernel(
    x_ptr,
    w_ptr,
    copy_ptr,
    part_ptr,
    B,
    d,
    stride_x,
    stride_copy,
    WEIGHTED: tl.constexpr,
    WRITE_COPY: tl.constexpr,
    SUM_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One tile per program and no loop: ~1.5k one-warp programs at size 1 keep enough loads in flight (a loop
    # over 128-row blocks ran at a third of the bandwidth on the H100).
    pid_b = tl.program_id(0)
    rows, cols, ok = _tile(pid_b * SUM_ROWS, tl.program_id(1) * BLOCK_D, B, d, SUM_ROWS, BLOCK_D)
    x = tl.load(x_ptr + rows * stride_x + cols, mask=ok, other=0.0)
    if WRITE_COPY:
        tl.store(copy_ptr + rows * stride_copy + cols, x.to(copy_ptr.dtype.element_ty), mask=ok)
    x = x.to(tl.float32)
    if WEIGHTED:
        x *= tl.load(w_ptr + rows, mask=rows < B, other=0.0).to(tl.float32)
    sums = tl.sum(x, 0, keep_dims=True)
    tl.store(part_ptr + cols.to(tl.int64) * tl.num_programs(0) + pid_b, sums, mask=cols < d)


def _rows(t: Tensor) -> Tensor:
    """[B, d] with unit column stride (a view when it already is one)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def center_cast(x_BD: Tensor, b_D: Tensor, dtype: torch.dtype) -> Tensor:
    """(x − b) computed in fp32 and rounded once to `dtype`: what `(x - b).to(dtype)` gives."""
    x_BD = _rows(x_BD)
    B, d = x_BD.shape
    out_BD = torch.empty(B, d, dtype=dtype, device=x_BD.device)
    grid = (triton.cdiv(B, BLOCK_B), triton.cdiv(d, BLOCK_D))
    _center_cast_kernel[grid](
        x_BD,
        b_D.contiguous(),
        out_BD,
        B,
        d,
        x_BD.stride(0),
        out_BD.stride(0),
        BLOCK_B=BLOCK_B,
        BLOCK_D=BLOCK_D,
    )
    return out_BD


def recon_sums(x_BD: Tensor, x_hat_BD: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ (x̂ − x)², Σ (x − x̄)²) over all entries, fp32 scalars on the device; x̄ the column means."""
    x_BD, x_hat_BD = _rows(x_BD), _rows(x_hat_BD)
    B, d = x_BD.shape
    mean_D = col_sums(x_BD)[0] / B
    n_programs = triton.cdiv(B, BLOCK_B)
    part = torch.empty(2, n_programs, dtype=torch.float32, device=x_BD.device)
    _recon_sums_kernel[(n_programs,)](
        x_BD,
        x_hat_BD,
        mean_D,
        part,
        B,
        d,
        x_BD.stride(0),
        x_hat_BD.stride(0),
        BLOCK_B=BLOCK_B,
        BLOCK_D=BLOCK_D,
    )
    err, var = part.sum(1).unbind()
    return err, var


def scaled_diff(x_BD: Tensor, x_hat_BD: Tensor, scale: Tensor) -> Tensor:
    """scale · (x̂ − x) in x̂'s dtype and shape; `scale` a one-element fp32 tensor on the device."""
    shape = x_hat_BD.shape
    x_BD, x_hat_BD = _rows(x_BD), _rows(x_hat_BD)
    B, d = x_BD.shape
    out_BD = torch.empty(B, d, dtype=x_hat_BD.dtype, device=x_BD.device)
    grid = (triton.cdiv(B, BLOCK_B), triton.cdiv(d, BLOCK_D))
    _scaled_diff_kernel[grid](
        x_BD,
        x_hat_BD,
        scale.float().reshape(1),
        out_BD,
        B,
        d,
        x_BD.stride(0),
        x_hat_BD.stride(0),
        out_BD.stride(0),
        BLOCK_B=BLOCK_B,
        BLOCK_D=BLOCK_D,
    )
    return out_BD.reshape(shape)


def col_sums(
    x_BD: Tensor, copy_dtype: torch.dtype | None = None, weights_B: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """(Σ_b w[b]·x[b] in fp32 [d] (w = 1 without `weights_B`), x in `copy_dtype` or None), reading x once."""
    x_BD = _rows(x_BD)
    B, d = x_BD.shape
    copy_BD = None if copy_dtype is None else torch.empty(B, d, dtype=copy_dtype, device=x_BD.device)
    grid = (triton.cdiv(B, SUM_ROWS), triton.cdiv(d, SUM_COLS))
    # [d, programs]: the final sum runs along rows (torch's column-wise reduce of [programs, d] took 12 µs).
    part = torch.empty(d, grid[0], dtype=torch.float32, device=x_BD.device)
    if weights_B is not None and weights_B.shape != (B,):
        raise ValueError(f"weights {tuple(weights_B.shape)} must be one per row of x {tuple(x_BD.shape)}.")
    _col_sums_kernel[grid](
        x_BD,
        x_BD if weights_B is None else weights_B.contiguous(),
        x_BD if copy_BD is None else copy_BD,
        part,
        B,
        d,
        x_BD.stride(0),
        d if copy_BD is None else copy_BD.stride(0),
        WEIGHTED=weights_B is not None,
        WRITE_COPY=copy_BD is not None,
        SUM_ROWS=SUM_ROWS,
        BLOCK_D=SUM_COLS,
        num_warps=2 if x_BD.element_size() == 4 else 1,
    )
    return part.sum(1), copy_BD
