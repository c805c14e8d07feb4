"""CLIP/timm steering and spliced fidelity on tiny random-init real models, with real photos."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from skimage import data

import mmsae
from mmsae.encoders.registry import get_encoder
from mmsae.intervene.edits import Direction, Set, SetMax
from mmsae.intervene.fidelity import image_fidelity, image_similarity
from mmsae.intervene.steer import max_activations, steer_image, to_pixels

LABELS = ["cat", "rocket", "coffee"]


@pytest.fixture(scope="module")
def clip():
    return get_encoder("clip:tiny")


@pytest.fixture(scope="module")
def photos():
    return [Image.fromarray(im) for im in (data.chelsea(), data.astronaut(), data.coffee())]


def concept_sae(clip, concept: str):
    """An SAE on the pooled embedding whose feature 0 decodes to the text embedding of `concept`."""
    sae = mmsae.build_sae("topk", clip.embed_dim, 16, k=4, hook="visual", encoder=clip.id)
    with torch.no_grad():
        sae.W_dec[0] = clip.encode_text([f"a photo of a {concept}."], normalize=True)[0]
    return sae


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_zero_shot_labels_shift_toward_and_away_from_a_concept(clip, photos, sign):
    sae = concept_sae(clip, "rocket")
    norm = clip.encode_image(to_pixels(clip, photos), normalize=False).norm(dim=-1).mean()
    result = steer_image(clip, sae, photos, [Direction(0, sign * 2 * float(norm))], labels=LABELS)
    # Every image embedding turns toward (away from) the concept's text embedding ...
    concept_E = clip.encode_text(["a photo of a rocket."], normalize=True)[0]
    turn_B = (result.after_BE - result.before_BE) @ concept_E
    assert (sign * turn_B > 0.05).all()
    # ... and the zero-shot label follows. Random tiny text embeddings are correlated, so "rocket" is the
    # label gaining most when steering toward it; steering away it must lose, not necessarily the most.
    shift = result.label_shift()
    assert sign * shift["rocket"] > 0.01
    if sign > 0:
        assert max(shift, key=shift.__getitem__) == "rocket"
    assert result.probs_after_BL.shape == (3, 3)
    torch.testing.assert_close(result.probs_after_BL.sum(-1), torch.ones(3))


def test_set_edit_on_residual_stream_changes_embedding(clip, photos):
    sae = mmsae.build_sae("topk", 32, 64, k=4, hook="visual.transformer.resblocks.1", encoder=clip.id)
    result = steer_image(clip, sae, photos, [Set(5, 50.0)])
    assert (result.cosine_B < 0.99).all()
    with pytest.raises(ValueError, match="No labels"):
        result.label_shift()


def test_set_max_uses_observed_maximum(clip, photos):
    sae = mmsae.build_sae("topk", 32, 64, k=4, hook="visual.transformer.resblocks.1", encoder=clip.id)
    pixels = to_pixels(clip, photos)
    max_n = max_activations(clip, sae, [pixels[:2], pixels[2:]])
    codes = sae.encode(clip.activations(pixels, [sae.cfg.hook])[sae.cfg.hook].acts_ND)
    assert torch.allclose(max_n, codes.dense().amax(0).clamp_min(0))
    feature = int(max_n.argmax())
    result = steer_image(clip, sae, pixels, [SetMax(feature, 5.0)], max_acts=max_n)
    assert (result.cosine_B < 0.999).all()


def test_spliced_fidelity_exact_sae_keeps_everything(clip, photos):
    from test_intervene import exact_sae  # tests/ is on sys.path (rootdir-less test modules)

    perfect = image_fidelity(
        clip,
        exact_sae(32, "visual.transformer.resblocks.0", clip.id),
        photos,
        labels=LABELS,
        targets=torch.tensor([0, 1, 2]),
    )
    assert perfect.embedding_cosine == pytest.approx(1.0, abs=1e-5)
    assert perfect.agreement == 1.0
    assert perfect.accuracy_spliced == perfect.accuracy_original
    lossy = mmsae.build_sae("topk", 32, 64, k=1, hook="visual.transformer.resblocks.0", encoder=clip.id)
    assert image_fidelity(clip, lossy, photos).embedding_cosine < 0.999


def test_fidelity_on_timm_logits(photos):
    vit = get_encoder("timm:test_vit")
    sae = mmsae.build_sae("topk", 64, 128, k=2, hook="blocks.5", encoder=vit.id)
    result = image_fidelity(vit, sae, photos, targets=torch.tensor([1, 2, 3]))
    assert 0.0 <= result.agreement <= 1.0 and result.embedding_cosine < 0.9999
    assert result.accuracy_original is not None


def test_image_similarity(clip, photos):
    same = image_similarity(photos, photos)
    torch.testing.assert_close(same, torch.ones(3))
    assert (image_similarity(photos, photos[::-1])[[0, 2]] < 1).all()
    torch.testing.assert_close(
        image_similarity(photos, photos, encoder=clip), torch.ones(3), atol=1e-5, rtol=0
    )
    with pytest.raises(ValueError, match="equally many"):
        image_similarity(photos, photos[:2])
