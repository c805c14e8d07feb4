"""LLaVA steering end to end on a tiny random-init LlavaForConditionalGeneration."""

from __future__ import annotations

import pytest
from PIL import Image
from skimage import data

import mmsae
from mmsae.encoders.registry import get_encoder
from mmsae.intervene.edits import Set
from mmsae.intervene.steer import steer_llava

PROMPT = "Describe the image."


@pytest.fixture(scope="module")
def llava():
    return get_encoder("llava:tiny")


@pytest.fixture(scope="module")
def images():
    return [Image.fromarray(data.chelsea())]


def test_set_feature_high_on_all_image_tokens_changes_generation(llava, images):
    hook = llava.default_hook  # the vision-tower layer LLaVA reads
    d = llava.activations((images, PROMPT), [hook])[hook].acts_ND.shape[1]
    sae = mmsae.build_sae("topk", d, 64, k=4, hook=hook, encoder=llava.id)
    result = steer_llava(llava, sae, images, PROMPT, [Set(3, 100.0)], max_new_tokens=8)
    assert result.after != result.before
    assert llava.generate(images, PROMPT, max_new_tokens=8) == result.before  # hooks gone, model restored


def test_llava_sae_from_another_layer_is_refused(llava, images):
    sae = mmsae.build_sae("topk", 16, 64, k=4, hook="model.vision_tower.encoder.layers.0", encoder=llava.id)
    with pytest.raises(ValueError, match="trained on hook"):
        steer_llava(llava, sae, images, PROMPT, [Set(3, 100.0)], hook=llava.default_hook)
