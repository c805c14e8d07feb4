"""Sparse (values, indices) × dense-table kernels: everything a TopK SAE needs besides the encoder GEMM.

With codes of k entries per row out of n features, and a table W of n rows × d:
- `gather_sum`:   out[b] = Σ_j w[b, j] · W[idx[b, j]] (+ bias)    (decoder forward, encoder dx)
- `gather_dot`:   out[b, j] = ⟨g[b], W[idx[b, j]]⟩                 (decoder d values)
- `segment_matmul`: out[i] = Σ_{(b, j): idx[b, j] = i} w[b, j] · X[b]  (dW_dec, dW_enc)

`segment_matmul` sorts the B·k entries by feature once, then one program owns a block of features
and sums their rows: every output row is written exactly once (zeros for features nobody chose),
so there are no atomics and no dense B×n gradient. A feature with more than 256 entries is split over
several programs whose partial sums a second pass adds in order. Accumulation is fp32 everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from mmsae.legacy_names import module_getattr


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
    item_begin_ptr,
    item_len_ptr,
    item_dest_ptr,
    row_ptr,
    coef_ptr,
    dense_ptr,
    out_ptr,
    sums_ptr,
    part_ptr,
    part_sums_ptr,
    n_items,
    d,
    stride_dense,
    stride_out,
    WRITE_SUMS: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # A tile of BLOCK_L work items × BLOCK_D columns (`FeatureSort`: a feature's segment, or a chunk of a long
    # one); step t adds the t-th entry of every item at once, so BLOCK_L independent row gathers are in flight
    # instead of one. Items follow the features' by-length order, so a tile's items have about the same length
    # and the loop, which runs to the longest, wastes little.
    item = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    item_ok = item < n_items
    begin = tl.load(item_begin_ptr + item, mask=item_ok, other=0)
    length = tl.load(item_len_ptr + item, mask=item_ok, other=-1)
    dest = tl.load(item_dest_ptr + item, mask=item_ok, other=0)
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
    # A whole segment goes to its feature's output row (dest ≥ 0); a chunk of a long one to fp32 partial row
    # −1 − dest, which `_segment_reduce_kernel` adds up in order: deterministic, no atomics. Length −1: no
    # item (the arrays' static tail).
    whole = (length >= 0) & (dest >= 0)
    part = (length >= 0) & (dest < 0)
    out = out_ptr + dest[:, None].to(tl.int64) * stride_out + d_offs[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=whole[:, None] & d_ok[None, :])
    parts = part_ptr + (-1 - dest[:, None]).to(tl.int64) * d + d_offs[None, :]
    tl.store(parts, acc, mask=part[:, None] & d_ok[None, :])
    if (
        WRITE_SUMS
    ):  # each feature's coefficient sum (the encoder's bias gradient), from the first column block
        first = tl.program_id(1) == 0
        tl.store(sums_ptr + dest, coef_sum, mask=whole & first)
        tl.store(part_sums_ptr + (-1 - dest), coef_sum, mask=part & first)


@triton.jit
def _slot_segment(by_length_ptr, seg_ptr, slot, ok, CHUNK: tl.constexpr):
    """(feature, first sorted entry, entry count, work items = max(1, ⌈count / CHUNK⌉)) at by-length `slot`:
    the one chunking rule of the three kernels below."""
    lat = tl.load(by_length_ptr + slot, mask=ok, other=0)
    begin = tl.load(seg_ptr + lat, mask=ok, other=0)
    length = tl.load(seg_ptr + lat + 1, mask=ok, other=0) - begin
    return lat, begin, length, tl.maximum((length + CHUNK - 1) // CHUNK, 1)


@triton.jit
def _chunk_count_kernel(by_length_ptr, seg_ptr, chunks_ptr, n, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    slot = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = slot < n
    chunks = _slot_segment(by_length_ptr, seg_ptr, slot, ok, CHUNK)[3]
    tl.store(chunks_ptr + slot, chunks, mask=ok)


@triton.jit
def _work_items_kernel(
    by_length_ptr,
    seg_ptr,
    item_end_ptr,
    item_begin_ptr,
    item_len_ptr,
    item_dest_ptr,
    n,
    n_items,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Slot s's items are [item_end[s − 1], item_end[s]): chunk c starts c·CHUNK entries into the segment.
    # Items past the last one (the arrays have a static size) get length −1.
    slot = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = slot < n
    lat, seg_begin, length, chunks = _slot_segment(by_length_ptr, seg_ptr, slot, ok, CHUNK)
    chunks = tl.where(ok, chunks, 0)
    end = tl.load(item_end_ptr + slot, mask=ok, other=0)
    for c in range(0, tl.max(chunks, 0)):
        live = c < chunks
        item = end - chunks + c
        tl.store(item_begin_ptr + item, seg_begin + c * CHUNK, mask=live)
        tl.store(item_len_ptr + item, tl.minimum(length - c * CHUNK, CHUNK), mask=live)
        tl.store(item_dest_ptr + item, tl.where(chunks == 1, lat, -1 - item), mask=live)
    total = tl.load(item_end_ptr + n - 1)
    for tail in range(tl.program_id(0) * BLOCK, n_items, tl.num_programs(0) * BLOCK):
        item = tail + tl.arange(0, BLOCK)
        tl.store(item_len_ptr + item, -1, mask=(item >= total) & (item < n_items))


@triton.jit
def _segment_reduce_kernel(
    item_end_ptr,
    lat_ptr,
    seg_ptr,
    part_ptr,
    part_sums_ptr,
    out_ptr,
    sums_ptr,
    d,
    stride_out,
    WRITE_SUMS: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per (by-length slot, column block); only the slots of split features have work.
    slot = tl.program_id(0)
    lat, _, _, n_chunks = _slot_segment(lat_ptr, seg_ptr, slot, slot >= 0, CHUNK)
    if n_chunks > 1:
        first = tl.load(item_end_ptr + slot) - n_chunks
        d_offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = d_offs < d
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        total = 0.0
        for c in range(0, n_chunks):
            acc += tl.load(part_ptr + (first + c).to(tl.int64) * d + d_offs, mask=d_ok, other=0.0)
            if WRITE_SUMS:
                total += tl.load(part_sums_ptr + first + c)
        out = out_ptr + lat.to(tl.int64) * stride_out + d_offs
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=d_ok)
        if WRITE_SUMS:
            tl.store(sums_ptr + lat, total, mask=tl.program_id(1) == 0)


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
    # H100 sweep: 16-bit atoms want 512-column tiles (1 KB per gathered row) with 2 warps, 2.1–4.6×
    # faster than 256-column tiles; 4-byte atoms keep 256 columns.
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


def gather_sum(
    w_BK: Tensor, idx_BK: Tensor, table_ND: Tensor, out_dtype: torch.dtype, bias_D: Tensor | None = None
) -> Tensor:
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
class FeatureSort:
    """The B·k entries of an index array in feature order, and the segment matmul's work items over them: what
    both backward passes' segment matmuls read, so one sort per step serves the encoder's and the decoder's
    (`triton_ops`).

    A work item is one feature's segment, or a `SEGMENT_CHUNK` of it when longer, in the features' by-length
    order (longest first). The item arrays have a static size (n + B·k // CHUNK, a bound on the count), so
    nothing here syncs the host and a CUDA graph can hold it."""

    order: Tensor
    """[B·k] int64: flat entry positions, sorted by feature."""
    rows: Tensor
    """[B·k] int32: the token (row) of each sorted entry."""
    seg: Tensor
    """[n + 1] int32: feature i's entries are order[seg[i]:seg[i + 1]]."""
    by_length: Tensor
    """[n] int64: the features, most entries first."""
    item_end: Tensor
    """[n] int32: work items up to and including each by-length slot."""
    item_begin: Tensor
    """[items] int32: each item's first sorted entry."""
    item_len: Tensor
    """[items] int32: its entry count (≤ CHUNK; −1 past the last item)."""
    item_dest: Tensor
    """[items] int32: its feature when it is the whole segment, else −1 − the partial-sum row it writes."""


SEGMENT_CHUNK = 256
"""Entries per work item of the segment matmul: a longer segment (a feature that fires on more than 256 of the
batch's rows, as dense features do in training) is split over several programs, and a second pass adds their
partial sums: one program looping over thousands of rows while the others idle would cost 3–4 ms."""
_PLAN_BLOCK = 1024


def sort_by_feature(idx_BK: Tensor, n: int) -> FeatureSort:
    entries = idx_BK.numel()
    device = idx_BK.device
    # Narrow keys, fewer radix-sort passes in torch.sort (stable, so deterministic): int16 for up to 2¹⁶
    # features (shifted by 2¹⁵ to keep the order), int32 beyond.
    shift, dtype = (1 << 15, torch.int16) if n <= 1 << 16 else (0, torch.int32)
    sorted_keys, order = torch.sort((idx_BK.flatten() - shift).to(dtype), stable=True)
    # Segment i of the sorted entries is [seg[i], seg[i+1]); the last bound is the entry count.
    starts = torch.searchsorted(sorted_keys, (torch.arange(n, device=device) - shift).to(dtype))
    seg = torch.cat([starts.to(torch.int32), starts.new_full((1,), entries, dtype=torch.int32)])
    # Longest first; a segment has at most B entries (a feature once per row), so −length fits int16 keys
    # below 2¹⁵ rows: two radix passes instead of four.
    neg_lengths = seg[:-1] - seg[1:]
    by_length = torch.sort(
        neg_lengths.to(torch.int16) if idx_BK.shape[0] < 1 << 15 else neg_lengths, stable=True
    ).indices
    grid = (triton.cdiv(n, _PLAN_BLOCK),)
    chunks = torch.empty(n, dtype=torch.int32, device=device)
    _chunk_count_kernel[grid](by_length, seg, chunks, n, CHUNK=SEGMENT_CHUNK, BLOCK=_PLAN_BLOCK)
    item_end = torch.cumsum(chunks, 0, dtype=torch.int32)
    n_items = n + entries // SEGMENT_CHUNK  # Σ max(1, ⌈L / C⌉) ≤ n + Σ L / C
    item_begin, item_len, item_dest = torch.empty(3, n_items, dtype=torch.int32, device=device).unbind()
    _work_items_kernel[grid](
        by_length,
        seg,
        item_end,
        item_begin,
        item_len,
        item_dest,
        n,
        n_items,
        CHUNK=SEGMENT_CHUNK,
        BLOCK=_PLAN_BLOCK,
    )
    return FeatureSort(
        order,
        (order // idx_BK.shape[1]).to(torch.int32),
        seg,
        by_length,
        item_end,
        item_begin,
        item_len,
        item_dest,
    )


def segment_matmul_into(
    w_BK: Tensor,
    idx_BK: Tensor,
    dense_BD: Tensor,
    out_ND: Tensor,
    by_feature: FeatureSort | None = None,
    scale: Tensor | None = None,
    sums_N: Tensor | None = None,
) -> None:
    """out[i] = scale · Σ_{(b, j): idx[b, j] = i} w[b, j] · dense[b]; every row of out is written.
    `by_feature`, when given, must be `sort_by_feature(idx_BK, n)`; `scale` a one-element fp32 tensor;
    `sums_N`, an fp32 [n] tensor, receives scale · Σ_{(b, j): idx[b, j] = i} w[b, j] (deterministic)."""
    check_codes(w_BK, idx_BK)
    n, d = out_ND.shape
    by_feature = by_feature or sort_by_feature(idx_BK, n)
    coef = w_BK.flatten()[by_feature.order]
    if scale is not None:  # on the B·k coefficients (fp32), not on the n × d output
        coef = coef.float() * scale.reshape(1)
    entries = idx_BK.numel()
    # Split features have > CHUNK entries each: fewer than entries / CHUNK of them, with < 2·entries / CHUNK
    # items. They come first in by-length order, so their partial rows are item numbers below that bound.
    n_parts, n_split = 2 * entries // SEGMENT_CHUNK + 1, min(n, entries // SEGMENT_CHUNK + 1)
    part = torch.empty(n_parts, d, dtype=torch.float32, device=out_ND.device)
    part_sums = torch.empty(n_parts if sums_N is not None else 1, dtype=torch.float32, device=out_ND.device)
    sums = out_ND if sums_N is None else sums_N  # any pointer when no sums are wanted
    block_l, block_d = 16, _block_d(d, 128)
    n_items = by_feature.item_len.numel()
    _segment_matmul_kernel[(triton.cdiv(n_items, block_l), triton.cdiv(d, block_d))](
        by_feature.item_begin,
        by_feature.item_len,
        by_feature.item_dest,
        by_feature.rows,
        coef,
        dense_BD,
        out_ND,
        sums,
        part,
        part_sums,
        n_items,
        d,
        dense_BD.stride(0),
        out_ND.stride(0),
        WRITE_SUMS=sums_N is not None,
        BLOCK_L=block_l,
        BLOCK_D=block_d,
        num_warps=4,
    )
    reduce_d = _block_d(d, 512)
    _segment_reduce_kernel[(n_split, triton.cdiv(d, reduce_d))](
        by_feature.item_end,
        by_feature.by_length,
        by_feature.seg,
        part,
        part_sums,
        out_ND,
        sums,
        d,
        out_ND.stride(0),
        WRITE_SUMS=sums_N is not None,
        CHUNK=SEGMENT_CHUNK,
        BLOCK_D=reduce_d,
        num_warps=4,
    )


def segment_matmul(
    w_BK: Tensor,
    idx_BK: Tensor,
    dense_BD: Tensor,
    n: int,
    out_dtype: torch.dtype,
    by_feature: FeatureSort | None = None,
    scale: Tensor | None = None,
    sums_N: Tensor | None = None,
) -> Tensor:
    out_ND = torch.empty(n, dense_BD.shape[1], dtype=out_dtype, device=dense_BD.device)
    segment_matmul_into(w_BK, idx_BK, dense_BD, out_ND, by_feature, scale, sums_N)
    return out_ND


__getattr__ = module_getattr(__name__)  # old public names (mmsae.legacy_names)
