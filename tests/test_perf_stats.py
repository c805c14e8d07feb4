"""The feature-statistics pass on its fast path: same results as a brute-force pass, no device waits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmsae.analysis import FeatureStats, StatsConfig, feature_stats
from mmsae.encoders.base import TokenActs
from mmsae.sae import build_sae

D, N_LAT = 12, 24


def _shuffled_batches(n_batches: int = 4, tokens: int = 30, n_examples: int = 9) -> list[TokenActs]:
    """Example ids in no particular order, repeated within and across batches (tokens of one example
    are not contiguous), with timesteps."""
    g = torch.Generator().manual_seed(7)
    return [
        TokenActs(
            torch.randn(tokens, D, generator=g),
            {
                "example_id": torch.randint(0, n_examples, (tokens,), generator=g) * 10 + 3,
                "token_index": torch.randperm(tokens, generator=g),
                "timestep": torch.randint(0, 1000, (tokens,), generator=g),
            },
        )
        for _ in range(n_batches)
    ]


def _reference(batches: list[TokenActs], dense_NL: torch.Tensor, k: int):
    """Brute force, one latent at a time: per example its largest activation and the token attaining it,
    then the k best examples."""
    ids = torch.cat([b.meta["example_id"] for b in batches])
    tok = torch.cat([b.meta["token_index"] for b in batches])
    ts = torch.cat([b.meta["timestep"] for b in batches])
    out = []
    for j in range(dense_NL.shape[1]):
        best: dict[int, tuple[float, int, int]] = {}
        for r in (dense_NL[:, j] != 0).nonzero().flatten().tolist():
            v = float(dense_NL[r, j])
            e = int(ids[r])
            if e not in best or v > best[e][0]:
                best[e] = (v, int(tok[r]), int(ts[r]))
        ranked = sorted(best.items(), key=lambda item: -item[1][0])[:k]
        out.append(ranked)
    return out


@pytest.mark.parametrize("arch,kwargs", [("topk", {"k": 3}), ("abstopk", {"k": 3}), ("relu", {})])
@pytest.mark.parametrize("chunk", [7, 1000])
def test_stats_equal_the_brute_force_reference(arch: str, kwargs: dict, chunk: int) -> None:
    torch.manual_seed(0)
    sae = build_sae(arch, D, N_LAT, **kwargs)
    batches = _shuffled_batches()
    stats = feature_stats(sae, batches, StatsConfig(top_k=4, chunk_tokens=chunk))
    x = torch.cat([b.acts_ND for b in batches])
    with torch.no_grad():
        out = sae(x)
    dense = out.codes.dense() if hasattr(out.codes, "dense") else out.codes
    fired = (dense != 0).sum(0)
    torch.testing.assert_close(stats.frequency, fired.float() / len(x))
    torch.testing.assert_close(stats.mean_activation, dense.sum(0) / fired.clamp_min(1))
    signed_max = dense.masked_fill(dense == 0, -math.inf).max(0).values
    torch.testing.assert_close(stats.max_activation, torch.where(fired > 0, signed_max, 0.0))
    assert stats.l0 == pytest.approx(float(fired.sum()) / len(x))
    hist = torch.stack([torch.from_numpy(stats.activation_histogram(j)[0]) for j in range(N_LAT)])
    torch.testing.assert_close(hist.sum(1), fired.double())
    for j, ranked in enumerate(_reference(batches, dense, 4)):
        ex = stats.top_examples(j)
        assert ex.example_ids.tolist() == [e for e, _ in ranked], j
        np.testing.assert_allclose(ex.values, [v for _, (v, _, _) in ranked], rtol=1e-6)
        assert ex.token_index.tolist() == [t for _, (_, t, _) in ranked]
        assert ex.timestep.tolist() == [s for _, (_, _, s) in ranked]


def test_chunk_default_follows_the_device() -> None:
    assert StatsConfig().chunk_for(torch.device("cuda")) == 16384
    assert StatsConfig().chunk_for(torch.device("cpu")) == 2048
    assert StatsConfig(chunk_tokens=100).chunk_for(torch.device("cuda")) == 100
    with pytest.raises(ValueError, match="chunk_tokens must be >= 1"):
        StatsConfig(chunk_tokens=0).chunk_for(torch.device("cpu"))


def test_stats_from_inference_mode_can_be_updated_and_reloaded(tmp_path) -> None:
    """`feature_stats` runs under inference_mode; its result stays updatable outside it, and saved."""
    sae = build_sae("topk", D, N_LAT, k=3)
    batches = _shuffled_batches()
    stats = feature_stats(sae, batches[:2], StatsConfig(top_k=4))
    x = batches[2].acts_ND
    with torch.no_grad():
        out = sae(x)
    stats.update(x, out.x_hat, out.codes, batches[2].meta["example_id"], batches[2].meta["token_index"])
    stats.save(tmp_path / "s.safetensors")
    assert FeatureStats.load(tmp_path / "s.safetensors").n_tokens == 60 + len(x)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs CUDA; CPU twin: test_stats_equal_the_brute_force_reference",
)
def test_stats_update_never_waits_for_the_device() -> None:
    sae = build_sae("topk", 64, 512, k=8).cuda().bfloat16()
    x = torch.randn(4096, 64, device="cuda", dtype=torch.bfloat16)
    meta = {
        "example_id": torch.arange(4096, device="cuda") // 4,
        "token_index": torch.arange(4096, device="cuda") % 4,
    }
    stats = FeatureStats(512, 64, StatsConfig(top_k=8), device="cuda")
    with torch.inference_mode():
        out = sae(x)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            stats.update(x, out.x_hat, out.codes, meta["example_id"], meta["token_index"])
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_one_key_sort_orders_like_two_stable_sorts() -> None:
    """The int64 key (group, descending value bits) orders signed values, −inf and ±0 as floats do."""
    from mmsae.analysis.stats import _group_then_descending

    g = torch.Generator().manual_seed(3)
    val = torch.randn(500, generator=g) * 100
    val[::7] = -math.inf
    val[1::11] = -0.0
    val[2::13] = 0.0
    group = torch.randint(0, 40, (500,), generator=g)
    fast = _group_then_descending(group, val, 40)
    slow = _group_then_descending(group, val, 2**31)  # the two-sort path
    assert torch.equal(group[fast], group[slow])
    assert torch.equal(val[fast], val[slow])
    assert (group[fast][1:] >= group[fast][:-1]).all()


def test_a_chunk_where_nothing_fires_changes_only_the_token_count() -> None:
    stats = FeatureStats(N_LAT, D, StatsConfig(top_k=2))
    x = torch.randn(5, D)
    stats.update(x, x, torch.zeros(5, N_LAT), torch.arange(5), torch.zeros(5, dtype=torch.long))
    assert stats.n_tokens == 5 and stats.dead.all() and stats.l0 == 0
    assert stats.top_examples(0).example_ids.size == 0
