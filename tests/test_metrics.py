"""Metrics against hand-computed formulas, on tiny tensors and tiny SAEs."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from mmsae import metrics
from mmsae.sae import SparseCodes, build_sae


def test_fvu_streaming_matches_one_shot_float64() -> None:
    # A large mean makes the naive Σ‖x‖² − N‖x̄‖² formula lose precision; the merge must not.
    x = torch.randn(1000, 16) + 1e3
    x_hat = x + 0.1 * torch.randn_like(x)
    acc = metrics.FVU()
    for chunk_x, chunk_hat in zip(x.split(37), x_hat.split(37)):
        acc.update(chunk_x, chunk_hat)
    xd, hd = x.double(), x_hat.double()
    expected = (xd - hd).pow(2).sum() / (xd - xd.mean(0)).pow(2).sum()
    assert acc.n_tokens == 1000
    assert acc.compute() == pytest.approx(expected.item(), rel=1e-9)
    assert acc.explained_variance() == pytest.approx(1 - expected.item(), rel=1e-9)
    assert metrics.explained_variance(x, x_hat) == pytest.approx(1 - expected.item(), rel=1e-9)


def test_fvu_errors() -> None:
    with pytest.raises(ValueError, match="before any update"):
        metrics.FVU().compute()
    with pytest.raises(ValueError, match="shape"):
        metrics.FVU().update(torch.zeros(2, 3), torch.zeros(2, 4))


def test_cosine_and_l0_dense_sparse_signed() -> None:
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    x_hat = torch.tensor([[1.0, 1.0], [0.0, -3.0]])
    assert metrics.cosine(x, x_hat).tolist() == pytest.approx([2**-0.5, -1.0])
    dense = torch.tensor([[0.0, -1.0, 2.0, 0.0], [0.5, 0.0, 0.0, 0.0]])  # signed codes count as active
    assert metrics.l0(dense) == pytest.approx(1.5)
    sparse = SparseCodes(torch.tensor([[-1.0, 2.0], [0.5, 0.0]]), torch.tensor([[1, 2], [0, 3]]), 4)
    assert metrics.l0(sparse) == pytest.approx(1.5)


def test_feature_density_dead_fraction_and_histogram() -> None:
    dense = torch.zeros(10, 5)
    dense[:, 0] = 1.0  # density 1
    dense[0, 1] = -2.0  # density 0.1, negative still fires
    density = metrics.FeatureDensity(5)
    density.update(dense)
    sparse = metrics.FeatureDensity(5)
    sparse.update(SparseCodes(torch.ones(10, 1), torch.zeros(10, 1, dtype=torch.long), 5))
    sparse.update(SparseCodes(torch.tensor([[-2.0]]), torch.tensor([[1]]), 5))
    assert density.density().tolist() == pytest.approx([1.0, 0.1, 0, 0, 0])
    assert density.dead_fraction() == pytest.approx(0.6)
    assert sparse.n_tokens == 11 and sparse.dead_fraction() == pytest.approx(0.6)
    counts, edges = density.log10_histogram(bins=4)
    assert counts.sum() == 2 and edges[0] == pytest.approx(-1.0) and edges[-1] == pytest.approx(0.0)


def test_plot_density_writes_png(tmp_path) -> None:
    density = torch.tensor([0.0, 1e-4, 1e-3, 1e-2, 0.5])
    png = metrics.plot_density(density, tmp_path / "density.png")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "density.png").read_bytes() == png
    assert Image.open(io.BytesIO(png)).size[0] > 100
    assert not list(tmp_path.glob(".*.tmp"))


def test_mmcs_and_fraction_recovered() -> None:
    features = torch.eye(4)
    atoms = torch.tensor(
        [
            [1.0, 0.0, 0.0, 0.0],  # exact
            [0.0, 0.8, 0.6, 0.0],  # cos 0.8 with e1, 0.6 with e2
            [0.0, 0.0, 0.0, -3.0],
        ]
    )  # −e3, scale must not matter
    assert metrics.max_cosine(features, atoms).tolist() == pytest.approx([1.0, 0.8, 0.6, 0.0])
    assert metrics.mmcs(features, atoms) == pytest.approx(0.6)
    assert metrics.fraction_recovered(features, atoms) == pytest.approx(0.25)
    assert metrics.fraction_recovered(features, atoms, absolute=True) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="d=4 but atoms have d=3"):
        metrics.mmcs(features, torch.ones(2, 3))


def test_seed_stability_is_permutation_invariant_and_one_to_one() -> None:
    a = torch.randn(6, 8)
    assert metrics.seed_stability(a, 2 * a[torch.randperm(6)]) == pytest.approx(1.0)
    # Both rows of `b` are closest to a[0]; a one-to-one matching must use a[1] for one of them.
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [0.8, 0.6]])
    assert metrics.seed_stability(a, b) == pytest.approx((1.0 + 0.6) / 2)


def test_evaluate_topk_matches_direct_computation() -> None:
    sae = build_sae("topk", 8, 32, k=3)
    sae.train()
    x = torch.randn(64, 8)
    result = metrics.evaluate(sae, x.split(16), features=sae.W_dec[:5].detach() * 2)
    assert sae.training  # mode restored
    with torch.no_grad():
        out = sae(x)
    xd = x.double()
    fvu = ((xd - out.x_hat.double()).pow(2).sum() / (xd - xd.mean(0)).pow(2).sum()).item()
    assert result["fvu"] == pytest.approx(fvu, rel=1e-6)
    assert result["explained_variance"] == pytest.approx(1 - fvu, rel=1e-6)
    assert result["l0"] == pytest.approx(metrics.l0(out.codes))
    assert result["cosine"] == pytest.approx(metrics.cosine(x, out.x_hat).mean().item(), rel=1e-6)
    fired = torch.zeros(32, dtype=torch.bool)
    fired[out.codes.indices[out.codes.values != 0]] = True
    assert result["dead_fraction"] == pytest.approx(1 - fired.double().mean().item())
    assert result["n_tokens"] == 64
    assert result["mmcs"] == pytest.approx(1.0) and result["fraction_recovered"] == 1.0


def test_evaluate_signed_codes_use_absolute_cosine() -> None:
    sae = build_sae("abstopk", 8, 16, k=2)
    # The known directions are the negated atoms: AbsTopK encodes them with negative codes,
    # so they count as recovered only through |cos|.
    result = metrics.evaluate(sae, [torch.randn(32, 8)], features=-sae.W_dec[:4].detach())
    assert result["l0"] > 0
    assert result["mmcs"] == pytest.approx(1.0)


def test_evaluate_dense_codes_and_empty_input() -> None:
    sae = build_sae("relu", 8, 16)
    result = metrics.evaluate(sae, [torch.randn(4, 5, 8)])  # [B, T, d] batches are flattened
    assert result["n_tokens"] == 20 and "mmcs" not in result
    with pytest.raises(ValueError, match="no tokens"):
        metrics.evaluate(sae, [])
