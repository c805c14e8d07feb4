"""Every SAE variant: shapes, checkpoint round trip, input-scale folding, training, bad input, specifics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from mmsae.checkpoint import load_sae, save_sae
from mmsae.sae import (
    REGISTRY,
    SAE,
    ArchetypalSAE,
    HierarchicalTopKSAE,
    MatryoshkaSAE,
    SparseCodes,
    as_dense,
    build_sae,
    fired_mask,
    normalized_mse,
)
from mmsae.trainer.state import DeadFeatureClock

D, N = 16, 64
# name -> (arch, options); matryoshka also runs with per-token TopK selection.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "topk": ("topk", {"k": 4}),
    "relu": ("relu", {"l1_warmup_steps": 50, "l1_coef": 0.02}),
    "batchtopk": ("batchtopk", {"k": 4, "threshold_decay": 0.9}),
    "jumprelu": (
        "jumprelu",
        {"threshold_init": 0.05, "bandwidth": 0.05, "sparsity_coef": 3e-3, "sparsity_warmup_steps": 50},
    ),
    "gated": ("gated", {"l1_warmup_steps": 50, "l1_coef": 0.02}),
    "matryoshka": ("matryoshka", {"k": 4}),
    "matryoshka_topk": ("matryoshka", {"k": 4, "selection": "topk"}),
    "abstopk": ("abstopk", {"k": 4}),
    "archetypal": ("archetypal", {"k": 4, "n_anchors": 32, "delta": 0.2}),
    "mp": ("mp", {"k": 4}),
    "hierarchical_topk": ("hierarchical_topk", {"ks": (2, 4)}),
}
K_ARCHS = ["topk", "batchtopk", "matryoshka", "abstopk", "archetypal", "mp"]


def make(name: str, **overrides: Any) -> SAE:
    arch, kw = VARIANTS[name]
    return build_sae(arch, D, N, **{**kw, **overrides})


def sparse_data(n_tokens: int, seed: int = 0) -> torch.Tensor:
    """Tokens that are sparse non-negative mixtures (~3 of 32) of fixed unit directions plus an offset."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(32, D, generator=g)
    directions /= directions.norm(dim=-1, keepdim=True)
    active = torch.rand(n_tokens, 32, generator=g) < 3 / 32
    coef = active * (0.5 + 1.5 * torch.rand(n_tokens, 32, generator=g))
    return coef @ directions + 0.5 * torch.randn(D, generator=g)


@torch.no_grad()
def perturb(sae: SAE) -> None:
    """Move every parameter and threshold away from its (often symmetric) init, constraints kept."""
    for p in sae.parameters():
        p.add_(0.1 * torch.randn_like(p))
    sae.b_dec.add_(torch.randn_like(sae.b_dec))
    if hasattr(sae, "threshold"):
        sae.threshold.copy_(0.1 + 0.3 * torch.rand_like(sae.threshold))
    sae.normalize_decoder()


def test_every_variant_is_registered() -> None:
    assert {arch for arch, _ in VARIANTS.values()} <= set(REGISTRY)


@pytest.mark.parametrize("name", VARIANTS)
def test_shapes(name: str) -> None:
    sae = make(name)
    x = torch.randn(8, D)
    out = sae(x)
    assert out.x_hat.shape == (8, D)
    dense = as_dense(out.codes)
    assert dense.shape == (8, N)
    assert torch.equal(sae.encode_dense(x), dense)
    k = sae.cfg.k
    if isinstance(out.codes, SparseCodes):
        assert out.codes.values.shape == out.codes.indices.shape == (8, k)
    if k is not None and name != "batchtopk" and name != "matryoshka":  # BatchTopK: k is a batch average
        assert ((dense != 0).sum(-1) <= k).all()
    assert torch.equal(fired_mask(out.codes, N), (dense != 0).any(0))


def test_fired_mask_ignores_selected_zeros() -> None:
    # TopK's relu can select a feature with value 0: it did not fire. Feature 2 appears only as such a zero.
    codes = SparseCodes(torch.tensor([[1.0, 0.0], [0.5, 2.0]]), torch.tensor([[0, 2], [0, 5]]), 6)
    assert fired_mask(codes, 6).tolist() == [True, False, False, False, False, True]


