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
    """Brute force, one feature at a time: per example its largest activation and the token attaining it,
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


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"top_k": 0}, "top_k"),
        ({"hist_bins": 0}, "hist_bins"),
        ({"hist_log10_range": (1.0, 1.0)}, "hist_log10_range"),
        ({"hist_log10_range": (2.0, -2.0)}, "hist_log10_range"),
        ({"hist_log10_range": (-math.inf, 4.0)}, "hist_log10_range"),
    ],
)
def test_a_config_that_cannot_work_is_refused_by_name(kwargs: dict, field: str) -> None:
    """An empty histogram range divides by zero when binning (an index error deep in the update, or a write
    outside the histogram), and zero examples or bins leave nothing to report: refused when made."""
    with pytest.raises(ValueError, match=f"StatsConfig.*{field}"):
        StatsConfig(**kwargs)


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
@pytest.mark.parametrize("tokens_are_examples", [False, True])
def test_stats_update_never_waits_for_the_device(tokens_are_examples: bool) -> None:
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
            for _ in range(2):  # the second merges with a filled running top k
                stats.update(
                    x,
                    out.x_hat,
                    out.codes,
                    meta["example_id"],
                    meta["token_index"],
                    tokens_are_examples=tokens_are_examples,
                )
        finally:
            torch.cuda.set_sync_debug_mode("default")


def _same_values(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _nans(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A NaN with the sign bit clear and one with it set (as casts and x86 arithmetic make them)."""
    bits = {torch.float32: (0x7FC00000, -0x400000, torch.int32), torch.bfloat16: (0x7FC0, -0x40, torch.int16)}
    pos, neg, int_dtype = bits[dtype]
    return tuple(torch.tensor(b, dtype=int_dtype).view(dtype) for b in (pos, neg))  # type: ignore[return-value]


def test_one_key_sort_orders_like_two_stable_sorts() -> None:
    """The int64 key (group, descending value bits) orders signed values, −inf, ±0 and NaNs of either sign
    (first, as torch's sorts place them) as floats do."""
    from mmsae.analysis.stats_ops import group_then_descending

    g = torch.Generator().manual_seed(3)
    val = torch.randn(500, generator=g) * 100
    val[::7] = -math.inf
    val[1::11] = -0.0
    val[2::13] = 0.0
    val[3::19], val[4::23] = _nans(torch.float32)
    group = torch.randint(0, 40, (500,), generator=g)
    fast = group_then_descending(group, val, 40)
    slow = group_then_descending(group, val, 2**31)  # the two-sort path
    assert torch.equal(group[fast], group[slow])
    _same_values(val[fast], val[slow])
    assert (group[fast][1:] >= group[fast][:-1]).all()


def test_a_chunk_where_nothing_fires_changes_only_the_token_count() -> None:
    stats = FeatureStats(N_LAT, D, StatsConfig(top_k=2))
    x = torch.randn(5, D)
    stats.update(x, x, torch.zeros(5, N_LAT), torch.arange(5), torch.zeros(5, dtype=torch.long))
    assert stats.n_tokens == 5 and stats.dead.all() and stats.l0 == 0
    assert stats.top_examples(0).example_ids.size == 0


def test_one_16_bit_key_sort_orders_like_two_stable_sorts() -> None:
    """bf16 values sort with a 32-bit key (group, 16 value bits) as floats do, up to 2¹⁶ groups."""
    from mmsae.analysis.stats_ops import group_then_descending

    g = torch.Generator().manual_seed(4)
    val = (torch.randn(3000, generator=g) * 100).bfloat16()
    val[::7] = -math.inf
    val[1::11] = -0.0
    val[2::13] = 0.0
    val[3::17] = math.inf
    val[4::19], val[5::23] = _nans(torch.bfloat16)
    group = torch.randint(0, 2**16, (3000,), generator=g)
    group[:50] = 2**16 - 1
    fast = group_then_descending(group, val.float(), 2**16, val)
    slow = group_then_descending(group, val.float(), 2**31)
    assert torch.equal(group[fast], group[slow])
    _same_values(val[fast], val[slow])


def test_equal_values_keep_the_order_examples_were_seen() -> None:
    """bf16 codes tie often: equal values rank the earlier token first, across chunks too (as a stable
    sort of the reference would)."""
    torch.manual_seed(1)
    sae = build_sae("topk", 16, 64, k=4).bfloat16()
    batches = [(torch.randn(50, 16) * 2 + 5).bfloat16() for _ in range(4)]
    stats = feature_stats(sae, batches, StatsConfig(top_k=5, chunk_tokens=7))
    with torch.no_grad():
        dense = sae(torch.cat(batches)).codes.dense().float()
    ties = 0
    for j in range(64):
        col = dense[:, j]
        ranked = sorted(col.nonzero().flatten().tolist(), key=lambda r: -col[r].item())[:5]
        assert stats.top_examples(j).example_ids.tolist() == ranked, j
        ties += len(set(col[ranked].tolist())) < len(ranked)
    assert ties > 0  # the case under test occurs


