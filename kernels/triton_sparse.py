"""Sparse (values, indices) × dense-table kernels: everything a TopK SAE needs besides the encoder GEMM.

With codes of k entries per row out of n latents, and a table W of n rows × d:
- `gather_sum`:   out[b] = Σ_j w[b, j] · W[idx[b, j]] (+ bias)    (decoder forward, encoder dx)
- `gather_dot`:   out[b, j] = ⟨g[b], W[idx[b, j]]⟩                 (decoder d values)
- `segment_matmul`: out[i] = Σ_{(b, j): idx[b, j] = i} w[b, j] · X[b]  (dW_dec, dW_enc)

`segment_matmul` sorts the B·k entries by latent once, then one program owns a block of latents
and sums their rows: every output row is written exactly once (zeros for latents nobody chose),
so there are no atomics and no dense B×n gradient. Accumulation is fp32 everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _gather_sum_kernel(
    w_ptr,
    idx_ptr,
    table_ptr,
    bias_ptr,
    out_ptr,
    k,
    d,
    stride_code,
    stride_table,
    stride_out,
    HAS_BIAS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    d_offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d_offs < d
    if HAS_BIAS:
        acc = tl.load(bias_ptr + d_offs, mask=d_ok, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j0 in range(0, k, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        j_ok = j < k
        idx = tl.load(idx_ptr + row * stride_code + j, mask=j_ok, other=0)
        w = tl.load(w_ptr + row * stride_code + j, mask=j_ok, other=0.0).to(tl.float32)
        atoms = tl.load(
            table_ptr + idx[:, None] * stride_table + d_offs[None, :],
            mask=j_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        acc += tl.sum(atoms.to(tl.float32) * w[:, None], 0)
    tl.store(out_ptr + row * stride_out + d_offs, acc.to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _gather_dot_kernel(
    g_ptr,
    idx_ptr,
    table_ptr,
    out_ptr,
    k,
    d,
    stride_g,
    stride_code,
    stride_table,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    j_ok = j < k
    idx = tl.load(idx_ptr + row * stride_code + j, mask=j_ok, other=0)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        d_offs = d0 + tl.arange(0, BLOCK_D)
        d_ok = d_offs < d
        g = tl.load(g_ptr + row * stride_g + d_offs, mask=d_ok, other=0.0).to(tl.float32)
        atoms = tl.load(
            table_ptr + idx[:, None] * stride_table + d_offs[None, :],
            mask=j_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        acc += tl.sum(atoms.to(tl.float32) * g[None, :], 1)
    tl.store(out_ptr + row * stride_code + j, acc.to(out_ptr.dtype.element_ty), mask=j_ok)


@triton.jit
def _segment_matmul_kernel(
    seg_ptr,
    row_ptr,
    coef_ptr,
    dense_ptr,
    out_ptr,
    sums_ptr,
    n,
    d,
    stride_dense,
    stride_out,
    WRITE_SUMS: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # A tile of BLOCK_L latents × BLOCK_D columns; step t adds the t-th entry of every latent's
    # segment at once, so BLOCK_L independent row gathers are in flight instead of one.
    lat = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    lat_ok = lat < n
    begin = tl.load(seg_ptr + lat, mask=lat_ok, other=0)
    length = tl.load(seg_ptr + lat + 1, mask=lat_ok, other=0) - begin
    d_offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d_offs < d
    acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
    coef_sum = tl.zeros([BLOCK_L], dtype=tl.float32)
    for t in range(0, tl.max(length, 0)):
        live = t < length
        rows = tl.load(row_ptr + begin + t, mask=live, other=0).to(tl.int64)
        coef = tl.load(coef_ptr + begin + t, mask=live, other=0.0).to(tl.float32)
        x = tl.load(
            dense_ptr + rows[:, None] * stride_dense + d_offs[None, :],
            mask=live[:, None] & d_ok[None, :],
            other=0.0,
        )
        acc += x.to(tl.float32) * coef[:, None]
        coef_sum += coef
    out = out_ptr + lat[:, None].to(tl.int64) * stride_out + d_offs[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=lat_ok[:, None] & d_ok[None, :])
    if WRITE_SUMS:  # each latent's coefficient sum (the encoder's bias gradient), from the first column block
        tl.store(sums_ptr + lat, coef_sum, mask=lat_ok & (tl.program_id(1) == 0))


def check_codes(w_BK: Tensor, idx_BK: Tensor) -> None:
    if w_BK.shape != idx_BK.shape or w_BK.dim() != 2:
        raise ValueError(f"values {tuple(w_BK.shape)} and indices {tuple(idx_BK.shape)} must both be [B, k].")
    if not (w_BK.is_contiguous() and idx_BK.is_contiguous()):
        raise ValueError("values and indices must be contiguous; call .contiguous() first.")


def _block_d(d: int, cap: int = 256) -> int:
    return min(triton.next_power_of_2(d), cap)


def gather_sum_into(
    w_BK: Tensor,
    idx_BK: Tensor,
    table_ND: Tensor,
    out_BD: Tensor,
    block_k: int | None = None,
    block_d: int | None = None,
    num_warps: int | None = None,
    bias_D: Tensor | None = None,
) -> None:
    check_codes(w_BK, idx_BK)
    B, k = w_BK.shape
    d = table_ND.shape[1]
    # H100 sweep (kernels-notes v6): 16-bit atoms want 512-column tiles (1 KB per gathered row) with
    # 2 warps, 2.1–4.6× faster than their old 256-column default; 4-byte atoms keep 256 columns.
    default_k, default_d, default_warps = (16, 512, 2) if table_ND.element_size() == 2 else (32, 256, 4)
    block_d = _block_d(d, block_d or default_d)
    grid = (B, triton.cdiv(d, block_d))
    _gather_sum_kernel[grid](
        w_BK,
        idx_BK,
        table_ND,
        table_ND if bias_D is None else bias_D.contiguous(),  # any pointer when there is no bias
        out_BD,
        k,
        d,
        w_BK.stride(0),
        table_ND.stride(0),
        out_BD.stride(0),
        HAS_BIAS=bias_D is not None,
        BLOCK_K=min(triton.next_power_of_2(k), block_k or default_k),
        BLOCK_D=block_d,
        num_warps=num_warps or default_warps,
    )


def gather_sum(w_BK: Tensor, idx_BK: Tensor, table_ND: Tensor, out_dtype: torch.dtype,
               bias_D: Tensor | None = None) -> Tensor:
    out_BD = torch.empty(w_BK.shape[0], table_ND.shape[1], dtype=out_dtype, device=w_BK.device)
    gather_sum_into(w_BK, idx_BK, table_ND, out_BD, bias_D=bias_D)
    return out_BD


def gather_dot_into(g_BD: Tensor, idx_BK: Tensor, table_ND: Tensor, out_BK: Tensor) -> None:
    check_codes(out_BK, idx_BK)
    B, k = idx_BK.shape
    d = table_ND.shape[1]
    block_k = min(triton.next_power_of_2(k), 64)
    grid = (B, triton.cdiv(k, block_k))
    _gather_dot_kernel[grid](
        g_BD,
        idx_BK,
        table_ND,
        out_BK,
        k,
        d,
        g_BD.stride(0),
        idx_BK.stride(0),
        table_ND.stride(0),
        BLOCK_K=block_k,
        BLOCK_D=_block_d(d, 128),
    )


def gather_dot(g_BD: Tensor, idx_BK: Tensor, table_ND: Tensor, out_dtype: torch.dtype) -> Tensor:
    out_BK = torch.empty(idx_BK.shape, dtype=out_dtype, device=idx_BK.device)
    gather_dot_into(g_BD, idx_BK, table_ND, out_BK)
    return out_BK


@dataclass(frozen=True)
class LatentSort:
    """The B·k entries of an index array in latent order: what both backward passes' segment matmuls
    read, so one sort per step can serve the encoder's and the decoder's (`triton_ops`)."""

    order: Tensor
    """[B·k] int64: flat entry positions, sorted by latent."""
    rows: Tensor
    """[B·k] int32: the token (row) of each sorted entry."""
    seg: Tensor
    """[n + 1] int32: latent i's entries are order[seg[i]:seg[i + 1]]."""