@pytest.mark.parametrize("name", VARIANTS)
def test_checkpoint_round_trip(name: str, tmp_path: Path) -> None:
    sae = make(name)
    sae.init_from_data(sparse_data(256))
    perturb(sae)
    save_sae(sae, tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae")
    assert type(loaded) is type(sae)
    assert loaded.cfg == sae.cfg
    assert sae.state_dict().keys() == loaded.state_dict().keys()
    for key, value in sae.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    x = sparse_data(32, seed=1)
    sae.eval(), loaded.eval()
    assert torch.equal(sae(x).x_hat, loaded(x).x_hat)


@pytest.mark.parametrize("name", VARIANTS)
def test_fold_input_scale(name: str) -> None:
    """Trained on s·x, folded, applied to raw x: identical codes and x̂/s (fp64, so no float noise)."""
    sae = make(name).double()
    perturb(sae)
    sae.eval()
    x = sparse_data(32).double()
    s = 3.7
    codes_scaled, x_hat_scaled = sae.encode_dense(s * x), sae(s * x).x_hat
    sae.fold_input_scale(s)
    assert sae.cfg.normalization == "folded"
    torch.testing.assert_close(sae.encode_dense(x), codes_scaled, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sae(x).x_hat, x_hat_scaled / s, rtol=1e-10, atol=1e-10)
    # The trainer's post-step hook must not undo the fold (atoms now have norm 1/s).
    sae.normalize_decoder()
    torch.testing.assert_close(sae(x).x_hat, x_hat_scaled / s, rtol=1e-10, atol=1e-10)


def train(sae: SAE, data: torch.Tensor, steps: int, lr: float = 3e-3, batch: int = 128) -> list[float]:
    """The trainer's contract, inline: init, forward, loss, projections around the Adam step, dead clock."""
    sae.init_from_data(data[:512])
    sae.train()
    opt = torch.optim.Adam([p for p in sae.parameters() if p.requires_grad], lr=lr)
    clock = DeadFeatureClock(sae.n_features, sae.cfg.dead_tokens)
    losses = []
    for step in range(steps):
        x = data[torch.randint(len(data), (batch,))]
        out = sae(x)
        clock.refresh_count()
        lo = sae.loss(x, out, step, dead=clock.dead())
        opt.zero_grad()
        lo.loss.backward()
        sae.remove_parallel_grads()
        opt.step()
        sae.normalize_decoder()
        clock.update(fired_mask(out.codes, sae.n_features), batch)
        losses.append(lo.loss.item())
    return losses


@pytest.mark.parametrize("name", VARIANTS)
def test_training_reduces_loss(name: str) -> None:
    data = sparse_data(2048)
    sae = make(name, dead_tokens=2048)
    sae.eval()
    fvu_before = normalized_mse(data, sae(data).x_hat).item()
    sae.train()
    losses = train(sae, data, steps=300)
    sae.eval()
    with torch.no_grad():
        fvu_after = normalized_mse(data, sae(data).x_hat).item()
    assert sum(losses[-20:]) < sum(losses[:20]), (losses[:3], losses[-3:])
    # Matryoshka and archetypal trade some full-width fidelity for structure, hence the loose bound.
    assert fvu_after < min(0.5 * fvu_before, 0.35), (fvu_before, fvu_after)


@pytest.mark.parametrize("arch", K_ARCHS)
def test_k_larger_than_n_features_is_refused(arch: str) -> None:
    with pytest.raises(ValueError, match="k=65"):
        build_sae(arch, D, N, k=N + 1)


def test_hierarchical_budget_larger_than_n_features_is_refused() -> None:
    with pytest.raises(ValueError, match="k=65"):
        build_sae("hierarchical_topk", D, N, ks=(4, N + 1))


@pytest.mark.parametrize("name", VARIANTS)
def test_wrong_input_width_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match=f"expects d_in={D}"):
        make(name)(torch.randn(4, D + 1))


def test_unknown_arch_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="Unknown SAE architecture 'topkk'") as err:
        build_sae("topkk", D, N)
    for arch in (
        "relu",
        "batchtopk",
        "jumprelu",
        "gated",
        "matryoshka",
        "abstopk",
        "archetypal",
        "mp",
        "hierarchical_topk",
    ):
        assert arch in str(err.value)


def test_unknown_option_names_valid_ones() -> None:
    with pytest.raises(TypeError, match="stop_tol"):
        build_sae("mp", D, N, stop_tolerance=0.1)


