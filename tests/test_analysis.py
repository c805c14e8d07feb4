"""Feature statistics pass, monosemanticity score and dashboards."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from mmsae.analysis import (
    FeatureStats,
    MonosemanticityAccumulator,
    StatsConfig,
    feature_stats,
    monosemanticity,
    monosemanticity_pairwise,
)
from mmsae.analysis.dashboard import feature_dashboard, summary_report
from mmsae.analysis.images import pooled_codes
from mmsae.encoders.base import TokenActs
from mmsae.sae import build_sae

D, N_LAT, K = 16, 32, 4


def _batches(
    n_batches: int = 5, examples: int = 6, tokens: int = 4, timesteps: bool = False
) -> list[TokenActs]:
    g = torch.Generator().manual_seed(1)
    out = []
    for b in range(n_batches):
        meta = {
            "example_id": torch.arange(b * examples, (b + 1) * examples).repeat_interleave(tokens),
            "token_index": torch.arange(tokens).repeat(examples),
        }
        if timesteps:
            meta["timestep"] = torch.randint(0, 1000, (examples * tokens,), generator=g)
        out.append(TokenActs(torch.randn(examples * tokens, D, generator=g), meta))
    return out


def _brute_force_top(batches: list[TokenActs], codes: torch.Tensor, k: int):
    """Per-example max over tokens, then top-k examples per feature, with the arg-max token (and timestep)."""
    ids = torch.cat([b.meta["example_id"] for b in batches])
    n_ex = int(ids.max()) + 1
    vals = codes.masked_fill(codes == 0, -math.inf)
    ex = torch.full((n_ex, codes.shape[1]), -math.inf).scatter_reduce(
        0, ids[:, None].expand_as(vals), vals, "amax"
    )
    top_v, top_i = ex.topk(k, dim=0)
    return ids, top_v, top_i


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(
                not torch.cuda.is_available(),
                reason="needs CUDA; CPU twin: test_stats_match_brute_force[cpu]",
            ),
        ),
    ],
)
def test_stats_match_brute_force(device: str) -> None:
    sae = build_sae("topk", D, N_LAT, k=K).to(device)
    batches = _batches(timesteps=True)
    # chunk_tokens=10 splits examples (4 tokens each) across chunks: the dedup path must hold.
    stats = feature_stats(sae, batches, StatsConfig(top_k=3, chunk_tokens=10))
    x = torch.cat([b.acts_ND for b in batches]).to(device)
    with torch.no_grad():
        out = sae(x)
    codes, x_hat = out.codes.dense().cpu(), out.x_hat.cpu()
    x = x.cpu()

    torch.testing.assert_close(stats.frequency, (codes != 0).float().mean(0))
    fired = (codes != 0).sum(0)
    torch.testing.assert_close(stats.mean_activation, codes.sum(0) / fired.clamp_min(1))
    torch.testing.assert_close(stats.max_activation, torch.where(fired > 0, codes.max(0).values, 0.0))
    assert stats.l0 == pytest.approx(K)
    fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert stats.fvu == pytest.approx(fvu.item(), rel=1e-5)

    ids, top_v, top_i = _brute_force_top(batches, codes, 3)
    ts = torch.cat([b.meta["timestep"] for b in batches])
    tok = torch.cat([b.meta["token_index"] for b in batches])
    for j in range(N_LAT):
        ex = stats.top_examples(j)
        live = top_v[:, j] > -math.inf
        np.testing.assert_allclose(ex.values, top_v[live, j].numpy(), rtol=1e-6)
        assert ex.example_ids.tolist() == top_i[live, j].tolist()
        for e, t, step in zip(ex.example_ids, ex.token_index, ex.timestep):
            row = (ids == e).nonzero().flatten()
            best = row[codes[row, j].argmax()]
            assert (t, step) == (tok[best].item(), ts[best].item())
    hist_counts = torch.stack([torch.from_numpy(stats.activation_histogram(j)[0]) for j in range(N_LAT)])
    torch.testing.assert_close(hist_counts.sum(1), fired.double())


def test_stats_resume_after_interruption(tmp_path) -> None:
    sae = build_sae("topk", D, N_LAT, k=K)
    batches = _batches(n_batches=6)
    ckpt = tmp_path / "stats.safetensors"

    def interrupted():
        yield from batches[:4]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        feature_stats(sae, interrupted(), StatsConfig(top_k=3), checkpoint=ckpt, checkpoint_every=2)
    assert FeatureStats.load(ckpt).n_batches == 4
    resumed = feature_stats(sae, batches, StatsConfig(top_k=3), checkpoint=ckpt, checkpoint_every=2)
    full = feature_stats(sae, batches, StatsConfig(top_k=3))
    assert resumed.n_tokens == full.n_tokens == 6 * 24
    for name in ("fire_count", "act_sum", "act_max", "hist", "top_values", "top_ids", "top_tokens"):
        torch.testing.assert_close(getattr(resumed, name), getattr(full, name), msg=name)
    assert resumed.fvu == pytest.approx(full.fvu)

    other = build_sae("topk", D, 2 * N_LAT, k=K)
    with pytest.raises(ValueError, match="delete it or pass another checkpoint"):
        feature_stats(other, batches, checkpoint=ckpt)


def test_stats_plain_tensors_and_density_histogram() -> None:
    sae = build_sae("topk", D, N_LAT, k=K)
    with torch.no_grad():
        sae.b_enc[:4] = -100.0  # four features that can never fire
    stats = feature_stats(sae, [torch.randn(50, D), torch.randn(30, D)])
    counts, edges, n_dead = stats.density_histogram(bins=10)
    assert n_dead == int(stats.dead.sum()) >= 4
    assert counts.sum() + n_dead == N_LAT
    assert edges[0] <= math.log10(1 / 80) and edges[-1] == 0
    # plain tensors: every token is its own example, numbered across batches
    assert stats.top_ids.max() < 80 and stats.top_ids.max() >= 50
    with pytest.raises(TypeError, match="TokenActs or an"):
        feature_stats(sae, [torch.randn(2, 3, D)])


def test_monosemanticity_linear_matches_pairwise() -> None:
    g = torch.Generator().manual_seed(3)
    n_img, n_lat, e = 40, 12, 8
    acts = torch.rand(n_img, n_lat, generator=g) * (torch.rand(n_img, n_lat, generator=g) < 0.4)
    acts[:, 0] = 0  # dead feature: undefined
    acts[:, 1] = 0
    acts[5, 1] = 2.0  # fires on one image only: no pairs, undefined
    acts[:, 2] += 0.5  # min > 0: the min-max normalisation matters
    emb = torch.randn(n_img, e, generator=g)
    emb = emb / emb.norm(dim=-1, keepdim=True)
    acc = MonosemanticityAccumulator(n_lat, e)
    for s in range(0, n_img, 7):  # streamed in uneven batches
        acc.update(acts[s : s + 7], emb[s : s + 7])
    fast, slow = acc.compute(), monosemanticity_pairwise(acts, emb)
    assert fast[:2].isnan().all() and slow[:2].isnan().all()
    torch.testing.assert_close(fast[2:], slow[2:], rtol=1e-4, atol=1e-5)
    # identical embeddings ⇒ every live feature scores exactly 1
    acc1 = MonosemanticityAccumulator(n_lat, e)
    acc1.update(acts, emb[:1].expand(n_img, -1))
    torch.testing.assert_close(acc1.compute()[2:], torch.ones(n_lat - 2))


@pytest.fixture(scope="module")
def photos():
    import skimage.data as skimage  # a dev dependency: missing it must fail, not skip

    return [
        Image.fromarray(getattr(skimage, n)()).convert("RGB")
        for n in ("astronaut", "camera", "chelsea", "coffee", "rocket", "coins")
    ]


@pytest.fixture(scope="module")
def vit_and_clip():
    from mmsae.encoders import get_encoder

    torch.manual_seed(0)
    return get_encoder("timm:test_vit"), get_encoder("clip:tiny")


def test_monosemanticity_end_to_end(photos, vit_and_clip) -> None:
    vit, clip = vit_and_clip
    sae = build_sae("topk", 64, 48, k=8, hook="blocks.4")
    scores = monosemanticity(vit, sae, clip, photos, batch_size=4)
    acts = vit.activations(torch.stack([vit.transform(p) for p in photos]), ["blocks.4"])["blocks.4"]
    image_acts = pooled_codes(sae, acts, len(photos), "max")
    emb = clip.encode_image(torch.stack([clip.transform(p) for p in photos]))
    expected = monosemanticity_pairwise(image_acts, emb)
    assert scores.shape == (48,)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5, equal_nan=True)
    assert (~scores.isnan()).any()


def test_dashboard_and_summary(tmp_path, photos, vit_and_clip) -> None:
    from mmsae.analysis import NameCandidate
    from mmsae.analysis.images import token_acts

    vit, _ = vit_and_clip
    sae = build_sae("topk", 64, 48, k=8, hook="blocks.4")
    stats = feature_stats(
        sae, token_acts(vit, photos, "blocks.4", tokens="patch", batch_size=3), StatsConfig(top_k=4)
    )
    feature = int(stats.fire_count.argmax())
    png, page = feature_dashboard(
        feature, stats, photos, tmp_path, names=[NameCandidate("cat", 0.3)], sae=sae, encoder=vit
    )
    assert Image.open(png).size[0] > 200
    text = page.read_text()
    assert "cat (0.30)" in text and "data:image/png;base64," in text
    assert str(stats.top_examples(feature).example_ids[0]) in text
    with pytest.raises(ValueError, match="collection the stats were computed on"):
        feature_dashboard(feature, stats, photos[:1], tmp_path)

    other = feature_stats(build_sae("topk", 64, 48, k=2), token_acts(vit, photos, "blocks.4", batch_size=3))
    png, page = summary_report({"k=8": stats, "k=2": other}, tmp_path)
    assert Image.open(png).format == "PNG"
    assert "FVU" in page.read_text() and "k=2" in page.read_text()
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes left no temp files
