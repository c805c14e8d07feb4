"""AuxK's and AbsTopK's selections through `kernels.topk_indices`, against the torch.topk path they replace.

Without CUDA the Triton select runs in Triton's interpreter on CPU tensors (TRITON_INTERPRET must be set
before the kernel modules are imported), so CI checks the same code the GPU compiles.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
import torch
from conftest import lowest_index_topk
from torch import Tensor

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mmsae import kernels
from mmsae.kernels import triton_select
from mmsae.kernels.triton_select import GroupConfig
from mmsae.sae import DeadFeatures, TopKSAE, abstopk, build_sae

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def triton_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Forces the Triton backend and counts the select's launches, so no test passes on torch's fallback."""
    monkeypatch.setattr(kernels, "_BACKEND", "triton")
    calls: list[int] = []
    select = triton_select.topk_select

    def counted(pre_BN: Tensor, k: int) -> tuple[Tensor, Tensor]:
        calls.append(k)
        return select(pre_BN, k)

    monkeypatch.setattr(triton_select, "topk_select", counted)
    yield calls


def hard_scores(B: int, n: int, dtype: torch.dtype) -> Tensor:
    """Rows with what AuxK and AbsTopK feed the select: −∞ masks, negatives, ties, short rows."""
    scores_BN = torch.randn(B, n, device=DEVICE).to(dtype)
    scores_BN[:, ::3] = float("-inf")  # live features masked out: every row has n/3 of them
    scores_BN[1] = scores_BN[1].round()  # many ties, −0 next to +0
    scores_BN[2] = -scores_BN[2].abs()  # all negative or −∞
    scores_BN[3, 5:] = float("-inf")  # fewer finite scores than k: the rest among the −∞ entries
    scores_BN[4] = float("-inf")  # nothing finite at all
    scores_BN[5, 1::3] = 2.0  # more equal maxima than k
    scores_BN[6, 1::3], scores_BN[6, 2::3] = 0.0, -0.0  # zeros of both signs
    scores_BN[7] *= 1e-30 if dtype == torch.float32 else 1.0  # subnormals
    return scores_BN


@pytest.mark.parametrize(
    ("dtype", "method"), [(torch.bfloat16, "group"), (torch.bfloat16, "bound"), (torch.float32, "group")]
)
@pytest.mark.parametrize(("n", "k"), [(48, 1), (48, 9), (100, 32), (40, 40)])
def test_topk_indices_is_torch_topk_as_sets(
    triton_calls: list[int], monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, method: str, n: int, k: int
) -> None:
    """k distinct valid indices per row whose scores are torch.topk's; the same set wherever torch's has no
    choice (no tie at the k-th score). "bound" is the select's fallback for large k·group (forced here)."""
    if method == "bound":
        monkeypatch.setattr(triton_select, "MAX_GROUP_CANDIDATES", 0)
    scores_BN = hard_scores(8, n, dtype)
    indices_BK = kernels.topk_indices(scores_BN, k)
    assert triton_calls == [k]
    assert indices_BK.shape == (8, k) and indices_BK.dtype == torch.int64
    assert ((indices_BK >= 0) & (indices_BK < n)).all()
    assert (indices_BK.sort(-1).values.diff(dim=-1) > 0).all(), "duplicate indices"

    ref = scores_BN.topk(k, dim=-1, sorted=False)
    chosen_BK = scores_BN.gather(-1, indices_BK)
    assert torch.equal(chosen_BK.sort(-1).values, ref.values.sort(-1).values)
    sorted_BN = scores_BN.sort(-1, descending=True).values
    if k == n:
        no_choice = torch.ones(8, dtype=torch.bool, device=DEVICE)
    else:
        no_choice = sorted_BN[:, k - 1] > sorted_BN[:, k]
        assert no_choice[0] and not no_choice[4]  # both cases occur
    same = indices_BK.sort(-1).values == ref.indices.sort(-1).values
    assert same[no_choice].all()


@pytest.mark.parametrize("group", [None, GroupConfig(group=4, num_warps=2, max_rows=4)])
def test_fp32_group_select_is_the_lowest_index_top_k(group: GroupConfig | None) -> None:
    """The fp32 group select (32-bit keys) picks exactly a stable sort's top k, −∞, −0 and subnormals
    included; the small groups give more tied group maxima than it may choose."""
    scores_BN = hard_scores(8, 300, torch.float32)
    values_BK = torch.full((8, 50), float("nan"), device=DEVICE)
    indices_BK = torch.full((8, 50), -1, device=DEVICE, dtype=torch.int64)
    triton_select.topk_select_into(scores_BN, 50, values_BK, indices_BK, group=group)
    assert torch.equal(indices_BK.sort(-1).values, lowest_index_topk(scores_BN, 50).sort(-1).values)
    assert torch.equal(scores_BN.gather(1, indices_BK).relu(), values_BK)


