"""Gradients against references: AuxK, JumpReLU STEs, BatchTopK θ, bf16 autocast, decoder projection."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from mmsae.sae import (
    BatchTopKSAE,
    DeadFeatures,
    JumpReLUSAE,
    TopKSAE,
    build_sae,
    fired_mask,
    normalized_mse,
)
from mmsae.sae.jumprelu import JumpReLUFunction, StepFunction


# ------------------------------------------------------------------------------------------ AuxK
def dense_topk_mask(scores_BN: Tensor, k: int) -> Tensor:
    return scores_BN >= scores_BN.topk(k, dim=-1).values[:, -1:]


def test_auxk_matches_dense_autograd_twin() -> None:
    d, n, k, aux_k = 8, 32, 3, 5
    sae = build_sae("topk", d, n, k=k, aux_k=aux_k, aux_coef=0.5, dead_tokens=100)
    assert isinstance(sae, TopKSAE)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(16, d)
    out = sae(x)
    dead = ~fired_mask(out.codes, n)  # the features this batch did not use are the dead ones
    assert int(dead.sum()) > aux_k
    sae.loss(x, out, dead=DeadFeatures(dead, int(dead.sum()))).loss.backward()

    W_enc, b_enc, W_dec, b_dec = (
        p.detach().clone().requires_grad_() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)
    )
    pre = (x - b_dec) @ W_enc.T + b_enc
    x_hat = (pre.relu() * dense_topk_mask(pre, k)) @ W_dec + b_dec
    var = (x - x.mean(0)).pow(2).sum(-1).mean()
    mse = (x - x_hat).pow(2).sum(-1).mean() / var
    pre_dead = pre.masked_fill(~dead, float("-inf"))
    e_hat = (pre.relu() * dense_topk_mask(pre_dead, aux_k)) @ W_dec  # no b_dec
    aux = (e_hat - (x - x_hat).detach()).pow(2).sum(-1).mean() / var  # target detached
    (mse + 0.5 * aux).backward()
    for ref, p in zip((W_enc, b_enc, W_dec, b_dec), (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)):
        torch.testing.assert_close(p.grad, ref.grad, rtol=1e-5, atol=1e-6)

    # AuxK alone never reaches the live atoms: its target is detached and it decodes dead features only.
    sae.zero_grad()
    sae.auxk_loss(x, sae(x).x_hat, DeadFeatures(dead, int(dead.sum()))).backward()
    assert (sae.W_dec.grad[~dead] == 0).all() and (sae.W_dec.grad[dead] != 0).any()


def test_auxk_is_off_without_dead_features() -> None:
    sae = build_sae("topk", 8, 32, k=3)
    x = torch.randn(16, 8)
    out = sae(x)
    none_dead = DeadFeatures(torch.zeros(32, dtype=torch.bool), 0)
    assert sae.auxk_loss(x, out.x_hat, none_dead) is None
    assert "auxk" not in sae.loss(x, out, dead=none_dead).metrics and "auxk" not in sae.loss(x, out).metrics


# ------------------------------------------------------------------------------------- JumpReLU STE
def smoothed_jumprelu(z: Tensor, theta: Tensor, w: Tensor, eps: float) -> Tensor:
    """Σ w·E[z'·1[z' > θ]] with z' ~ U(z − ε/2, z + ε/2): the objective whose θ-derivative the STE is."""
    lo = torch.maximum(theta.expand_as(z), z - eps / 2)
    hi = z + eps / 2
    return (w * (hi.pow(2) - lo.pow(2)).clamp_min(0) / (2 * eps)).sum()


def smoothed_step(z: Tensor, theta: Tensor, w: Tensor, eps: float) -> Tensor:
    """Σ w·P(z' > θ), same smoothing."""
    return (w * ((z + eps / 2 - theta) / eps).clamp(0, 1)).sum()


def finite_difference(fn, theta: Tensor, h: float = 1e-7) -> Tensor:
    grads = torch.zeros_like(theta)
    for i in range(theta.numel()):
        e = torch.zeros_like(theta)
        e[i] = h
        grads[i] = (fn(theta + e) - fn(theta - e)) / (2 * h)
    return grads


@pytest.mark.parametrize(
    ("fn", "smoothed"), [(JumpReLUFunction, smoothed_jumprelu), (StepFunction, smoothed_step)]
)
def test_threshold_ste_matches_formula_and_smoothed_finite_differences(fn, smoothed) -> None:
    eps = 0.1
    theta = torch.tensor([0.2, 0.5, 1.0, 0.05], dtype=torch.float64, requires_grad=True)
    z = theta.detach() + eps * (torch.rand(256, 4, dtype=torch.float64) - 0.5) * 3  # many inside the window
    w = torch.randn(256, 4, dtype=torch.float64)
    (fn.apply(z, theta, eps) * w).sum().backward()

    kernel = ((z - theta.detach()).abs() < eps / 2).double()
    scale = theta.detach() if fn is JumpReLUFunction else torch.ones_like(theta)
    analytic = (-(scale / eps) * kernel * w).sum(0)
    torch.testing.assert_close(theta.grad, analytic)
    numeric = finite_difference(lambda t: smoothed(z, t, w, eps), theta.detach())
    torch.testing.assert_close(theta.grad, numeric, rtol=1e-5, atol=1e-6)


