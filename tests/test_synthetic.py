"""SyntheticActivations: determinism, frequencies, hierarchy, signs, shapes."""

from __future__ import annotations

import pytest
import torch

from mmsae.datasets.synthetic import CHUNK_TOKENS, SyntheticActivations


def small(**kw) -> SyntheticActivations:
    return SyntheticActivations(**{"d": 16, "n_directions": 64, "mean_active": 3.0, **kw})


def test_same_seed_same_features_and_stream_different_seed_differs() -> None:
    a, b, c = small(seed=1), small(seed=1), small(seed=2)
    assert torch.equal(a.features, b.features)
    assert torch.equal(a.sample(500), b.sample(500))
    assert not torch.equal(a.features, c.features)
    assert torch.allclose(a.features.norm(dim=-1), torch.ones(64))
    assert a.features.shape == (64, 16)


def test_sample_is_random_access_across_chunk_boundaries() -> None:
    ds = small()
    full = ds.sample(2 * CHUNK_TOKENS + 10)
    offset = CHUNK_TOKENS - 5
    assert torch.equal(ds.sample(20, offset=offset), full[offset : offset + 20])
    batches = list(ds.batches(batch_size=1000, n_tokens=2500))
    assert [len(b) for b in batches] == [1000, 1000, 500]
    assert torch.equal(torch.cat(batches), full[:2500])
    assert ds.sample(0).shape == (0, 16)


def codes_by_least_squares(ds: SyntheticActivations, x: torch.Tensor) -> torch.Tensor:
    # With d ≥ n_features the features are linearly independent: the coefficients are recoverable.
    return torch.linalg.lstsq(ds.features.T.double(), x.T.double()).solution.T


def test_frequencies_mean_active_and_power_law() -> None:
    ds = SyntheticActivations(d=48, n_directions=32, mean_active=4.0, zipf_exponent=1.0)
    codes = codes_by_least_squares(ds, ds.sample(8 * CHUNK_TOKENS))
    active = codes.abs() > 1e-6
    assert ds.frequencies.sum().item() == pytest.approx(4.0)
    assert active.sum(-1).double().mean().item() == pytest.approx(4.0, rel=0.03)
    empirical = active.double().mean(0)
    assert torch.allclose(empirical, ds.frequencies, atol=0.01)
    freq = ds.frequencies.sort(descending=True).values
    assert freq[0] / freq[9] == pytest.approx(10.0, rel=1e-6)  # rank^(−1)


def test_children_fire_only_with_their_parent_and_one_at_a_time() -> None:
    ds = SyntheticActivations(d=48, n_directions=40, mean_active=4.0, hierarchical=0.4, children_per_parent=4)
    assert ds.n_parents == 4 and ds.n_roots == 24
    active = codes_by_least_squares(ds, ds.sample(CHUNK_TOKENS)).abs() > 1e-6
    children = active[:, ds.n_roots :].reshape(-1, ds.n_parents, 4)
    parents = active[:, : ds.n_parents]
    assert torch.equal(children.sum(-1), parents.long())  # exactly one child per firing parent
    assert children.any()


def test_signed_features_take_both_signs_others_stay_positive() -> None:
    ds = SyntheticActivations(d=48, n_directions=32, mean_active=4.0, signed=0.5, magnitude=0.5)
    codes = codes_by_least_squares(ds, ds.sample(CHUNK_TOKENS))
    signed, unsigned = codes[:, ds.is_signed], codes[:, ~ds.is_signed]
    assert 0 < ds.is_signed.sum() < 32
    assert (signed < -0.5).any() and (signed > 0.5).any()
    assert (unsigned > -1e-6).all()
    nonzero = codes[codes.abs() > 1e-6].abs()
    assert nonzero.min() >= 0.75 - 1e-5 and nonzero.max() <= 1.25 + 1e-5


def test_noise_and_iteration() -> None:
    clean, noisy = small(), small(noise=0.1)
    residual = noisy.sample(1000) - clean.sample(1000)
    assert residual.std().item() == pytest.approx(0.1, rel=0.05)
    batches = list(small(batch_size=300, n_tokens=700))
    assert [len(b) for b in batches] == [300, 300, 100]
    stream = iter(small(batch_size=50))
    assert all(next(stream).shape == (50, 16) for _ in range(3))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mean_active": 0}, "mean_active"),
        ({"hierarchical": 1.0}, "hierarchical"),
        ({"hierarchical": 0.9, "children_per_parent": 1}, "too few root"),
        ({"d": 0}, "positive"),
    ],
)
def test_bad_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        small(**kwargs)