def sort_by_latent(idx_BK: Tensor, n: int) -> LatentSort:
    # Narrow keys, fewer radix-sort passes in torch.sort (stable, so deterministic): int16 for up to 2¹⁶
    # latents (shifted by 2¹⁵ to keep the order), int32 beyond.
    shift, dtype = (1 << 15, torch.int16) if n <= 1 << 16 else (0, torch.int32)
    sorted_keys, order = torch.sort((idx_BK.flatten() - shift).to(dtype), stable=True)
    # Segment i of the sorted entries is [seg[i], seg[i+1]); the last bound is the entry count.
    starts = torch.searchsorted(sorted_keys, (torch.arange(n, device=idx_BK.device) - shift).to(dtype))
    seg = torch.cat([starts.to(torch.int32), starts.new_full((1,), idx_BK.numel(), dtype=torch.int32)])
    return LatentSort(order, (order // idx_BK.shape[1]).to(torch.int32), seg)


def segment_matmul_into(w_BK: Tensor, idx_BK: Tensor, dense_BD: Tensor, out_ND: Tensor,
                        by_latent: LatentSort | None = None, scale: Tensor | None = None,
                        sums_N: Tensor | None = None) -> None:
    """out[i] = scale · Σ_{(b, j): idx[b, j] = i} w[b, j] · dense[b]; every row of out is written.
    `by_latent`, when given, must be `sort_by_latent(idx_BK, n)`; `scale` a one-element fp32 tensor;
    `sums_N`, an fp32 [n] tensor, receives scale · Σ_{(b, j): idx[b, j] = i} w[b, j] (deterministic)."""
    check_codes(w_BK, idx_BK)
    n, d = out_ND.shape
    by_latent = by_latent or sort_by_latent(idx_BK, n)
    seg, rows = by_latent.seg, by_latent.rows
    coef = w_BK.flatten()[by_latent.order]
    if scale is not None:  # on the B·k coefficients (fp32), not on the n × d output
        coef = coef.float() * scale.reshape(1)
    block_l, block_d = 16, _block_d(d, 128)
    grid = (triton.cdiv(n, block_l), triton.cdiv(d, block_d))
    _segment_matmul_kernel[grid](
        seg,
        rows,
        coef,
        dense_BD,
        out_ND,
        out_ND if sums_N is None else sums_N,  # any pointer when no sums are wanted
        n,
        d,
        dense_BD.stride(0),
        out_ND.stride(0),
        WRITE_SUMS=sums_N is not None,
        BLOCK_L=block_l,
        BLOCK_D=block_d,
        num_warps=4,
    )


def segment_matmul(w_BK: Tensor, idx_BK: Tensor, dense_BD: Tensor, n: int, out_dtype: torch.dtype,
                   by_latent: LatentSort | None = None, scale: Tensor | None = None,
                   sums_N: Tensor | None = None) -> Tensor:
    out_ND = torch.empty(n, dense_BD.shape[1], dtype=out_dtype, device=dense_BD.device)
    segment_matmul_into(w_BK, idx_BK, dense_BD, out_ND, by_latent, scale, sums_N)
    return out_ND
