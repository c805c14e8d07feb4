"""The encode-only group encode (`kernels.triton_group.group_topk`) and its parts: the GEMM's maxima without
its output, rows to e4m3 (`kernels.triton_fp8`) and the scaled e4m3 GEMM, against torch and the exact encode.

Without CUDA the kernels run in Triton's interpreter, whose numpy matmul sums in an order that depends on the
tile's shape, so the GEMM and the re-score could round a sum differently. The CPU operands are therefore
multiples of 2⁻³ and 2⁻⁶ whose every partial sum is exact in fp32: any order gives one fp32 value, rounded
once, and the exact encode's reference is torch's fp32 product rounded once. They also give ties (coarse
values, a duplicated feature, a row that is the bias alone) and an all-negative row. GPU twins use random
bf16 operands at benchmark-like sizes and compare with `kernels.topk_encode` itself.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import lowest_index_topk

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mmsae import kernels
from mmsae.kernels.triton_dense import center_cast
from mmsae.kernels.triton_fp8 import E4M3_MAX, E4M3_SCALE_MIN, centred_e4m3_rows, e4m3_rows
from mmsae.kernels.triton_gemm import linear_group_maxima
from mmsae.kernels.triton_group import group_topk, group_topk_applies
from mmsae.kernels.triton_select import GroupConfig, group_maxima

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float16  # the interpreter computes bf16 dot products wrongly
NEEDS_CUDA = "needs CUDA; CPU twin: the float16 case"
gpu = pytest.mark.gpu


def exact_operands(B: int, d: int, n: int, dtype: torch.dtype, planted: int = 0) -> tuple[torch.Tensor, ...]:
    """(x, W, b): x in eighths, W in 64ths, b in quarters ≤ 0, so x·w + b is exact in fp32 in any order.
    Row 1 is the bias alone (ties at 0 across groups, all relu'd to 0); row 2 is all negative; feature n/2
    duplicates feature 5 (a tie in every row). With `planted`, each row also adds that many random weight
    rows (x then in 64ths): a clear top."""
    x = torch.randint(-8, 9, (B, d)) / 8
    W = torch.randint(-16, 17, (n, d)) / 64
    b = torch.randint(-8, 1, (n,)) / 4
    for row in range(B if planted else 0):
        x[row] = x[row] / 2 + W[torch.randperm(n)[:planted]].sum(0)
    W[:, 0], x[:, 0] = -0.25, 0.0
    x[1] = 0.0
    x[2, 0] = 64.0  # −16 on every feature: far below what the other columns add
    W[n // 2], b[n // 2] = W[5], b[5]
    return x.to(DEVICE, dtype), W.to(DEVICE, dtype), b.to(DEVICE)


def exact_pre(x_BD: torch.Tensor, W_ND: torch.Tensor, b_N: torch.Tensor) -> torch.Tensor:
    """The product's rounding: b in x's dtype, fp32 product and bias, one rounding to x's dtype."""
    return torch.nn.functional.linear(x_BD.float(), W_ND.float(), b_N.to(x_BD.dtype).float()).to(x_BD.dtype)


def assert_exact_topk(values: torch.Tensor, indices: torch.Tensor, pre_BN: torch.Tensor, k: int) -> None:
    assert indices.dtype == torch.int64 and values.dtype == pre_BN.dtype
    assert torch.equal(indices.sort(-1).values, lowest_index_topk(pre_BN, k).sort(-1).values)
    assert torch.equal(values, pre_BN.gather(1, indices).relu())


@pytest.mark.parametrize(("B", "d", "n", "group"), [(200, 72, 264, 16), (130, 64, 512, 32)])
def test_maxima_without_pre_equal_those_with_pre(B: int, d: int, n: int, group: int) -> None:
    """Ragged row, column and K tiles; write_pre=False writes the same maxima and no pre."""
    x_BD = torch.randn(B, d, device=DEVICE).to(DTYPE)
    W_ND = (torch.randn(n, d, device=DEVICE) / d**0.5).to(DTYPE)
    b_N = torch.randn(n, device=DEVICE).to(DTYPE)
    pre_BN, gmax_BG = linear_group_maxima(x_BD, W_ND, b_N, group)
    none, gmax_only_BG = linear_group_maxima(x_BD, W_ND, b_N, group, write_pre=False)
    assert none is None and torch.equal(gmax_only_BG, gmax_BG)
    assert torch.equal(gmax_BG, group_maxima(pre_BN, GroupConfig(group, 2)))


@pytest.mark.parametrize(
    ("B", "d", "n", "k", "kept"),
    [
        (72, 72, 520, 8, None),  # 33 groups of 16, the last cut short; ragged tiles everywhere
        (72, 72, 520, 8, 16),  # more groups kept than needed: still exact
        (16, 32, 64, 8, None),  # short rows: groups of 4, narrower than the re-score's tile
    ],
)
def test_group_topk_is_the_exact_encode(B: int, d: int, n: int, k: int, kept: int | None) -> None:
    x_BD, W_ND, b_N = exact_operands(B, d, n, DTYPE)
    pre_BN = exact_pre(x_BD, W_ND, b_N)
    assert torch.equal(linear_group_maxima(x_BD, W_ND, b_N.to(DTYPE), 16)[0], pre_BN)  # the premise
    values, indices = group_topk(x_BD, W_ND, b_N, k, kept=kept)
    assert_exact_topk(values, indices, pre_BN, k)
    assert (values[1] == 0).all() and (values[2] == 0).all()  # relu'd ties, and negatives


def test_group_topk_rejects_what_it_cannot_do() -> None:
    x_BD, W_ND, b_N = exact_operands(4, 16, 64, DTYPE)
    with pytest.raises(ValueError, match="cannot hold the top k"):
        group_topk(x_BD, W_ND, b_N, 8, kept=4)
    with pytest.raises(TypeError, match="16-bit x and W"):
        group_topk(x_BD.float(), W_ND.float(), b_N, 8)
    with pytest.raises(ValueError, match=r"k=65 must be in"):
        group_topk(x_BD, W_ND, b_N, 65)
    empty = group_topk(x_BD[:0], W_ND, b_N, 8)
    assert empty[0].shape == empty[1].shape == (0, 8)


@pytest.mark.parametrize(("n", "group"), [(520, 16), (64, 4)])
def test_rescore_writes_its_entries_and_their_group_maxima(n: int, group: int) -> None:
    """Each (row, kept group) pair's entries are the exact pre at those columns (−∞ past n, in a last group
    cut short), and the maxima it writes are `group_maxima`'s of the re-scored rows: the select reads them
    instead of a pass of its own."""
    from mmsae.kernels.triton_group import choose_groups, rescore_groups

    x_BD, W_ND, b_N = exact_operands(40, 48, n, DTYPE)
    b16 = b_N.to(DTYPE)
    kept = 12
    groups_BK = choose_groups(linear_group_maxima(x_BD, W_ND, b16, group, write_pre=False)[1], kept)
    pre_BC, gmax_BK = rescore_groups(x_BD, W_ND, b16, groups_BK, group)
    cols_BC = (groups_BK.long()[:, :, None] * group + torch.arange(group, device=DEVICE)).reshape(40, -1)
    padded_BN = torch.nn.functional.pad(exact_pre(x_BD, W_ND, b_N), (0, group), value=-math.inf)
    assert torch.equal(pre_BC, padded_BN.gather(1, cols_BC))
    assert torch.equal(gmax_BK, group_maxima(pre_BC, GroupConfig(group, 2)))


def test_e4m3_rows_matches_torch() -> None:
    """Rows of very different ranges, a zero row, −0, a strided input, and `out` reused: values as torch's
    cast of t / scale (the kernel rounds in fp32, so the interpreter's cast agrees too), scales exact."""
    t_RD = torch.randn(100, 96, device=DEVICE) * torch.logspace(-4, 4, 100, device=DEVICE)[:, None]
    t_RD[3] = 0.0
    t_RD[4, :5] = -0.0
    t_RD = t_RD.to(DTYPE)[:, :72]  # row stride 96
    q_RD, scale_R = e4m3_rows(t_RD)
    absmax_R = t_RD.float().abs().amax(1).clamp_min(E4M3_SCALE_MIN)
    expected_R = absmax_R / torch.full_like(absmax_R, E4M3_MAX)  # torch on CUDA divides by a scalar inexactly
    assert scale_R.dtype == torch.float32 and torch.equal(scale_R, expected_R)
    expected_RD = (t_RD.float() / expected_R[:, None]).to(torch.float8_e4m3fn)
    assert q_RD.dtype == torch.float8_e4m3fn
    assert torch.equal(q_RD.view(torch.uint8), expected_RD.view(torch.uint8))  # bits: −0 and NaN too
    out = (torch.empty_like(q_RD), torch.empty_like(scale_R))
    assert e4m3_rows(t_RD, out=out)[0] is out[0] and torch.equal(
        out[0].view(torch.uint8), q_RD.view(torch.uint8)
    )


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_centred_e4m3_rows_is_center_cast_then_e4m3_rows(x_dtype: torch.dtype) -> None:
    """One pass gives what the two give: the 16-bit (x − b) bit for bit as `center_cast` (the interpreter's
    cast rounds as that kernel's does), and the e4m3 rows of that copy; strided rows, a zero row, empty x."""
    x_BD = torch.randn(37, 96, device=DEVICE) * torch.logspace(-3, 3, 37, device=DEVICE)[:, None]
    b_D = torch.randn(72, device=DEVICE)
    x_BD = x_BD.to(x_dtype)[:, :72]  # row stride 96
    x_BD[5] = b_D.to(x_dtype)  # centred to zero (a zero row: the smallest scale)
    lp_BD, (q_BD, scale_B) = centred_e4m3_rows(x_BD, b_D, DTYPE)
    assert torch.equal(lp_BD, center_cast(x_BD, b_D, DTYPE))
    want_q, want_scale = e4m3_rows(lp_BD)
    assert torch.equal(q_BD.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(scale_B, want_scale)
    assert centred_e4m3_rows(x_BD[:0], b_D, DTYPE)[1][0].shape == (0, 72)
    with pytest.raises(TypeError, match="16-bit"):
        centred_e4m3_rows(x_BD, b_D, torch.float32)
    with pytest.raises(ValueError, match=r"want \[B, d\] and \[d\]"):
        centred_e4m3_rows(x_BD, b_D[:10], DTYPE)


def key_values(gmax_BG: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The 16-bit floats whose order-preserving keys the int16 maxima are (key − 2¹⁵), as fp32."""
    key = gmax_BG.int() + 32768
    bits = torch.where(key >= 0x8000, key ^ 0x8000, key ^ 0xFFFF)
    return bits.to(torch.int16).view(dtype).float()


def test_scaled_e4m3_gemm_maxima_are_within_e4m3_error() -> None:
    """pre = (x₈·W₈ᵀ)·x_scale·w_scale + b: the dequantised operands' product (to the output's rounding, and
    on Hopper the e4m3 tensor cores' accumulation, ~2⁻¹³ of Σ|x||w| on an H100), and its maxima within
    e4m3's error (2⁻⁴ relative per operand) of the fp32 reference's."""
    B, d, n, group = 200, 80, 528, 16  # e4m3 rows must be 16-byte aligned: d % 16 = 0
    x_BD = torch.randn(B, d, device=DEVICE).to(DTYPE)
    W_ND = (torch.randn(n, d, device=DEVICE) / d**0.5).to(DTYPE)
    b_N = (0.1 * torch.randn(n, device=DEVICE)).to(DTYPE)
    (x8, x_scale), (W8, w_scale) = e4m3_rows(x_BD), e4m3_rows(W_ND)
    scales = (x_scale, w_scale)
    pre_BN, gmax_BG = linear_group_maxima(x8, W8, b_N, group, scales=scales, out_dtype=DTYPE)
    x_BD8, W_ND8 = x8.float() * x_scale[:, None], W8.float() * w_scale[:, None]
    dequantised = x_BD8 @ W_ND8.T + b_N.float()
    step = torch.finfo(DTYPE).eps * dequantised.abs() + 2**-11 * (x_BD8.abs() @ W_ND8.abs().T) + 1e-6
    assert pre_BN.dtype == DTYPE and ((pre_BN.float() - dequantised).abs() <= step).all()
    assert torch.equal(gmax_BG, group_maxima(pre_BN, GroupConfig(group, 2)))
    _, gmax_only_BG = linear_group_maxima(x8, W8, b_N, group, write_pre=False, scales=scales, out_dtype=DTYPE)
    assert torch.equal(gmax_only_BG, gmax_BG)

    reference = torch.nn.functional.linear(x_BD.float(), W_ND.float(), b_N.float())
    bound = (x_BD.float().abs() @ W_ND.float().abs().T) * (2 * 2**-4 + 2**-8) + step
    reference_max = reference.unflatten(1, (-1, group)).amax(2)
    bound_max = bound.unflatten(1, (-1, group)).amax(2)
    assert ((key_values(gmax_BG, DTYPE) - reference_max).abs() <= bound_max).all()


def test_fp8_group_topk_recovers_the_exact_encode() -> None:
    """Rows with a clear top (4 planted features among k = 8): groups chosen by e4m3 maxima, 2k kept, hold
    ≥ 99 % of the exact encode's (row, feature) pairs, and the values of those are the exact ones."""
    B, d, n, k = 72, 80, 1040, 8
    x_BD, W_ND, b_N = exact_operands(B, d, n, DTYPE, planted=4)
    pre_BN = exact_pre(x_BD, W_ND, b_N)
    values, indices = group_topk(x_BD, W_ND, b_N, k, kept=2 * k, fp8_weights=e4m3_rows(W_ND))
    exact_BK = lowest_index_topk(pre_BN, k)
    shared = (indices[:, :, None] == exact_BK[:, None, :]).any(2)
    assert shared.float().mean() >= 0.99
    assert torch.equal(values[shared], pre_BN.gather(1, indices).relu()[shared])
    assert torch.equal(values, pre_BN.gather(1, indices).relu())  # every value is exact, shared or not


def test_group_topk_under_no_grad_and_inference_mode() -> None:
    """Inference only, whatever the caller's grad mode; weights that are parameters give codes without one."""
    x_BD, W_ND, b_N = exact_operands(16, 32, 264, DTYPE)
    W_ND.requires_grad_()
    expected = group_topk(x_BD, W_ND, b_N, 8)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            got = group_topk(x_BD, W_ND, b_N, 8)
        assert not got[0].requires_grad
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_group_topk_applies_only_to_hopper_inference_with_16_bit_operands() -> None:
    x_BD = torch.randn(256, 768, device=DEVICE).to(DTYPE)
    W_ND = torch.randn(16384, 768, device=DEVICE).to(DTYPE)
    hopper = CUDA and torch.cuda.get_device_capability()[0] == 9
    assert group_topk_applies(x_BD, W_ND, 32) == hopper
    assert group_topk_applies(x_BD, W_ND, 32, 64, fp8=True) == hopper
    assert not group_topk_applies(x_BD.float(), W_ND.float(), 32)
    assert not group_topk_applies(x_BD, W_ND, 32, kept=16)
    assert not group_topk_applies(x_BD, W_ND[:, :760], 32, fp8=True)
    assert not group_topk_applies(x_BD.requires_grad_(), W_ND, 32)


def random_operands(B: int, d: int, n: int) -> tuple[torch.Tensor, ...]:
    x_BD = torch.randn(B, d, device=DEVICE).bfloat16()
    W_ND = (torch.randn(n, d, device=DEVICE) / d**0.5).bfloat16()
    return x_BD, W_ND, 0.1 * torch.randn(n, device=DEVICE)


@gpu
@pytest.mark.skipif(not CUDA, reason=NEEDS_CUDA)
@pytest.mark.parametrize(("d", "n", "k"), [(768, 16384, 32), (768, 65536, 32), (1024, 65536, 64)])
def test_group_topk_equals_topk_encode_gpu(d: int, n: int, k: int) -> None:
    """Random bf16 operands, fp32 bias: the product's encode, bit for bit (the re-score's tensor-core sums
    round as the GEMM's do)."""
    x_BD, W_ND, b_N = random_operands(4096, d, n)
    assert group_topk_applies(x_BD, W_ND, k)
    values, indices = group_topk(x_BD, W_ND, b_N, k)
    exact_v, exact_i = kernels.topk_encode(x_BD, W_ND, b_N, k)
    order, exact_order = indices.sort(-1), exact_i.sort(-1)
    assert torch.equal(order.values, exact_order.values)
    assert torch.equal(values.gather(1, order.indices), exact_v.gather(1, exact_order.indices))


@gpu
@pytest.mark.skipif(not CUDA, reason=NEEDS_CUDA)
def test_fp8_group_topk_recovers_the_exact_encode_gpu() -> None:
    """Random bf16 rows with 4 planted features of 32: 2k groups from e4m3 maxima hold ≥ 99 % of the exact
    encode's pairs, with its values."""
    x_BD, W_ND, b_N = random_operands(4096, 768, 32768)
    x_BD = (
        x_BD.float() + 3 * W_ND[torch.randint(0, 32768, (4096, 4), device=DEVICE)].float().sum(1)
    ).bfloat16()
    assert group_topk_applies(x_BD, W_ND, 32, 64, fp8=True)
    values, indices = group_topk(x_BD, W_ND, b_N, 32, kept=64, fp8_weights=e4m3_rows(W_ND))
    exact_v, exact_i = kernels.topk_encode(x_BD, W_ND, b_N, 32)
    match = indices[:, :, None] == exact_i[:, None, :]
    shared = match.any(2)
    assert shared.float().mean() >= 0.99
    exact_at = (match * exact_v[:, None, :].float()).sum(2)
    assert torch.equal(values.float()[shared], exact_at[shared])


@pytest.mark.usefixtures("triton_backend")
def test_topk_encode_inside_fp8_encode_takes_the_fp8_candidates(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside `kernels.fp8_encode()`, an encode without a gradient is `group_topk` from e4m3 candidates with
    ⌈groups_per_k · k⌉ groups kept (the CPU cannot run the Hopper GEMM, so where-it-applies is forced here);
    outside the context, or where a gradient is wanted, the exact encode runs."""
    from mmsae.kernels import triton_ops

    monkeypatch.setattr(triton_ops, "group_topk_applies", lambda *args, **kwargs: True)
    x_BD, W_ND, b_N = exact_operands(40, 48, 528, DTYPE, planted=4)
    calls = []
    real = triton_ops.group_topk
    monkeypatch.setattr(triton_ops, "group_topk", lambda *a, **kw: calls.append(kw["kept"]) or real(*a, **kw))
    with kernels.fp8_encode(groups_per_k=1.5):
        got = kernels.topk_encode(x_BD, W_ND, b_N.to(DTYPE), 8)
    assert calls == [12]
    want = group_topk(x_BD, W_ND, b_N, 8, kept=12, fp8_weights=e4m3_rows(W_ND))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    b_dec = torch.randn(48, device=DEVICE).to(DTYPE)  # the centred x and its e4m3 rows: one pass
    with kernels.fp8_encode(groups_per_k=1.5):
        got = kernels.topk_encode(x_BD, W_ND, b_N.to(DTYPE), 8, b_dec=b_dec)
    x_lp = center_cast(x_BD, b_dec, DTYPE)
    want = group_topk(x_lp, W_ND, b_N, 8, kept=12, fp8_weights=e4m3_rows(W_ND))
    assert calls == [12, 12] and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    W_ND.requires_grad_()
    with kernels.fp8_encode():
        kernels.topk_encode(x_BD, W_ND, b_N.to(DTYPE), 8)  # training: the exact encode
    kernels.topk_encode(x_BD, W_ND.detach(), b_N.to(DTYPE), 8)  # no context
    assert calls == [12, 12]


def test_fp8_encode_refuses_fewer_groups_than_k() -> None:
    with pytest.raises(ValueError, match="groups_per_k"), kernels.fp8_encode(groups_per_k=0.5):
        pass


def test_stats_encode_fp8_runs_exact_where_the_gpu_path_does_not_apply() -> None:
    """On the CPU `StatsConfig(encode="fp8")` gives the exact pass's statistics; an unknown mode is refused
    by name."""
    from mmsae.analysis import StatsConfig, feature_stats
    from mmsae.sae import build_sae

    sae = build_sae("topk", 16, 64, k=4)
    batches = [torch.randn(50, 16) for _ in range(3)]
    exact = feature_stats(sae, batches, StatsConfig(top_k=3))
    fp8 = feature_stats(sae, batches, StatsConfig(top_k=3, encode="fp8"))
    assert torch.equal(exact.top_values, fp8.top_values) and torch.equal(exact.fire_count, fp8.fire_count)
    with pytest.raises(ValueError, match=r"StatsConfig\.encode"):
        StatsConfig(encode="int4")
