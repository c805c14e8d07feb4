"""Encoder GEMM whose epilogue also writes the group maxima of the top-k select.

pre = x·Wᵀ + b is written as cuBLAS writes it (fp32 accumulation, bias added in fp32, one rounding),
and while each output tile is still in registers the max key of every run of `group` contiguous
columns goes to a [B, n / group] int16 array: the group select's first pass, which otherwise reads
all of `pre` back from HBM (0.2–0.8 ms at the benchmark sizes). Persistent TMA kernel, one tile
config measured on H100 (docs/kernels-notes.md); `fused_gemm_applies` says where it runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from mmsae.kernels.triton_select import _ordered_key

BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M = 128, 256, 64, 8
MAX_GROUP = 32
"""Larger groups (n > 131072 at k = 32) keep the separate group-max pass: the epilogue's reshape
for them was not measured and may not fit in shared memory next to the pipeline stages."""


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
):
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
        pre = acc + bias[None, :]
        out = pre.to(out_desc.dtype)
        # Two half-width stores: the staging buffer in shared memory is half the size.
        halves = tl.permute(tl.reshape(out, (BM, 2, BN // 2)), (0, 2, 1))
        left, right = tl.split(halves)
        out_desc.store([pid_m * BM, pid_n * BN], left)
        out_desc.store([pid_m * BM, pid_n * BN + BN // 2], right)

        # Rounding is monotone, so the max key of a group is the key of its rounded fp32 max: one fp32 max
        # per element instead of a key per element (the epilogue is ALU-bound). fp32 sums are never −0
        # (the accumulator starts at +0), so the −0 < +0 of the key order cannot be lost; NaNs are skipped
        # by the max, which the select tolerates.
        rows = pid_m * BM + tl.arange(0, BM)
        pre = tl.where(cols[None, :] < N, pre, float("-inf"))
        gmax = _ordered_key(tl.max(tl.reshape(pre, (BM, BN // GS, GS)), axis=2).to(out_desc.dtype))
        groups = pid_n * (BN // GS) + tl.arange(0, BN // GS)
        ok = (rows[:, None] < M) & (groups[None, :] < G)
        gmax_ptrs = gmax_ptr + rows[:, None].to(tl.int64) * G + groups[None, :]
        tl.store(gmax_ptrs, (gmax - 32768).to(tl.int16), mask=ok)


def fused_gemm_applies(x_BD: Tensor, W_ND: Tensor, group: int) -> bool:
    """Hopper (TMA; the config was measured on H100), 16-bit operands of one dtype, row-major with
    16-byte-aligned rows, and a group that divides the tile and was measured."""
    if not (x_BD.is_cuda and torch.cuda.get_device_capability(x_BD.device)[0] == 9):
        return False
    return (
        x_BD.dtype == W_ND.dtype
        and x_BD.dtype in (torch.bfloat16, torch.float16)
        and x_BD.is_contiguous()
        and W_ND.is_contiguous()
        and x_BD.shape[1] % 8 == 0
        and W_ND.shape[0] % 8 == 0
        and group <= MAX_GROUP
    )


def linear_group_maxima(x_BD: Tensor, W_ND: Tensor, b_N: Tensor, group: int) -> tuple[Tensor, Tensor]:
    """(x·Wᵀ + b as [B, n] in x's dtype, [B, ⌈n / group⌉] int16 group maxima of its keys)."""
    B, d = x_BD.shape
    n = W_ND.shape[0]
    if BLOCK_N % group:
        raise ValueError(f"group {group} must divide the GEMM tile width {BLOCK_N}.")
    pre_BN = torch.empty(B, n, dtype=x_BD.dtype, device=x_BD.device)
    G = triton.cdiv(n, group)
    gmax_BG = torch.empty(B, G, dtype=torch.int16, device=x_BD.device)
    n_tiles = triton.cdiv(B, BLOCK_M) * triton.cdiv(n, BLOCK_N)
    programs = min(n_tiles, _sm_count(x_BD.device))
    _linear_group_max_kernel[(programs,)](
        TensorDescriptor.from_tensor(x_BD, [BLOCK_M, BLOCK_K]),
        TensorDescriptor.from_tensor(W_ND, [BLOCK_N, BLOCK_K]),
        TensorDescriptor.from_tensor(pre_BN, [BLOCK_M, BLOCK_N // 2]),
        b_N,
        gmax_BG,
        B,
        n,
        d,
        G,
        GS=group,
        BM=BLOCK_M,
        BN=BLOCK_N,
        BK=BLOCK_K,
        GROUP_M=GROUP_M,
        NUM_PROGRAMS=programs,
        num_stages=_stages(group),
        num_warps=8,
    )
    return pre_BN, gmax_BG


def _stages(group: int) -> int:
    """Pipeline depth: 4 stages ran 3–12 % faster than 3 on H100, but with groups of 16 the
    epilogue's layout-conversion scratch does not fit next to them (1 KB over the 227 KB)."""
    return 4 if group >= 32 else 3


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # Triton's CPU interpreter (tests)
    return torch.cuda.get_device_properties(device).multi_processor_count
