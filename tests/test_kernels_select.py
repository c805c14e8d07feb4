"""Top-k selection kernels and the fused encoder GEMM that feeds them, vs torch: exact lowest-index top k.

Without CUDA the kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET must be set
before the kernel modules are imported), so CI checks the same code the GPU compiles.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import lowest_index_topk

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mmsae.kernels.triton_gemm import fused_gemm_applies, linear_group_maxima
from mmsae.kernels.triton_select import (
    BoundConfig,
    GroupConfig,
    SelectMethod,
    group_maxima,
    select_from_group_maxima,
    topk_select_into,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def hard_rows(B: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    pre_BN = torch.randn(B, n, device=DEVICE).to(dtype)
    pre_BN[1] = pre_BN[1].round()  # many ties at the threshold, and -0 next to +0
    pre_BN[2] = -pre_BN[2].abs()  # all negative: relu zeros, ordering of negatives still matters
    pre_BN[3, ::2] = 4.0  # more than k equal maxima: overflows the bound select's candidate slots
    return pre_BN


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("n", "k", "method", "options"),
    [
        (257, 1, "bisect", {}),
        (1000, 13, "bisect", {}),
        (333, 64, "bisect", {}),
        (1000, 13, "bisect", {"seg": 64}),
        (300, 50, "bisect", {"seg": 128}),  # 300 % 128 < 50 pads the last segment
        (257, 1, "bound", {}),
        (333, 64, "bound", {}),
        (1000, 13, "bound", {"bound": BoundConfig(groups=64, cap=64, num_warps=4)}),
        (300, 50, "bound", {"bound": BoundConfig(groups=64, cap=256, num_warps=4)}),
        (257, 1, "group", {}),
        (333, 64, "group", {}),
        (3000, 8, "group", {}),
        (1000, 13, "group", {"group": GroupConfig(group=16, num_warps=1)}),
        (300, 50, "group", {"group": GroupConfig(group=4, num_warps=2, max_rows=4)}),
    ],
)
def test_select_matches_torch_topk(
    dtype: torch.dtype, n: int, k: int, method: SelectMethod, options: dict[str, object]
) -> None:
    """Every method picks exactly the lowest-index top k; row 3 (and row 1 with the small configs)
    overflows the bound select's candidate slots, so its whole-row fallback runs too, and gives the
    group select more tied group maxima than it may choose."""
    pre_BN = hard_rows(5, n, dtype)
    values_BK = torch.full((5, k), float("nan"), device=DEVICE, dtype=dtype)
    indices_BK = torch.full((5, k), -1, device=DEVICE, dtype=torch.int64)
    topk_select_into(pre_BN, k, values_BK, indices_BK, method, **options)

    assert torch.equal(pre_BN.gather(1, indices_BK).relu(), values_BK)
    assert torch.equal(indices_BK.sort(-1).values, lowest_index_topk(pre_BN, k).sort(-1).values)
    ref = pre_BN.float().topk(k, dim=-1).values.relu()
    assert torch.equal(values_BK.float().sort(-1, descending=True).values, ref)


@pytest.mark.skipif(not CUDA, reason="needs CUDA; CPU twin: test_select_matches_torch_topk")
@pytest.mark.parametrize("method", ["group", "bound", "bisect"])
def test_select_benchmark_sized_rows_gpu(method: SelectMethod) -> None:
    pre_BN = hard_rows(300, 65539, torch.bfloat16)
    values_BK = torch.full((300, 64), float("nan"), device=DEVICE, dtype=torch.bfloat16)
    indices_BK = torch.full((300, 64), -1, device=DEVICE, dtype=torch.int64)
    topk_select_into(pre_BN, 64, values_BK, indices_BK, method)
    assert torch.equal(pre_BN.gather(1, indices_BK).relu(), values_BK)
    assert torch.equal(indices_BK.sort(-1).values, lowest_index_topk(pre_BN, 64).sort(-1).values)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("B", "d", "n", "group"), [(200, 72, 264, 16), (130, 64, 512, 32), (5, 16, 8, 4)])
def test_linear_group_maxima_matches_the_gemm_and_the_group_pass(
    dtype: torch.dtype, B: int, d: int, n: int, group: int
) -> None:
    """Ragged row, column and K tiles. The GEMM equals an fp32 reference within one rounding step, its
    maxima equal the streaming pass's over its own output, and the select on them is the exact top k."""
    if dtype == torch.bfloat16 and not CUDA:
        pytest.skip("Triton's CPU interpreter misreads bf16 TMA tiles; CPU twin: the float16 case")
    x_BD = torch.randn(B, d, device=DEVICE).to(dtype)
    W_ND = (torch.randn(n, d, device=DEVICE) / d**0.5).to(dtype)
    b_N = torch.randn(n, device=DEVICE).to(dtype)
    pre_BN, gmax_BG = linear_group_maxima(x_BD, W_ND, b_N, group)

    expected = torch.nn.functional.linear(x_BD.float(), W_ND.float(), b_N.float())
    step = torch.finfo(dtype).eps * expected.abs() + 1e-6
    assert ((pre_BN.float() - expected).abs() <= step).all()
    cfg = GroupConfig(group=group, num_warps=2)
    assert torch.equal(gmax_BG, group_maxima(pre_BN, cfg))
    k = min(gmax_BG.shape[1], 8)  # the group select needs k groups
    values_BK = torch.full((B, k), float("nan"), device=DEVICE, dtype=dtype)
    indices_BK = torch.full((B, k), -1, device=DEVICE, dtype=torch.int64)
    select_from_group_maxima(pre_BN, gmax_BG, k, cfg, values_BK, indices_BK)
    assert torch.equal(indices_BK.sort(-1).values, lowest_index_topk(pre_BN, k).sort(-1).values)
    assert torch.equal(pre_BN.gather(1, indices_BK).relu(), values_BK)


