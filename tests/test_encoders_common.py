"""Contract every adapter keeps, checked on each tiny preset (real classes, random init)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from PIL import Image

from mmsae.encoders import Encoder, get_encoder

# preset → (a batch its run_model accepts, hooks to read, one hook to edit)
CASES: dict[str, tuple[Any, list[str], str]] = {
    "timm:test_vit": (lambda: torch.randn(2, 3, 160, 160), ["blocks.1", "blocks.3"], "blocks.2"),
    "clip:tiny": (
        lambda: torch.randn(2, 3, 32, 32),
        ["visual.transformer.resblocks.0", "visual"],
        "visual.transformer.resblocks.0",
    ),
    "llava:tiny": (
        lambda: (
            [Image.new("RGB", (40, 30), "red"), Image.new("RGB", (30, 30), "blue")],
            ["what is it?", "describe"],
        ),
        ["model.vision_tower.encoder.layers.1", "model.language_model.layers.0"],
        "model.vision_tower.encoder.layers.1",
    ),
    "unet:tiny": (
        lambda: ["a red cube", "a cat"],
        ["up_blocks.0.attentions.0", "mid_block"],
        "up_blocks.0.attentions.0",
    ),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> tuple[Encoder, Any, list[str], str]:
    make_batch, hooks, edit_hook = CASES[request.param]
    torch.manual_seed(0)
    return get_encoder(request.param), make_batch(), hooks, edit_hook


def test_hook_points_and_default(case: tuple[Encoder, Any, list[str], str]) -> None:
    enc, _, hooks, _ = case
    assert set(hooks) <= set(enc.hook_points())
    assert enc.default_hook in enc.hook_points()
    assert enc.family == enc.id.split(":")[0]


def test_unknown_hook_lists_valid_names(case: tuple[Encoder, Any, list[str], str]) -> None:
    enc, batch, hooks, _ = case
    with pytest.raises(KeyError, match=f"Valid hook points: .*{hooks[0]}"):
        enc.activations(batch, ["no.such.module"])


def test_deterministic_and_metadata(case: tuple[Encoder, Any, list[str], str]) -> None:
    enc, batch, hooks, _ = case
    first, second = enc.activations(batch, hooks), enc.activations(batch, hooks)
    for hook in hooks:
        torch.testing.assert_close(first[hook].acts_ND, second[hook].acts_ND, rtol=0, atol=0)
        meta = first[hook].meta
        n = first[hook].acts_ND.shape[0]
        assert meta["example_id"].shape == meta["token_index"].shape == (n,)
        assert set(meta["example_id"].tolist()) == {0, 1}


def test_early_stop_keeps_values(
    case: tuple[Encoder, Any, list[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    enc, batch, hooks, _ = case
    if enc.family == "unet":  # multi-step sampling never stops early (tested in test_encoders_unet.py)
        assert not enc.can_stop_early()
        return
    early = enc.activations(batch, hooks)
    monkeypatch.setattr(enc, "can_stop_early", lambda: False)
    full = enc.activations(batch, hooks)
    for hook in hooks:
        torch.testing.assert_close(early[hook].acts_ND, full[hook].acts_ND, rtol=0, atol=0)


def test_edit_identity_and_zeroing(case: tuple[Encoder, Any, list[str], str]) -> None:
    enc, batch, _, hook = case
    with torch.no_grad():
        plain = enc.run_model(batch)
        with enc.edit(hook, lambda t: t):
            same = enc.run_model(batch)
        with enc.edit(hook, torch.zeros_like):
            zeroed = enc.run_model(batch)
        after = enc.run_model(batch)  # the edit hook is gone again
    torch.testing.assert_close(same, plain, rtol=0, atol=0)
    torch.testing.assert_close(after, plain, rtol=0, atol=0)
    assert not torch.allclose(zeroed, plain, atol=1e-4)


def test_example_offset(case: tuple[Encoder, Any, list[str], str]) -> None:
    enc, batch, hooks, _ = case
    acts = enc.activations(batch, hooks[:1], example_offset=10)[hooks[0]]
    assert acts.meta["example_id"].min() == 10
