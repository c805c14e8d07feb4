"""Concept naming: vocabulary files, atom route (SAE on CLIP's final embedding), top-image route."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mmsae.analysis import StatsConfig, feature_stats, load_vocabulary, name_features
from mmsae.analysis.images import token_acts
from mmsae.analysis.naming import DEFAULT_VOCAB, image_concept_vectors, rank_names, text_embeddings
from mmsae.sae import build_sae

WORDS = ["dog", "cat", "red car", "snowy mountain", "bowl of soup", "violin"]


@pytest.fixture(scope="module")
def clip():
    from mmsae.encoders import get_encoder

    torch.manual_seed(0)
    return get_encoder("clip:tiny")


def test_default_vocabulary_ships_with_package() -> None:
    vocab = load_vocabulary()
    assert DEFAULT_VOCAB.name == "vocab.txt" and len(vocab) > 150
    assert "dog" in vocab and not any(w.startswith("#") or not w for w in vocab)
    assert len(vocab) == len(set(vocab))


def test_user_vocabulary(tmp_path) -> None:
    path = tmp_path / "v.txt"
    path.write_text("# mine\nzebra\n\n  okapi \nzebra\n")
    assert load_vocabulary(path) == ["zebra", "okapi"]
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="one concept per line"):
        load_vocabulary(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_vocabulary(tmp_path / "missing.txt")


def test_atoms_on_final_embedding_get_their_words(clip) -> None:
    """An SAE on hook 'visual' whose atoms are (rescaled) text embeddings must be named by those texts."""
    sae = build_sae("topk", clip.embed_dim, len(WORDS), k=2, hook="visual", encoder=clip.id)
    text = text_embeddings(clip, WORDS)
    with torch.no_grad():
        sae.W_dec.copy_(3.0 * text[[1, 0, 3, 2, 5, 4]])  # a permutation, and norms ≠ 1
    names = name_features(clip, sae, vocab=WORDS, top=2)
    assert [n[0].name for n in names] == [WORDS[i] for i in (1, 0, 3, 2, 5, 4)]
    assert all(n[0].score == pytest.approx(1.0, abs=1e-5) and n[0].score >= n[1].score for n in names)


def test_inner_hook_is_named_through_top_images(clip) -> None:
    import skimage.data as skimage  # a dev dependency: missing it must fail, not skip

    photos = [Image.fromarray(getattr(skimage, n)()) for n in ("astronaut", "chelsea", "coffee", "rocket")]
    hook = "visual.transformer.resblocks.1"
    sae = build_sae("topk", 32, 16, k=4, hook=hook, encoder=clip.id)
    with pytest.raises(ValueError, match="pass the FeatureStats"):
        name_features(clip, sae, vocab=WORDS)
    stats = feature_stats(sae, token_acts(clip, photos, hook, batch_size=2), StatsConfig(top_k=2))
    names = name_features(clip, sae, vocab=WORDS, stats=stats, images=photos, top=3)
    assert len(names) == 16
    for j, cands in enumerate(names):
        assert (len(cands) == 3) == (not bool(stats.dead[j]))
    with pytest.raises(ValueError, match="only 1 images were given"):
        name_features(clip, sae, vocab=WORDS, stats=stats, images=photos[:1])


def test_image_concept_vectors_weighting() -> None:
    emb = torch.eye(3)
    values = torch.tensor([[3.0, 1.0], [1.0, 0.0]])  # [K=2, n=2]
    ids = torch.tensor([[0, 2], [1, -1]])
    v = image_concept_vectors(values, ids, emb)
    torch.testing.assert_close(v[0], torch.tensor([3.0, 1.0, 0.0]) / 10**0.5)
    torch.testing.assert_close(v[1], torch.tensor([0.0, 0.0, 1.0]))
    assert rank_names(torch.zeros(1, 3), emb, ["a", "b", "c"]) == [[]]  # dead feature: no names


def test_text_tower_required() -> None:
    from mmsae.encoders import get_encoder

    vit = get_encoder("timm:test_vit")
    with pytest.raises(TypeError, match="CLIP encoder"):
        text_embeddings(vit, ["dog"])
