"""OpenCLIP adapter on the bundled tiny config (real open_clip classes, random init)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from skimage import data

from mmsae.encoders import get_encoder
from mmsae.encoders.clip import ClipEncoder

TEXTS = ["a photo of a cat", "a dog"]


@pytest.fixture(scope="module")
def enc() -> ClipEncoder:
    return get_encoder("clip:tiny")


def test_hook_names_and_dims(enc: ClipEncoder) -> None:
    assert enc.hook_points() == [
        "visual.transformer.resblocks.0",
        "visual.transformer.resblocks.1",
        "visual",
        "transformer.resblocks.0",
        "transformer.resblocks.1",
        "ln_final",
    ]
    assert enc.embed_dim == 32 and enc.default_hook == "visual.transformer.resblocks.0"
    assert enc.model.visual.transformer.batch_first  # open_clip 3.3: blocks see [B, T, D]


def test_image_tower_tokens_and_pooled_embedding(enc: ClipEncoder) -> None:
    image = Image.fromarray(data.astronaut())
    pixels = torch.stack([enc.transform(image), enc.transform(image.convert("L"))])
    acts = enc.activations(pixels, ["visual.transformer.resblocks.1", "visual"])
    assert acts["visual.transformer.resblocks.1"].acts_ND.shape == (2 * 17, 32)  # CLS + (32/8)² patches
    emb = acts["visual"]
    assert emb.acts_ND.shape == (2, 32) and emb.meta["token_index"].tolist() == [-1, -1]
    torch.testing.assert_close(emb.acts_ND, enc.encode_image(pixels, normalize=False), rtol=0, atol=0)
    torch.testing.assert_close(enc.encode_image(pixels).norm(dim=-1), torch.ones(2))
    cls = enc.activations(pixels, ["visual.transformer.resblocks.1"], tokens="pooled")  # CLIP pools CLS
    assert cls["visual.transformer.resblocks.1"].meta["token_index"].tolist() == [0, 0]
    with pytest.raises(ValueError, match="pooled embedding"):
        enc.activations(pixels, ["visual"], tokens="patch")


def test_text_tower(enc: ClipEncoder) -> None:
    acts = enc.activations(TEXTS, ["transformer.resblocks.1", "ln_final"], tokens="pooled")
    # EOT positions: "a photo of a cat" → SOT + 5 words, then EOT at 6; "a dog" → EOT at 3
    assert acts["ln_final"].meta["token_index"].tolist() == [6, 3]
    projected = acts["ln_final"].acts_ND @ enc.model.text_projection
    torch.testing.assert_close(projected, enc.encode_text(TEXTS, normalize=False))
    every = enc.activations(TEXTS, ["transformer.resblocks.0"])["transformer.resblocks.0"]
    assert every.acts_ND.shape == (2 * 16, 32)  # context length of the tiny config
    with pytest.raises(ValueError, match="no CLS token"):
        enc.activations(TEXTS, ["transformer.resblocks.0"], tokens="cls")
    with torch.no_grad(), enc.edit("transformer.resblocks.0", torch.zeros_like):
        assert not torch.allclose(enc.encode_text(TEXTS), enc.encode_text(TEXTS[::-1])[[1, 0]] + 1)


def test_text_hook_with_image_batch_is_an_error(enc: ClipEncoder) -> None:
    with pytest.raises(RuntimeError, match="never ran"):
        enc.activations(torch.randn(1, 3, 32, 32), ["transformer.resblocks.0"])


def test_bad_image_size(enc: ClipEncoder) -> None:
    with pytest.raises(ValueError, match="32×32"):
        enc.encode_image(torch.randn(1, 3, 224, 224))


def test_weights_need_a_tag_or_local_file() -> None:
    with pytest.raises(ValueError, match="openai"):
        get_encoder("clip:ViT-B-32")
    with pytest.raises(RuntimeError, match="pretrained=False"):
        get_encoder("clip:ViT-B-32/openai")