# ---------------------------------------------------------------------------------- variant specifics
def test_relu_l1_warms_up_linearly() -> None:
    sae = make("relu", l1_warmup_steps=100, l1_coef=0.5)
    x = torch.randn(16, D)
    out = sae(x)
    mse = normalized_mse(x, out.x_hat)
    l1 = (out.codes * sae.W_dec.norm(dim=-1)).sum(-1).mean()
    torch.testing.assert_close(sae.loss(x, out, 0).loss, mse)
    torch.testing.assert_close(sae.loss(x, out, 50).loss, mse + 0.25 * l1)
    torch.testing.assert_close(sae.loss(x, out, 10_000).loss, mse + 0.5 * l1)
    assert build_sae("relu", D, N).cfg.unit_norm_decoder is False
    assert build_sae("relu", D, N).l1_coef_at(10**6) == pytest.approx(5 / D)


def test_gated_codes_follow_the_gate_and_aux_leaves_decoder_alone() -> None:
    sae = make("gated", l1_coef=0.0)
    perturb(sae)
    x = torch.randn(32, D)
    out = sae(x)
    pi_gate = out.aux["pi_gate"]
    assert (out.codes[pi_gate <= 0] == 0).all()
    assert (out.codes[pi_gate > 0] >= 0).all()
    # With λ = 0 only the main MSE touches W_dec: the aux reconstruction uses a frozen decoder.
    sae.loss(x, out).loss.backward()
    expected = torch.autograd.grad(
        normalized_mse(x, out.codes.detach() @ sae.W_dec + sae.b_dec.detach()), sae.W_dec
    )[0]
    torch.testing.assert_close(sae.W_dec.grad, expected)
    assert sae.r_mag.grad is not None and sae.b_mag.grad is not None


def test_abstopk_keeps_largest_magnitudes_with_sign() -> None:
    sae = make("abstopk")
    perturb(sae)
    x = torch.randn(32, D)
    codes = sae.encode(x)
    pre = sae.pre_acts(x)
    expected = pre.abs().topk(4, dim=-1).values.sort(-1).values
    torch.testing.assert_close(codes.values.abs().sort(-1).values, expected)
    torch.testing.assert_close(codes.values, pre.gather(-1, codes.indices))
    assert (codes.values < 0).any() and (codes.values > 0).any()


def test_hierarchical_budgets_are_prefixes() -> None:
    sae = make("hierarchical_topk", ks=(1, 2, 4))
    perturb(sae)
    x = torch.randn(16, D)
    full = sae.encode(x)
    assert (full.values[:, :-1] >= full.values[:, 1:]).all()  # sorted, largest first
    for k in (1, 2, 4):
        part = sae.encode(x, k=k)
        assert torch.equal(part.indices, full.indices[:, :k]) and torch.equal(part.values, full.values[:, :k])
    out = sae(x)
    expected = torch.stack([normalized_mse(x, sae(x, k=k).x_hat) for k in (1, 2, 4)]).mean()
    # no dead features given, so no AuxK term
    torch.testing.assert_close(sae.loss(x, out).loss, expected)
    with pytest.raises(ValueError, match="max\\(ks\\)=4"):
        sae.encode(x, k=5)
    with pytest.raises(ValueError, match="must equal max\\(ks\\)"):
        build_sae("hierarchical_topk", D, N, ks=(2, 4), k=2)
    assert isinstance(sae, HierarchicalTopKSAE) and sae.cfg.k == 4


def test_matryoshka_loss_is_mean_of_prefix_losses() -> None:
    sae = make("matryoshka")
    assert isinstance(sae, MatryoshkaSAE)
    assert sae.cfg.prefix_widths() == [8, 16, 32, 64]  # doubling from an eighth: the default
    perturb(sae)
    x = torch.randn(32, D)
    out = sae.train()(x)  # training: BatchTopK selection over the batch
    f = out.codes
    widths = (8, 16, 32, 64)
    expected = torch.stack([normalized_mse(x, f[:, :m] @ sae.W_dec[:m] + sae.b_dec) for m in widths])
    torch.testing.assert_close(sae.loss(x, out).loss, expected.mean())
    assert int((f != 0).sum()) == 32 * 4  # BatchTopK: B·k over the batch
    with pytest.raises(ValueError, match="increase strictly"):
        build_sae("matryoshka", D, N, k=4, prefix_fractions=(0.5, 0.25, 1.0))
    with pytest.raises(ValueError, match="selection"):
        build_sae("matryoshka", D, N, k=4, selection="mutual")


