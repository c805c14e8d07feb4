"""The decoder's forward fused with the normalised MSE and with its own backward's dot products.

Training computes x̂ = Σ_j v[b, j] · W[idx[b, j]] + bias, then Σ(x − x̂)² / Σ(x − x̄)², then in backward the
output gradient dy = s·(x̂ − x) (s = 2·g / Σ(x − x̄)²) and ⟨dy, W[idx[b, j]]⟩ for every code. Unfused,
that chain reads the k atoms of a row twice (the forward's gather-sum and the backward's gather-dot) and x̂
four more times (loss sums, gradient, its 16-bit copy and column sums). `decode_mse` reads each atom once:
a column chunk of a row's atoms gives that chunk of x̂, of r = x̂ − x, and the chunk's share of every
⟨r, atom⟩, so the backward's dots are ready (up to the scalar s, known only in backward) when
the forward ends.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from mmsae.kernels.triton_dense import col_sums
from mmsae.kernels.triton_sparse import check_codes

TILE_ELEMENTS, MAX_BLOCK_D = 4096, 64
"""Atoms tile per warp (BLOCK_K × BLOCK_D ≤ TILE_ELEMENTS, BLOCK_D ≤ MAX_BLOCK_D). One warp per row with a
[32, 64] or [64, 64] tile was the fastest on the H100 at the four benchmark sizes: 234 /
291 / 358 / 800 µs against 243 / 401 / 534 / 1301 µs for the gather-sum and gather-dot it replaces; more
warps per row or wider tiles were slower (fewer rows in flight per SM)."""


@triton.jit
def _decode_mse_kernel(
    w_ptr,
    idx_ptr,
    table_ptr,
    bias_ptr,
    x_ptr,
    mean_ptr,
    out_ptr,
    r_ptr,
    dots_ptr,
    part_ptr,
    B,
    k,
    d,
    stride_code,
    stride_table,
    stride_x,
    stride_out,
    stride_r,
    HAS_BIAS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_K)
    j_ok = j < k
    idx = tl.load(idx_ptr + row * stride_code + j, mask=j_ok, other=0)
    w = tl.load(w_ptr + row * stride_code + j, mask=j_ok, other=0.0).to(tl.float32)
    dots = tl.zeros([BLOCK_K], dtype=tl.float32)
    err = tl.zeros([BLOCK_D], dtype=tl.float32)
    var = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        c_ok = cols < d
        atoms = tl.load(
            table_ptr + idx[:, None] * stride_table + cols[None, :],
            mask=j_ok[:, None] & c_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        x_hat = tl.sum(atoms * w[:, None], 0)
        if HAS_BIAS:
            x_hat += tl.load(bias_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
        # The loss sees x̂ as stored (rounded to the output dtype), as the unfused reference does.
        x_hat = x_hat.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + row * stride_out + cols, x_hat, mask=c_ok)
        x = tl.load(x_ptr + row * stride_x + cols, mask=c_ok, other=0.0).to(tl.float32)
        r = tl.where(c_ok, x_hat.to(tl.float32) - x, 0.0)
        tl.store(r_ptr + row * stride_r + cols, r.to(r_ptr.dtype.element_ty), mask=c_ok)
        dots += tl.sum(atoms * r[None, :], 1)
        c = tl.where(c_ok, x - tl.load(mean_ptr + cols, mask=c_ok, other=0.0), 0.0)
        err += r * r
        var += c * c
    tl.store(dots_ptr + row * stride_code + j, dots, mask=j_ok)
    tl.store(part_ptr + row, tl.sum(err, 0))
    tl.store(part_ptr + B + row, tl.sum(var, 0))


@dataclass(frozen=True)
class DecodeMSE:
    """What `decode_mse` computes for one batch."""

    x_hat: Tensor
    """[B, d] Σ_j v[b, j] · W[idx[b, j]] (+ bias), in `out_dtype`."""
    residual: Tensor
    """[B, d] x̂ − x in the codes' dtype: the backward's output gradient up to the scale s."""
    dots: Tensor
    """[B, k] fp32 ⟨x̂ − x, W[idx[b, j]]⟩: the codes' gradient up to s."""
    err_sum: Tensor
    """fp32 scalar Σ (x̂ − x)²."""
    var_sum: Tensor
    """fp32 scalar Σ (x − x̄)², x̄ the column means of x."""


def tile_config(k: int) -> tuple[int, int, int]:
    """(BLOCK_K, BLOCK_D, num_warps): all k atoms of a row in one tile of ~TILE_ELEMENTS per warp."""
    block_k = triton.next_power_of_2(k)
    block_d = max(16, min(MAX_BLOCK_D, TILE_ELEMENTS // block_k))
    return block_k, block_d, max(1, block_k * block_d // TILE_ELEMENTS)


def decode_mse(
    w_BK: Tensor,
    idx_BK: Tensor,
    table_ND: Tensor,
    x_BD: Tensor,
    out_dtype: torch.dtype,
    bias_D: Tensor | None = None,
) -> DecodeMSE:
    """x̂ = Σ_j w[b, j] · table[idx[b, j]] (+ bias) with the loss sums, residual and dots of `DecodeMSE`."""
    check_codes(w_BK, idx_BK)
    B, k = w_BK.shape
    d = table_ND.shape[1]
    if x_BD.shape != (B, d) or x_BD.stride(-1) != 1:
        raise ValueError(
            f"x {tuple(x_BD.shape)} must be [B, d] = [{B}, {d}] (the codes' rows, the decoder's "
            "width) with unit column stride."
        )
    mean_D = col_sums(x_BD)[0] / B
    x_hat = torch.empty(B, d, dtype=out_dtype, device=w_BK.device)
    residual = torch.empty(B, d, dtype=w_BK.dtype, device=w_BK.device)
    dots = torch.empty(B, k, dtype=torch.float32, device=w_BK.device)
    part = torch.empty(2, B, dtype=torch.float32, device=w_BK.device)  # summed along rows: fast in torch
    block_k, block_d, warps = tile_config(k)
    _decode_mse_kernel[(B,)](
        w_BK,
        idx_BK,
        table_ND,
        table_ND if bias_D is None else bias_D.contiguous(),
        x_BD,
        mean_D,
        x_hat,
        residual,
        dots,
        part,
        B,
        k,
        d,
        w_BK.stride(0),
        table_ND.stride(0),
        x_BD.stride(0),
        x_hat.stride(0),
        residual.stride(0),
        HAS_BIAS=bias_D is not None,
        BLOCK_K=block_k,
        BLOCK_D=block_d,
        num_warps=warps,
    )
    err_sum, var_sum = part.sum(1).unbind()
    return DecodeMSE(x_hat, residual, dots, err_sum, var_sum)
