"""The feature-statistics pass's kernels (`kernels.feature_sums_`, `residual_sums_`, `merge_sorted_top_`):
the Triton path against the torch reference, and a whole pass on it. Without CUDA the kernels run in Triton's
interpreter (TRITON_INTERPRET, set by conftest)."""

from __future__ import annotations

import math

import pytest
import torch

from mmsae import kernels
from mmsae.analysis import StatsConfig, feature_stats
from mmsae.encoders.base import TokenActs
from mmsae.kernels import reference, triton_stats
from mmsae.sae import build_sae

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _accumulators(n: int, bins: int) -> list[torch.Tensor]:
    f64 = dict(dtype=torch.float64, device=DEVICE)
    return [
        torch.zeros(n + 1, **f64),
        torch.zeros(n + 1, **f64),
        torch.full((n + 1,), -math.inf, device=DEVICE),
        torch.zeros(n + 1, bins, **f64),
    ]


def test_feature_sums_match_the_reference() -> None:
    """Counts, sums and maxima exactly (signed AbsTopK values, silent pairs in the spare group n, repeats of
    a feature within a block); the histogram up to values on a bin edge, of which random values have none."""
    g = torch.Generator().manual_seed(0)
    n, M, bins = 300, 5000, 16
    raw = (torch.randn(M, generator=g) * 10).exp().mul(torch.randn(M, generator=g).sign())
    raw[::5] = 0.0
    raw[1::97] = 1e-9  # below the histogram's range: the first bin
    raw[2::89] = 1e9  # above it: the last bin
    lat = torch.randint(0, n, (M,), generator=g)
    lat[:200] = 7  # one feature hit by many pairs of one program
    grp = torch.where(raw != 0, lat, n).to(DEVICE)
    raw = raw.to(DEVICE)
    got, want = _accumulators(n, bins), _accumulators(n, bins)
    for _ in range(2):  # the second call adds to filled accumulators
        triton_stats.feature_sums_(grp, raw, *got, (-4.0, 4.0))
        reference.feature_sums_(grp, raw, *want, (-4.0, 4.0))
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=0)
    assert torch.equal(got[2], want[2])
    assert torch.equal(got[3], want[3])
    assert want[3][:n, 0].sum() > 0 and want[3][:n, -1].sum() > 0


def test_feature_sums_take_no_pairs() -> None:
    acc = _accumulators(4, 8)
    empty = torch.empty(0, device=DEVICE)
    triton_stats.feature_sums_(empty.long(), empty, *acc, (-4.0, 4.0))
    assert acc[0].sum() == 0 and acc[3].sum() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("N", "D"), [(300, 40), (129, 300)])