def _general_path(sae, batches: list[torch.Tensor], cfg: StatsConfig) -> FeatureStats:
    """Every chunk through the top-k merge's duplicate checks."""
    stats, offset = FeatureStats(sae.n_features, sae.d_in, cfg), 0
    with torch.inference_mode():
        for b in batches:
            for s in range(0, len(b), cfg.chunk_tokens):
                x = b[s : s + cfg.chunk_tokens]
                out = sae(x)
                ids = torch.arange(offset + s, offset + s + len(x))
                stats.update(x, out.x_hat, out.codes, ids, torch.full_like(ids, -1))
            offset += len(b)
    return stats


def test_one_token_per_example_skips_the_example_merge_with_the_same_result() -> None:
    """[N, D] tensors (one example per token) and TokenActs with host-side, strictly increasing example ids
    (an activation store of tokens="cls") take the path without duplicate checks: the results of the general
    path."""
    torch.manual_seed(2)
    sae = build_sae("abstopk", D, N_LAT, k=3).bfloat16()
    plain = [torch.randn(30, D).bfloat16() for _ in range(3)]
    acts = [
        TokenActs(b, {"example_id": torch.arange(30 * i, 30 * i + 30), "token_index": torch.full((30,), -1)})
        for i, b in enumerate(plain)
    ]
    cfg = StatsConfig(top_k=4, chunk_tokens=8)
    fast, cls_store = feature_stats(sae, plain, cfg), feature_stats(sae, acts, cfg)
    full = _general_path(sae, plain, cfg)
    assert not fast.split_examples and not cls_store.split_examples and full.split_examples
    for name in FeatureStats._TENSORS:
        assert torch.equal(getattr(fast, name), getattr(full, name)), name
        assert torch.equal(getattr(cls_store, name), getattr(full, name)), name


@pytest.mark.parametrize(
    "ids",
    [
        [[0, 1, 2], [2, 3, 4]],  # an example split across batches
        [[0, 2, 1], [3, 4, 5]],  # not in order
        [[0, 1, 1], [2, 3, 4]],  # two tokens of one example
    ],
)
def test_other_example_orders_take_the_general_path(ids: list[list[int]]) -> None:
    sae = build_sae("topk", D, N_LAT, k=3)
    batches = [
        TokenActs(torch.randn(3, D), {"example_id": torch.tensor(b), "token_index": torch.zeros(3)})
        for b in ids
    ]
    assert feature_stats(sae, batches, StatsConfig(top_k=2)).split_examples


def _fvu64(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    x64 = x.double()
    return float((x64 - x_hat.double()).pow(2).sum() / (x64 - x64.mean(0)).pow(2).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fvu_matches_float64_on_inputs_with_a_large_mean(dtype: torch.dtype) -> None:
    """Float32 chunk sums shifted by the first chunk's mean: the FVU agrees with a float64 computation
    where the mean is 300 standard deviations (unshifted float32 sums of squares would cancel)."""
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(3000, 32, generator=g) + 300 * torch.randn(32, generator=g).sign()).to(dtype)
    x_hat = (x.float() + 0.3 * torch.randn(3000, 32, generator=g)).to(dtype)
    stats = FeatureStats(N_LAT, 32)
    codes = torch.zeros(3000, N_LAT)
    for s in range(0, 3000, 512):
        stats.update(
            x[s : s + 512], x_hat[s : s + 512], codes[s : s + 512], torch.arange(512), torch.arange(512)
        )
    assert stats.fvu == pytest.approx(_fvu64(x, x_hat), rel=1e-5)


def test_files_without_a_shift_hold_plain_sums(tmp_path) -> None:
    """Stats files written before the shift (x_sum = Σx, x_sq = Σ‖x‖²) load as a zero shift and keep
    accumulating correctly."""
    from safetensors.torch import load_file, save_file

    x, x_hat = torch.randn(40, D) + 3, torch.randn(40, D) + 3
    codes = torch.zeros(40, N_LAT)
    stats = FeatureStats(N_LAT, D)
    stats.update(x[:20], x_hat[:20], codes[:20], torch.arange(20), torch.arange(20))
    path = tmp_path / "s.safetensors"
    stats.save(path)
    tensors = load_file(path)
    shift = tensors.pop("x_shift").double()
    tensors["x_sq"] += 2 * shift @ tensors["x_sum"] + 20 * shift @ shift  # the unshifted sums
    tensors["x_sum"] += 20 * shift
    meta = dict(stats.state()[1])
    del meta["split_examples"]
    save_file(tensors, path, metadata=meta)
    old = FeatureStats.load(path)
    assert old.split_examples and torch.equal(old.x_shift, torch.zeros(D))
    old.update(x[20:], x_hat[20:], codes[20:], torch.arange(20), torch.arange(20))
    assert old.fvu == pytest.approx(_fvu64(x, x_hat), rel=1e-6)
