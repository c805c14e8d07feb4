"""Encoder GEMM whose epilogue also writes the group maxima of the top-k select.

pre = x·Wᵀ + b is written as cuBLAS writes it (fp32 accumulation, bias added in fp32, one rounding),
and while each output tile is still in registers the max key of every run of `group` contiguous
columns goes to a [B, n / group] int16 array: the group select's first pass, which otherwise reads
all of `pre` back from HBM (0.2–0.8 ms at the benchmark sizes). Persistent TMA kernel, one tile
config measured on H100 (docs/kernels-notes.md); `fused_gemm_applies` says where it runs.

Two switches serve an encode-only pass (`triton_group.group_topk`): without `write_pre` only the maxima are
written (the [B, n] output is what such an encode avoids), and with `scales` the operands are e4m3 with a
float32 scale per token and per feature, applied in the epilogue (maxima for choosing groups, not values).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from mmsae.kernels.triton_select import _ordered_key

BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M = 128, 256, 64, 8
FP8_BLOCK_K, FP8_STAGES = 128, 3
"""e4m3 operands: the same 128-byte rows per K step as 16-bit ones at BLOCK_K = 64, so a stage takes the same
shared memory (the fastest e4m3 tile of benchmarks/bench_encode_gemm.py's sweep on H100)."""
MAX_GROUP = 32
"""Larger groups (n > 131072 at k = 32) keep the separate group-max pass: the epilogue's reshape
for them was not measured and may not fit in shared memory next to the pipeline stages."""
KEY_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
"""The 16-bit float dtypes pre can be written in; the maxima are keys of that dtype (`_ordered_key`)."""


@triton.jit
def _tile_coords(tile_id, tiles_per_band, tiles_m, GROUP_M: tl.constexpr):
    """Tiles in bands of GROUP_M row blocks, so consecutive programs reuse the same W columns."""
    band = tile_id // tiles_per_band
    first_m = band * GROUP_M
    band_m = min(tiles_m - first_m, GROUP_M)
    return first_m + tile_id % band_m, (tile_id % tiles_per_band) // band_m


@triton.jit
def _linear_group_max_kernel(
    x_desc,
    w_desc,
    out_desc,
    bias_ptr,
    xs_ptr,
    ws_ptr,
    gmax_ptr,
    M,
    N,
    K,
    G,
    GS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
    NUM_PROGRAMS,
    OUT_DTYPE: tl.constexpr,
    WRITE_PRE: tl.constexpr,
    SCALED: tl.constexpr,
):
    """WRITE_PRE: store pre through `out_desc` (else it may be None); SCALED: e4m3 operands, pre =
    acc·xs[row]·ws[col] + b (else xs_ptr and ws_ptr may be None). OUT_DTYPE: pre's dtype and the keys'."""
    tiles_m = tl.cdiv(M, BM)
    tiles_per_band = GROUP_M * tl.cdiv(N, BN)
    n_tiles = tiles_m * tl.cdiv(N, BN)
    # The epilogue's tile id runs a separate counter: the pipeliner hoists the main loop's.
    tile_out = tl.program_id(0) - NUM_PROGRAMS
    for tile in tl.range(tl.program_id(0), n_tiles, NUM_PROGRAMS, flatten=True):
        pid_m, pid_n = _tile_coords(tile, tiles_per_band, tiles_m, GROUP_M)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for ki in range(tl.cdiv(K, BK)):
            x = x_desc.load([pid_m * BM, ki * BK])
            w = w_desc.load([pid_n * BN, ki * BK])
            acc = tl.dot(x, w.T, acc)

        tile_out += NUM_PROGRAMS
        pid_m, pid_n = _tile_coords(tile_out, tiles_per_band, tiles_m, GROUP_M)
        cols = pid_n * BN + tl.arange(0, BN)
        bias = tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        if SCALED:
            scaled_rows = pid_m * BM + tl.arange(0, BM)
            xs = tl.load(xs_ptr + scaled_rows, mask=scaled_rows < M, other=0.0)
            ws = tl.load(ws_ptr + cols, mask=cols < N, other=0.0)
            pre = acc * xs[:, None] * ws[None, :] + bias[None, :]
        else:
            pre = acc + bias[None, :]
        if WRITE_PRE:
            # Two half-width stores: the staging buffer in shared memory is half the size.
            halves = tl.permute(tl.reshape(pre.to(OUT_DTYPE), (BM, 2, BN // 2)), (0, 2, 1))
            left, right = tl.split(halves)
            out_desc.store([pid_m * BM, pid_n * BN], left)
            out_desc.store([pid_m * BM, pid_n * BN + BN // 2], right)

        # Rounding is monotone, so the max key of a group is the key of its rounded fp32 max: one fp32 max
        # per element instead of a key per element (the epilogue is ALU-bound). fp32 sums are never −0
        # (the accumulator starts at +0), so the −0 < +0 of the key order cannot be lost; NaNs are skipped
        # by the max, which the select tolerates.
        rows = pid_m * BM + tl.arange(0, BM)
        pre = tl.where(cols[None, :] < N, pre, float("-inf"))
        gmax = _ordered_key(tl.max(tl.reshape(pre, (BM, BN // GS, GS)), axis=2).to(OUT_DTYPE))
        groups = pid_n * (BN // GS) + tl.arange(0, BN // GS)
        ok = (rows[:, None] < M) & (groups[None, :] < G)
        gmax_ptrs = gmax_ptr + rows[:, None].to(tl.int64) * G + groups[None, :]
        tl.store(gmax_ptrs, (gmax - 32768).to(tl.int16), mask=ok)


def fused_gemm_applies(x_BD: Tensor, W_ND: Tensor, group: int) -> bool:
    """Hopper (TMA; the config was measured on H100), operands of one dtype, 16-bit or e4m3 (which
    `linear_group_maxima` takes with scales), row-major with 16-byte-aligned rows, and a group that divides
    the tile and was measured."""
    if not (x_BD.is_cuda and torch.cuda.get_device_capability(x_BD.device)[0] == 9):
        return False
    return (
        x_BD.dtype == W_ND.dtype
        and x_BD.dtype in (torch.bfloat16, torch.float16, torch.float8_e4m3fn)
        and x_BD.is_contiguous()
        and W_ND.is_contiguous()
        and x_BD.shape[1] * x_BD.element_size() % 16 == 0
        and W_ND.shape[0] % 8 == 0
        and group <= MAX_GROUP
    )


def linear_group_maxima(
    x_BD: Tensor,
    W_ND: Tensor,
    b_N: Tensor,
    group: int,
    *,
    write_pre: bool = True,
    scales: tuple[Tensor, Tensor] | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[Tensor | None, Tensor]:
    """(x·Wᵀ + b as [B, n], or None without `write_pre`; [B, ⌈n / group⌉] int16 group maxima of its keys).

    16-bit x and W: pre in x's dtype. With `scales` = (x_scale_B, w_scale_N), float32, x and W are
    float8_e4m3fn and pre = (x·Wᵀ)·x_scale[row]·w_scale[col] + b in fp32, rounded to `out_dtype` (default
    bfloat16), whose keys the maxima are. Hopper's e4m3 tensor cores sum with fewer bits than fp32 (Triton's
    default for e4m3 dots: ~2⁻¹³ of Σ|x·w| measured on H100), far under e4m3's own 2⁻⁴: estimates for choosing
    groups, not values."""
    B, d = x_BD.shape
    n = W_ND.shape[0]
    if BLOCK_N % group:
        raise ValueError(f"group {group} must divide the GEMM tile width {BLOCK_N}.")
    out_dtype = _check_operands(x_BD, W_ND, scales, out_dtype)
    G = triton.cdiv(n, group)
    gmax_BG = torch.empty(B, G, dtype=torch.int16, device=x_BD.device)
    pre_BN = torch.empty(B, n, dtype=out_dtype, device=x_BD.device) if write_pre else None
    if B == 0:
        return pre_BN, gmax_BG
    block_k, stages = (BLOCK_K, _stages(group)) if scales is None else (FP8_BLOCK_K, FP8_STAGES)
    n_tiles = triton.cdiv(B, BLOCK_M) * triton.cdiv(n, BLOCK_N)
    programs = min(n_tiles, _sm_count(x_BD.device))
    x_scale_B, w_scale_N = (None, None) if scales is None else scales
    _linear_group_max_kernel[(programs,)](
        TensorDescriptor.from_tensor(x_BD, [BLOCK_M, block_k]),
        TensorDescriptor.from_tensor(W_ND, [BLOCK_N, block_k]),
        None if pre_BN is None else TensorDescriptor.from_tensor(pre_BN, [BLOCK_M, BLOCK_N // 2]),
        b_N,
        x_scale_B,
        w_scale_N,
        gmax_BG,
        B,
        n,
        d,
        G,
        GS=group,
        BM=BLOCK_M,
        BN=BLOCK_N,
        BK=block_k,
        GROUP_M=GROUP_M,
        NUM_PROGRAMS=programs,
        OUT_DTYPE=KEY_DTYPES[out_dtype],
        WRITE_PRE=write_pre,
        SCALED=scales is not None,
        num_stages=stages,
        num_warps=8,
    )
    return pre_BN, gmax_BG


def _check_operands(
    x_BD: Tensor, W_ND: Tensor, scales: tuple[Tensor, Tensor] | None, out_dtype: torch.dtype | None
) -> torch.dtype:
    """pre's dtype after checking that the operands and scales belong together: an e4m3 GEMM without its
    scales (or 16-bit operands with scales) would give maxima off by the scales' factors, silently."""
    if x_BD.dtype != W_ND.dtype:
        raise TypeError(f"x ({x_BD.dtype}) and W ({W_ND.dtype}) must have one dtype.")
    if scales is None:
        if x_BD.dtype not in KEY_DTYPES:
            raise TypeError(f"unscaled operands must be bf16 or fp16, got {x_BD.dtype}; e4m3 takes scales.")
        out_dtype = out_dtype or x_BD.dtype
    else:
        if x_BD.dtype != torch.float8_e4m3fn:
            raise TypeError(f"scaled operands must be float8_e4m3fn, got {x_BD.dtype}.")
        x_scale_B, w_scale_N = scales
        if x_scale_B.shape != x_BD.shape[:1] or w_scale_N.shape != W_ND.shape[:1]:
            raise ValueError("scales must be [B] (per token) and [n] (per feature).")
        if x_scale_B.stride(0) != 1 or w_scale_N.stride(0) != 1:
            raise ValueError("scales must be contiguous.")
        if x_scale_B.dtype != torch.float32 or w_scale_N.dtype != torch.float32:
            raise TypeError("scales must be float32.")
        out_dtype = out_dtype or torch.bfloat16
    if out_dtype not in KEY_DTYPES:
        raise TypeError(f"pre and its keys must be bf16 or fp16, got {out_dtype}.")
    return out_dtype


def _stages(group: int) -> int:
    """Pipeline depth: 4 stages ran 3–12 % faster than 3 on H100, but with groups of 16 the
    epilogue's layout-conversion scratch does not fit next to them (1 KB over the 227 KB)."""
    return 4 if group >= 32 else 3


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # Triton's CPU interpreter (tests)
    return torch.cuda.get_device_properties(device).multi_processor_count