def test_linear_group_maxima_with_nan_pre_activations_still_selects_k_valid_features() -> None:
    """The epilogue's maxima skip NaNs (a NaN encoder row makes a NaN column): the select need not rank
    them first, as torch.topk does, but it writes k distinct in-range features, their values, and no more."""
    dtype = torch.bfloat16 if CUDA else torch.float16
    x_BD = torch.randn(64, 32, device=DEVICE).to(dtype)
    W_ND = torch.randn(256, 32, device=DEVICE).to(dtype)
    W_ND[[3, 100]] = float("nan")
    pre_BN, gmax_BG = linear_group_maxima(x_BD, W_ND, torch.zeros(256, device=DEVICE, dtype=dtype), 16)
    values_BK = torch.full((64, 8), -7.0, device=DEVICE, dtype=dtype)
    indices_BK = torch.full((64, 8), -1, device=DEVICE, dtype=torch.int64)
    select_from_group_maxima(pre_BN, gmax_BG, 8, GroupConfig(16, 2), values_BK, indices_BK)
    assert ((indices_BK >= 0) & (indices_BK < 256)).all()
    assert (indices_BK.sort(-1).values.diff(dim=-1) > 0).all()
    chosen_BK = pre_BN.gather(1, indices_BK)
    nan = chosen_BK.isnan()
    assert torch.equal(values_BK[~nan], chosen_BK[~nan].relu())
    assert (values_BK[nan] == 0).all()  # the kernel's relu maps NaN to 0


@pytest.mark.skipif(not CUDA, reason="needs CUDA; CPU twin: test_linear_group_maxima_matches_the_gemm_and_…")
def test_fused_gemm_equals_cublas_at_a_benchmark_shape_gpu() -> None:
    """Same fp32 accumulation, bias in fp32, one rounding: bit-identical to cuBLAS here (H100)."""
    x_BD = torch.randn(2048, 768, device=DEVICE).bfloat16()
    W_ND = (torch.randn(16384, 768, device=DEVICE) / 768**0.5).bfloat16()
    b_N = (0.1 * torch.randn(16384, device=DEVICE)).bfloat16()
    assert fused_gemm_applies(x_BD, W_ND, 16)
    pre_BN, _ = linear_group_maxima(x_BD, W_ND, b_N, 16)
    assert torch.equal(pre_BN, torch.nn.functional.linear(x_BD, W_ND, b_N))


def test_select_rejects_other_dtypes_and_fp32_outside_the_group_select_with_a_clear_error() -> None:
    pre_BN = torch.randn(2, 16, device=DEVICE)
    outputs = pre_BN.new_empty(2, 4), torch.empty(2, 4, dtype=torch.int64, device=DEVICE)
    with pytest.raises(TypeError, match="bf16/fp16/fp32"):
        topk_select_into(pre_BN.double(), 4, outputs[0].double(), outputs[1])
    with pytest.raises(ValueError, match="group select only"):
        topk_select_into(pre_BN, 4, *outputs, "bound")
    with pytest.raises(ValueError, match="Unknown select method"):
        topk_select_into(pre_BN.bfloat16(), 4, outputs[0].bfloat16(), outputs[1], "radix")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs 0 < k ≤ groups"):  # 2 groups of 8 cannot bound k = 4
        topk_select_into(pre_BN.bfloat16(), 4, outputs[0].bfloat16(), outputs[1], group=GroupConfig(8, 1))