def test_mp_residual_and_adaptive_stop() -> None:
    torch.manual_seed(1)
    sae = build_sae("mp", D, D, k=D)
    with torch.no_grad():  # orthonormal dictionary: pursuit recovers x exactly in d steps
        sae.W_dec.copy_(torch.linalg.qr(torch.randn(D, D))[0].T)
    x = torch.randn(8, D)
    codes = sae.encode(x)
    assert all(len(set(row.tolist())) == D for row in codes.indices)  # no atom picked twice
    torch.testing.assert_close(sae(x).x_hat, x, atol=1e-5, rtol=1e-5)

    sae = build_sae("mp", D, N, k=8, stop_tol=0.5).train()  # the tolerance applies only at inference
    perturb(sae)
    sae.normalize_decoder()
    x = torch.randn(64, D)
    one_step = build_sae("mp", D, N, k=1)
    one_step.load_state_dict(sae.state_dict())
    # First step: residual orthogonal to the chosen unit atom.
    c = one_step.encode(x)
    r = x - sae.b_dec - c.values * sae.W_dec[c.indices[:, 0]]
    torch.testing.assert_close((r * sae.W_dec[c.indices[:, 0]]).sum(-1), torch.zeros(64), atol=1e-5, rtol=0)
    n_train = int((sae.encode(x).values != 0).sum())
    sae.eval()
    n_eval = int((sae.encode(x).values != 0).sum())
    assert n_train == 64 * 8 > n_eval  # tolerance only at inference
    assert "W_enc" not in sae.state_dict()


def test_archetypal_dictionary_constraints() -> None:
    sae = make("archetypal")
    assert isinstance(sae, ArchetypalSAE)
    data = sparse_data(512)
    sae.init_from_data(data)
    mixing = sae.mixing()
    assert (mixing >= 0).all()
    torch.testing.assert_close(mixing.sum(-1), torch.ones(N))
    atoms = mixing @ sae.anchors + sae.relax
    torch.testing.assert_close(sae.W_dec, atoms / atoms.norm(dim=-1, keepdim=True) / 4)  # g = 1/k
    # Anchors are k-means centroids of the centred sample: inside its bounding box, and distinct.
    centred = data - sae.b_dec
    assert (sae.anchors >= centred.min(0).values - 1e-5).all()
    assert (sae.anchors <= centred.max(0).values + 1e-5).all()
    assert torch.cdist(sae.anchors, sae.anchors).add(torch.eye(32)).min() > 0
    with torch.no_grad():
        sae.relax.copy_(torch.randn(N, D))
    sae.normalize_decoder()
    assert (sae.relax.norm(dim=-1) <= 0.2 + 1e-6).all()
    assert "W_dec" not in sae.state_dict() and "anchors" in sae.state_dict()
    with pytest.raises(ValueError, match="n_anchors=32"):
        make("archetypal").init_from_data(data[:10])
    with pytest.raises(ValueError, match="unit_norm_decoder=False"):
        build_sae("archetypal", D, N, k=4, unit_norm_decoder=True)


def test_archetypal_atoms_share_one_norm_and_the_encoder_has_topk_scale() -> None:
    """Every atom has norm g = 1/k whatever its anchors' norms (TopK ranks codes, so a long atom's small codes
    would lose), and the encoder rows unit norm (rows of ≈ 1/(k‖a‖) were rewritten by Adam's first step)."""
    sae = make("archetypal")
    sae.init_from_data(sparse_data(512) * 5)
    mixture_norms = (sae.mixing() @ sae.anchors).norm(dim=-1)
    assert mixture_norms.max() > 5 * mixture_norms.min()  # the anchors' own norms differ widely
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.full((N,), 1 / 4))
    torch.testing.assert_close(sae.W_enc.norm(dim=-1), torch.ones(N))


def test_archetypal_saved_before_atom_normalisation_loads_unchanged() -> None:
    """A cfg.json without `normalize_atoms`/`atom_scale` means the dictionary D = C·A + Λ itself."""
    from mmsae.checkpoint import sae_from_config

    cfg = {
        "arch": "archetypal",
        "d_in": D,
        "n_features": N,
        "k": 4,
        "n_anchors": 32,
        "unit_norm_decoder": False,
    }
    sae = sae_from_config(cfg)
    assert (sae.cfg.normalize_atoms, sae.cfg.atom_scale) == (False, 1.0)
    torch.testing.assert_close(sae.W_dec, sae.mixing() @ sae.anchors + sae.relax)