def test_topk_indices_falls_back_to_torch_outside_the_select(
    triton_calls: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """fp64 scores, k above INDICES_MAX_K (where torch.topk is faster), a column-strided view, fp32 rows
    whose k groups do not fit one program (forced here; fp32 has no "bound" fallback): torch.topk, the same
    sets (no ties here)."""
    monkeypatch.setattr(triton_select, "MAX_GROUP_CANDIDATES", 0)
    big = kernels.INDICES_MAX_K + 1
    for scores_BN, k in [
        (torch.randn(4, 50, device=DEVICE, dtype=torch.float64), 7),
        (torch.randn(4, 50, device=DEVICE), 7),
        (torch.randn(2, big, device=DEVICE).to(torch.bfloat16), big),
        (torch.randn(50, 4, device=DEVICE).to(torch.bfloat16).T, 7),
    ]:
        expected = scores_BN.topk(k, dim=-1).indices.sort(-1).values
        assert torch.equal(kernels.topk_indices(scores_BN, k).sort(-1).values, expected)
    assert triton_calls == []


# -------------------------------------------------------------- the losses, against the torch.topk path
def aux_scores(sae: TopKSAE, x_BD: Tensor, dead_N: Tensor) -> Tensor:
    """The masked scores TopKSAE.aux_indices ranks (its GEMM, with its rounding)."""
    bias_N = sae.b_enc.masked_fill(~dead_N, float("-inf"))
    return torch.nn.functional.linear(x_BD - sae.b_dec, sae.W_enc, bias_N).detach()


def torch_aux_indices(sae: TopKSAE, x_BD: Tensor, dead_N: Tensor, k_aux: int) -> Tensor:
    """TopKSAE.aux_indices with torch.topk of the same masked scores."""
    return aux_scores(sae, x_BD, dead_N).topk(k_aux, dim=-1).indices


def torch_signed_topk(pre_BN: Tensor, k: int, allowed_N: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """abstopk.signed_topk as it was."""
    scores_BN = pre_BN.detach().abs()
    if allowed_N is not None:
        scores_BN = scores_BN.masked_fill(~allowed_N, -1.0)
    indices = scores_BN.topk(k, dim=-1, sorted=False).indices
    values = pre_BN.gather(-1, indices)
    if allowed_N is not None:
        values = values.masked_fill(~allowed_N[indices], 0.0)
    return values, indices


def make_sae(arch: str, dtype: torch.dtype) -> TopKSAE:
    """bf16: 16-bit pre-activations; fp32: those of training under bf16 autocast, whose fp32 b_enc makes the
    bf16 GEMM's output fp32."""
    sae = build_sae(arch, 16, 64, k=4, aux_k=8, dead_tokens=100)
    assert isinstance(sae, TopKSAE)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return sae.to(device=DEVICE, dtype=dtype)


def aux_and_grads(sae: TopKSAE, x_BD: Tensor, dead: DeadFeatures) -> tuple[Tensor, list[Tensor]]:
    sae.zero_grad()
    x_hat = sae(x_BD).x_hat.detach()
    aux = sae.auxk_loss(x_BD, x_hat, dead)
    assert aux is not None
    aux.backward()
    return aux.detach(), [p.grad.clone() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)]


def no_choice(scores_BN: Tensor, k: int) -> bool:
    """Whether the k-th largest score of every row is above the next, or a mask value (whose code is 0)."""
    sorted_BN = scores_BN.sort(-1, descending=True).values
    kth_B = sorted_BN[:, k - 1]
    return bool(((kth_B > sorted_BN[:, k]) | (kth_B <= -1)).all())


def no_ties(sae: TopKSAE, x_BD: Tensor, dead_N: Tensor) -> bool:
    pre_BN = sae.pre_acts(x_BD).detach()
    return (
        no_choice(aux_scores(sae, x_BD, dead_N), 8)  # TopK's AuxK
        and no_choice(pre_BN.abs().masked_fill(~dead_N, -1.0), 8)  # AbsTopK's AuxK
        and no_choice(pre_BN, 4)  # TopK's encode, whose x̂ makes the residual
        and no_choice(pre_BN.abs(), 4)  # AbsTopK's
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("arch", ["topk", "abstopk"])
@pytest.mark.parametrize("n_dead", [5, 8, 40])  # k_aux = 8: fewer dead than slots, as many, more
def test_aux_loss_and_gradients_match_the_torch_topk_path(
    triton_calls: list[int], monkeypatch: pytest.MonkeyPatch, arch: str, n_dead: int, dtype: torch.dtype
) -> None:
    sae = make_sae(arch, dtype)
    dead_N = torch.zeros(64, dtype=torch.bool, device=DEVICE)
    dead_N[torch.randperm(64, device=DEVICE)[:n_dead]] = True
    dead = DeadFeatures(dead_N, n_dead)
    # torch.topk picks any of the scores tied at the k-th (frequent in bf16): the two paths agree where it
    # has no choice, so the tokens are drawn until no row has such a tie.
    x_BD = next(
        x for x in (torch.randn(8, 16, device=DEVICE).to(dtype) for _ in range(50)) if no_ties(sae, x, dead_N)
    )

    aux, grads = aux_and_grads(sae, x_BD, dead)
    assert triton_calls.count(8) == 1, "AuxK's select (k_aux = 8) must run in Triton"
    monkeypatch.setattr(TopKSAE, "aux_indices", torch_aux_indices)
    monkeypatch.setattr(abstopk, "signed_topk", torch_signed_topk)  # AbsTopK's encode and aux_indices
    ref_aux, ref_grads = aux_and_grads(sae, x_BD, dead)
    assert triton_calls.count(8) == 1, "the reference must not run the select"

    # The same sets, so the same sums up to their order: the chosen entries' fp32 dot products and gradient
    # sums add in another order, a 16-bit gradient may round to the neighbouring value.
    close = {"rtol": 1.6e-2, "atol": 1e-5} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-7}
    torch.testing.assert_close(aux, ref_aux, rtol=1e-6, atol=0)
    for name, g, ref in zip(("W_enc", "b_enc", "W_dec", "b_dec"), grads, ref_grads):
        torch.testing.assert_close(g, ref, **close, msg=lambda m: f"{name}: {m}")  # noqa: B023


def graph_ops(t: Tensor) -> set[str]:
    """The names of the autograd nodes behind t."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(next_fn for next_fn, _ in node.next_functions)
    return {type(node).__name__ for node in seen}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("arch", ["topk", "abstopk"])
def test_aux_loss_on_the_triton_path_matches_dense_autograd_without_a_dense_backward(
    monkeypatch: pytest.MonkeyPatch, arch: str, dtype: torch.dtype
) -> None:
    """AuxK's chosen pre-activations come from `kernels.encode_at` (k_aux dot products, a sparse backward):
    loss and gradients as the torch backend's dense autograd (pre-activations of every feature, masked,
    gathered; compared in fp32), with no [B, n] node in the autograd graph (either dtype)."""
    torch.manual_seed(0)
    sae = make_sae(arch, dtype)
    dead_N = torch.zeros(64, dtype=torch.bool, device=DEVICE)
    dead_N[torch.randperm(64, device=DEVICE)[:40]] = True
    dead = DeadFeatures(dead_N, 40)
    x_BD = next(
        x for x in (torch.randn(8, 16, device=DEVICE).to(dtype) for _ in range(50)) if no_ties(sae, x, dead_N)
    )
    monkeypatch.setattr(kernels, "_BACKEND", "triton")
    x_hat = sae(x_BD).x_hat.detach()
    ops = graph_ops(sae.auxk_loss(x_BD, x_hat, dead))
    assert "_EncodeAtBackward" in ops and not ops & {"GatherBackward0", "MmBackward0", "AddmmBackward0"}
    aux, grads = aux_and_grads(sae, x_BD, dead)
    monkeypatch.setattr(kernels, "_BACKEND", "torch")
    ref_aux, ref_grads = aux_and_grads(sae, x_BD, dead)
    if dtype == torch.bfloat16:
        return  # the two backends' bf16 x̂ differ by rounding, and the residual AuxK fits amplifies it
    torch.testing.assert_close(aux, ref_aux, rtol=1e-5, atol=1e-6)
    for name, g, ref in zip(("W_enc", "b_enc", "W_dec", "b_dec"), grads, ref_grads):
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")  # noqa: B023


@pytest.mark.parametrize("arch", ["topk", "abstopk"])
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_aux_select_runs_without_autograd(triton_calls: list[int], arch: str, mode: Callable) -> None:
    """Evaluation computes the loss under no_grad or inference_mode: the select takes inference tensors."""
    sae = make_sae(arch, torch.bfloat16)
    dead_N = torch.zeros(64, dtype=torch.bool, device=DEVICE)
    dead_N[:6] = True
    x_BD = torch.randn(8, 16, device=DEVICE).to(torch.bfloat16)
    with mode():
        aux = sae.auxk_loss(x_BD, sae(x_BD).x_hat, DeadFeatures(dead_N, 6))
        indices_BK = sae.aux_indices(x_BD, dead_N, 8)
    assert aux is not None and aux.isfinite() and not aux.requires_grad
    assert triton_calls.count(8) == 2
    assert dead_N[indices_BK].sum(-1).eq(6).all()  # every dead feature, then 2 live ones (zeroed by the loss)


def test_batchtopk_token_cap_goes_through_the_select(triton_calls: list[int]) -> None:
    """The per-token cap keeps each token's ⌈1.5·k⌉ highest scores, as torch.topk's did (ties only among
    zeros, where either choice leaves the same scores)."""
    torch.manual_seed(0)
    sae = build_sae("batchtopk", 16, 64, k=4).to(DEVICE)  # cap ⌈1.5 · 4⌉ = 6
    x_BD = torch.randn(32, 16, device=DEVICE)
    with torch.no_grad():
        acts_BN = sae.pre_acts(x_BD).relu()
        got_BN = sae.selection_score(x_BD, acts_BN)
    top = acts_BN.float().topk(6, dim=-1)
    assert torch.equal(got_BN, torch.zeros_like(got_BN).scatter_(-1, top.indices, top.values))
    assert triton_calls == [6]