def test_residual_sums_match_the_reference(dtype: torch.dtype, N: int, D: int) -> None:
    """Shapes that fill no block (N not a multiple of the rows per program, D of the column block), a
    large mean removed by the shift, and x̂ in x's dtype as the decoder gives it."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(N, D, generator=g) + 50).to(DEVICE, dtype)
    x_hat = (x.float() + 0.1 * torch.randn(N, D, generator=g).to(DEVICE)).to(dtype)
    shift = x.float().mean(0)
    f64 = dict(dtype=torch.float64, device=DEVICE)
    got = [torch.zeros(D, **f64), torch.zeros((), **f64), torch.zeros((), **f64)]
    want = [torch.zeros(D, **f64), torch.zeros((), **f64), torch.zeros((), **f64)]
    triton_stats.residual_sums_(x, x_hat, shift, *got)
    reference.residual_sums_(x, x_hat, shift, *want)
    exact_err = (x.double() - x_hat.double()).pow(2).sum()
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=0)
    torch.testing.assert_close(got[2], exact_err, rtol=1e-5, atol=0)
    torch.testing.assert_close(want[2], exact_err, rtol=1e-4, atol=0)


def test_residual_sums_of_strided_rows() -> None:
    x = torch.randn(40, 64, device=DEVICE)[:, :24]  # rows with a stride of 64
    x_hat = torch.zeros(40, 24, device=DEVICE)
    f64 = dict(dtype=torch.float64, device=DEVICE)
    got = [torch.zeros(24, **f64), torch.zeros((), **f64), torch.zeros((), **f64)]
    triton_stats.residual_sums_(x, x_hat, torch.zeros(24, device=DEVICE), *got)
    torch.testing.assert_close(got[0], x.double().sum(0), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got[2], x.double().pow(2).sum(), rtol=1e-6, atol=0)


@pytest.mark.usefixtures("triton_backend")
def test_a_pass_on_the_fused_sums_equals_the_torch_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same pass with the torch reference of the sums and the top-k merge in place of the kernels (the
    encode unchanged, so the codes are the same); tokens of one example split across chunks, so the merge
    drops duplicates."""
    sae = build_sae("topk", 16, 64, k=4).to(DEVICE)
    g = torch.Generator().manual_seed(2)
    batches = [
        TokenActs(
            torch.randn(24, 16, generator=g).to(DEVICE) + 3,
            {"example_id": torch.arange(24) // 3 + 8 * i, "token_index": torch.arange(24) % 3},
        )
        for i in range(4)
    ]
    cfg = StatsConfig(top_k=3, chunk_tokens=20)
    fused = feature_stats(sae, batches, cfg)
    monkeypatch.setattr(kernels, "feature_sums_", reference.feature_sums_)
    monkeypatch.setattr(kernels, "residual_sums_", reference.residual_sums_)
    monkeypatch.setattr(kernels, "merge_sorted_top_", reference.merge_sorted_top_)
    plain = feature_stats(sae, batches, cfg)
    assert fused.n_tokens == plain.n_tokens == 96
    for name in ("fire_count", "act_max", "hist", "top_values", "_top_meta"):
        assert torch.equal(getattr(fused, name), getattr(plain, name)), name
    torch.testing.assert_close(fused.act_sum, plain.act_sum, rtol=1e-12, atol=0)
    assert fused.fvu == pytest.approx(plain.fvu, rel=1e-6)


def test_a_nan_value_lands_in_the_first_bin() -> None:
    """A NaN code (a diverged SAE) must not index outside the histogram: its bin is the first."""
    acc = _accumulators(4, 8)
    grp = torch.tensor([2, 3], device=DEVICE)
    triton_stats.feature_sums_(grp, torch.tensor([math.nan, 1.0], device=DEVICE), *acc, (-4.0, 4.0))
    assert acc[3].sum() == 2 and acc[3][2, 0] == 1 and acc[3][3, 4] == 1


def _brute_merge(top_v, top_meta, grp, v, row, meta, distinct: bool):
    """One feature at a time in Python: the running top, then the chunk's entries in their order, sorted
    stably by value (NaN first, −∞ no entry); with `distinct`, an example's later entries dropped."""
    k, n = top_v.shape
    out_v, out_meta = torch.full_like(top_v, -math.inf), torch.full_like(top_meta, -1)
    rank = lambda x: (0, 0.0) if math.isnan(x) else (1, -x)
    for f in range(n):
        entries = [(float(top_v[j, f]), top_meta[j, f].tolist()) for j in range(k)]
        entries += [(float(v[i]), meta[row[i]].tolist()) for i in (grp == f).nonzero().flatten().tolist()]
        entries = sorted([e for e in entries if e[0] != -math.inf], key=lambda e: rank(e[0]))
        seen, kept = set(), []
        for value, m in entries:
            if not (distinct and m[0] in seen):
                kept.append((value, m))
            seen.add(m[0])
        for j, (value, m) in enumerate(kept[:k]):
            out_v[j, f], out_meta[j, f] = value, torch.tensor(m)
    return out_v, out_meta


def _merge_case(k: int, n: int, N: int, per_row: int, seed: int):
    """A running top (sorted, distinct examples per feature, some −∞) and a chunk's pairs sorted as the
    stats pass sorts them: many equal values, examples repeated within the chunk and shared with the top,
    a NaN, negative values, −0.0 and +0.0, −∞ entries and ignored pairs (group n)."""
    g = torch.Generator().manual_seed(seed)
    top_v = torch.randint(-3, 4, (k, n), generator=g).float().sort(0, descending=True).values
    top_v[-1, ::3] = -math.inf
    top_meta = torch.randint(0, 8, (k, n, 3), generator=g)
    top_meta[..., 0] = torch.stack([torch.randperm(2 * k, generator=g)[:k] for _ in range(n)], 1)
    top_meta[top_v == -math.inf] = -1
    meta = torch.randint(0, 100, (N, 3), generator=g)
    meta[:, 0] = torch.randint(0, 2 * k, (N,), generator=g)  # tokens of few examples, some in the top
    grp = torch.randint(0, n + 1, (N * per_row,), generator=g)
    v = torch.randint(-3, 5, (N * per_row,), generator=g).float()
    v[::29], v[1::31], v[2::37], v[5:6] = -math.inf, -0.0, 0.0, math.nan
    from mmsae.analysis.stats_ops import group_then_descending

    order = group_then_descending(grp, v, n + 1)
    return top_v, top_meta, grp[order], v[order], order // per_row, meta


@pytest.mark.parametrize("distinct", [False, True])
@pytest.mark.parametrize(("k", "n", "N", "per_row"), [(16, 40, 300, 8), (3, 70, 200, 4), (5, 9, 150, 6)])
def test_merge_sorted_top_matches_brute_force(k: int, n: int, N: int, per_row: int, distinct: bool) -> None:
    """The Triton merge and the torch reference against a one-feature-at-a-time merge: runs longer than
    one window (N·per_row / n entries per feature, up to ~60), ties, NaN, ±0 and examples held twice."""
    case = _merge_case(k, n, N, per_row, seed=k + n)
    want_v, want_meta = _brute_merge(*case, distinct)
    for merge in (reference.merge_sorted_top_, triton_stats.merge_sorted_top_):
        top_v, top_meta, *rest = [t.clone().to(DEVICE) for t in case]
        merge(top_v, top_meta, *rest, distinct)
        torch.testing.assert_close(top_v.cpu(), want_v, equal_nan=True, msg=merge.__module__)
        assert torch.equal(top_meta.cpu(), want_meta), merge.__module__


def test_merge_sorted_top_takes_no_entries() -> None:
    case = _merge_case(4, 10, 0, 1, seed=0)
    for merge in (reference.merge_sorted_top_, triton_stats.merge_sorted_top_):
        top_v, top_meta, *rest = [t.clone().to(DEVICE) for t in case]
        merge(top_v, top_meta, *rest, True)
        assert torch.equal(top_v.cpu(), case[0]) and torch.equal(top_meta.cpu(), case[1])