def test_jumprelu_ste_reads_pre_activations_not_codes() -> None:
    """Just below θ the code is 0, yet θ must get a gradient (dictionary_learning #55 applied it to f)."""
    eps = 0.1
    theta = torch.tensor([0.5], requires_grad=True)
    z = torch.tensor([[0.5 - eps / 4]], requires_grad=True)
    f = JumpReLUFunction.apply(z, theta, eps)
    assert f.item() == 0
    f.sum().backward()
    assert theta.grad.item() == pytest.approx(-0.5 / eps)
    assert z.grad.item() == 0  # ∂f/∂z = 1[z > θ]


def test_jumprelu_sae_l0_penalty_and_target() -> None:
    sae = build_sae(
        "jumprelu", 8, 32, threshold_init=0.05, bandwidth=0.05, sparsity_coef=0.1, sparsity_warmup_steps=10
    )
    x = torch.randn(64, 8)
    out = sae(x)
    l0 = (out.aux["pre_acts"] > sae.threshold).float().sum(-1).mean()
    mse = normalized_mse(x, out.x_hat)
    torch.testing.assert_close(sae.loss(x, out, 5).loss, mse + 0.05 * l0)
    target = build_sae(
        "jumprelu", 8, 32, threshold_init=0.05, sparsity_coef=0.1, sparsity_warmup_steps=0, target_l0=4.0
    )
    target.load_state_dict(sae.state_dict())
    torch.testing.assert_close(target.loss(x, out, 0).loss, mse + 0.1 * (l0 / 4 - 1) ** 2)
    with torch.no_grad():
        sae.threshold.fill_(-1.0)
    sae.normalize_decoder()
    assert (sae.threshold == sae.cfg.min_threshold).all()


# ------------------------------------------------------------------------------- BatchTopK threshold
def test_batchtopk_threshold_ema_and_batch_independent_eval() -> None:
    sae = build_sae("batchtopk", 8, 32, k=3, threshold_decay=0.75, score="activation", token_cap=None).train()
    assert isinstance(sae, BatchTopKSAE)
    x1, x2 = torch.randn(16, 8), torch.randn(16, 8)
    codes1 = sae(x1).codes
    min1 = codes1[codes1 > 0].min()
    assert int((codes1 != 0).sum()) == 16 * 3
    assert sae.threshold.item() == pytest.approx(min1.item())  # first batch sets θ directly
    codes2 = sae(x2).codes
    min2 = codes2[codes2 > 0].min()
    assert sae.threshold.item() == pytest.approx(0.75 * min1.item() + 0.25 * min2.item())

    sae.eval()
    theta = sae.threshold.clone()
    pre = sae.pre_acts(x1)
    codes = sae.encode(x1)
    torch.testing.assert_close(codes, pre * (pre > theta))
    torch.testing.assert_close(sae.encode(x1[:3]), codes[:3])  # no dependence on the rest of the batch
    assert torch.equal(sae.threshold, theta)  # statistics only move in training


# --------------------------------------------------------------------------------------- bf16 autocast
@pytest.mark.parametrize("arch", ["jumprelu", "batchtopk"])
def test_thresholds_stay_fp32_and_learn_under_bf16_autocast(arch: str) -> None:
    jump_kw = {"threshold_init": 0.05, "bandwidth": 0.05, "sparsity_warmup_steps": 0}
    kw = jump_kw if arch == "jumprelu" else {"k": 4}
    sae = build_sae(arch, 16, 64, **kw).train()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    data = torch.randn(256, 16)
    before = sae.threshold.detach().clone()
    for step in range(5):
        x = data[step * 32 : (step + 1) * 32]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = sae(x)
            lo = sae.loss(x, out, step)
            assert (x @ sae.W_enc.T).dtype == torch.bfloat16  # the matmuls really run in bf16
        assert lo.loss.dtype == torch.float32
        opt.zero_grad()
        lo.loss.backward()
        if isinstance(sae, JumpReLUSAE):
            assert sae.threshold.grad.dtype == torch.float32 and sae.threshold.grad.abs().sum() > 0
        opt.step()
        sae.normalize_decoder()
    assert sae.threshold.dtype == torch.float32
    changed = sae.threshold.detach() != before
    assert changed.all() if arch == "batchtopk" else changed.float().mean() > 0.5


# -------------------------------------------------------------------------------- decoder projection
def test_remove_parallel_grads_keeps_atom_norms_to_first_order() -> None:
    sae = build_sae("topk", 8, 32, k=4)
    g = torch.randn(32, 8)
    sae.W_dec.grad = g.clone()
    sae.remove_parallel_grads()
    W = sae.W_dec.detach()
    torch.testing.assert_close((sae.W_dec.grad * W).sum(-1), torch.zeros(32), atol=1e-6, rtol=0)
    for lr in (1e-2, 1e-3):
        projected = (W - lr * sae.W_dec.grad).norm(dim=-1) - 1
        raw = (W - lr * g).norm(dim=-1) - 1
        assert projected.abs().max() <= lr**2 * g.norm(dim=-1).max() ** 2  # second order only
        assert raw.abs().max() > 10 * projected.abs().max()
    # Free-norm variants leave the gradient alone.
    relu = build_sae("relu", 8, 32)
    relu.W_dec.grad = g.clone()
    relu.remove_parallel_grads()
    assert torch.equal(relu.W_dec.grad, g)
