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
    assert enc.hook_points() == [
        f"{VISION}.0",
        f"{VISION}.1",
        f"{VISION}.2",
        "model.multi_modal_projector",
        f"{LLM}.0",
        f"{LLM}.1",
    ]
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


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_llm_layers_text_tokens(enc: LlavaEncoder, batch: tuple, padding_side: str) -> None:
    images, _ = batch
    prompts = ["<image> hi", "<image> a much longer prompt than the first one"]
    inputs = enc.processor(
        images=images, text=prompts, return_tensors="pt", padding=True, padding_side=padding_side
    )
    mask_BT = inputs["attention_mask"].bool()
    assert not mask_BT.all()  # the short prompt is padded
    hook = f"{LLM}.0"  # not the last layer: hidden_states[-1] has the final norm applied
    text = enc.activations(inputs, [hook], tokens="text", example_offset=5)[hook]
    keep_BT = mask_BT & (inputs["input_ids"] != enc.model.config.image_token_index)
    b_N, t_N = keep_BT.nonzero().unbind(1)
    assert text.meta["example_id"].tolist() == (b_N + 5).tolist()
    assert text.meta["token_index"].tolist() == t_N.tolist()  # columns of input_ids, padding skipped
    assert text.acts_ND.shape == (int(keep_BT.sum()), 16)
    assert (text.meta["example_id"] == 5).sum() < (text.meta["example_id"] == 6).sum()
    with torch.no_grad():
        hidden_BTD = enc.model(**inputs, output_hidden_states=True).hidden_states[1]  # after layer 0
    torch.testing.assert_close(text.acts_ND, hidden_BTD[b_N, t_N], rtol=0, atol=0)
    image = enc.activations(inputs, [hook], tokens="image")[hook]
    text_pos = set(zip(text.meta["example_id"].tolist(), text.meta["token_index"].tolist()))
    image_pos = set(zip((image.meta["example_id"] + 5).tolist(), image.meta["token_index"].tolist()))
    assert not text_pos & image_pos and len(text_pos | image_pos) == mask_BT.sum()  # a partition


def test_llm_token_modes_on_vision_hooks_are_clear_errors(enc: LlavaEncoder, batch: tuple) -> None:
    for mode in ("text", "image"):
        with pytest.raises(ValueError, match=f"tokens='{mode}'.*vision hook.*LLM hook"):
            enc.activations(batch, [enc.default_hook], tokens=mode)
    with pytest.raises(ValueError, match="image features only"):
        enc.activations(batch, ["model.multi_modal_projector"], tokens="text")


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_llm_all_index_and_mean_skip_padding(enc: LlavaEncoder, batch: tuple, padding_side: str) -> None:
    images, _ = batch
    prompts = ["<image> hi", "<image> a much longer prompt than the first one"]
    inputs = enc.processor(
        images=images, text=prompts, return_tensors="pt", padding=True, padding_side=padding_side
    )
    mask_BT = inputs["attention_mask"].bool()
    hook = f"{LLM}.0"
    every = enc.activations(inputs, [hook], tokens="all")[hook]
    assert every.acts_ND.shape[0] == mask_BT.sum()  # padding is no token of any example
    last = enc.activations(inputs, [hook], tokens=-1)[hook]
    alone = [
        enc.activations(([im], [p]), [hook], tokens="all")[hook].acts_ND for im, p in zip(images, prompts)
    ]
    torch.testing.assert_close(last.acts_ND, torch.stack([a[-1] for a in alone]), rtol=1e-4, atol=1e-5)
    first = enc.activations(inputs, [hook], tokens=0)[hook]
    torch.testing.assert_close(first.acts_ND, torch.stack([a[0] for a in alone]), rtol=1e-4, atol=1e-5)
    mean = enc.activations(inputs, [hook], tokens="mean")[hook]
    torch.testing.assert_close(mean.acts_ND, torch.stack([a.mean(0) for a in alone]), rtol=1e-4, atol=1e-5)
    assert mean.meta["token_index"].tolist() == [-1, -1]
    with pytest.raises(ValueError, match="out of range"):
        enc.activations(inputs, [hook], tokens=int(mask_BT.sum(1).min()))
