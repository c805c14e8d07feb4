"""LLaVA adapter: tiny random-init LlavaForConditionalGeneration (CLIP vision + Llama), offline processor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmsae.encoders import get_encoder
from mmsae.encoders.llava import LlavaEncoder

VISION = "model.vision_tower.encoder.layers"
LLM = "model.language_model.layers"


@pytest.fixture(scope="module")
def enc() -> LlavaEncoder:
    return get_encoder("llava:tiny")


@pytest.fixture(scope="module")
def batch() -> tuple[list[Image.Image], list[str]]:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)) for _ in range(2)]
    return images, ["what is in the picture?", "<image> describe it"]


def test_hooks_and_default_is_the_layer_llava_reads(enc: LlavaEncoder, batch: tuple) -> None:
    assert enc.hook_points() == [f"{VISION}.0", f"{VISION}.1", f"{VISION}.2", "model.multi_modal_projector",
                                 f"{LLM}.0", f"{LLM}.1"]
    assert enc.default_hook == f"{VISION}.1"  # hidden_states[-2] of a 3-layer tower
    acts = enc.activations(batch, [enc.default_hook])[enc.default_hook]
    pixels = torch.stack([enc.transform(im) for im in batch[0]])
    with torch.no_grad():
        hidden = enc.model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    torch.testing.assert_close(acts.acts_ND, hidden[-2].reshape(-1, 16), rtol=0, atol=0)
    patch = enc.activations(batch, [enc.default_hook], tokens="patch")[enc.default_hook]
    assert patch.acts_ND.shape == (2 * 16, 16)  # what the "default" strategy feeds the projector


def test_llm_layers_image_tokens(enc: LlavaEncoder, batch: tuple) -> None:
    hook = f"{LLM}.0"
    every = enc.activations(batch, [hook, "model.multi_modal_projector"])
    image = enc.activations(batch, [hook], tokens="image")[hook]
    assert image.acts_ND.shape == (2 * 16, 16)
    assert every["model.multi_modal_projector"].acts_ND.shape == (2 * 16, 16)
    pos = image.meta["token_index"].view(2, 16)
    assert (pos[:, 1:] - pos[:, :-1] == 1).all()  # one contiguous run of image tokens per example
    with pytest.raises(ValueError, match="no CLS token"):
        enc.activations(batch, [hook], tokens="cls")


def test_generate_with_edit(enc: LlavaEncoder, batch: tuple) -> None:
    images, _ = batch
    plain = enc.generate(images, "what is this?", max_new_tokens=4)
    assert len(plain) == 2 and all(isinstance(t, str) for t in plain)
    assert enc.generate(images, "what is this?", max_new_tokens=4) == plain  # greedy: deterministic
    with enc.edit(enc.default_hook, lambda t: t):
        assert enc.generate(images, "what is this?", max_new_tokens=4) == plain
    direction = 50 * torch.randn(16, generator=torch.Generator().manual_seed(0))
    with enc.edit(f"{LLM}.1", lambda t: t + direction):
        steered = enc.generate(images, "what is this?", max_new_tokens=4)
    assert steered != plain


def test_bad_batch(enc: LlavaEncoder) -> None:
    with pytest.raises(TypeError, match="processor outputs"):
        enc.activations(torch.randn(1, 3, 32, 32), [enc.default_hook])
