"""A pretrained tag's own settings (QuickGELU, preprocessing) build the model, with or without weights.

Real architectures are built on the meta device (no memory, no init cost), through the product path.
"""

from __future__ import annotations

import warnings

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU
from torch import nn
from torchvision import transforms as T

from mmsae.encoders.clip import ClipEncoder, tag_build_kwargs

QUICKGELU_TAGS = [
    (arch, tag)
    for arch, tag in open_clip.list_pretrained()
    if open_clip.get_pretrained_cfg(arch, tag).get("quick_gelu")
]


# One tag per architecture whose own config runs GELU, with a tokenizer that needs no hub: built for real.
BUILT = {
    arch: tag
    for arch, tag in reversed(QUICKGELU_TAGS)
    if "hf_tokenizer_name" not in open_clip.get_model_config(arch)["text_cfg"]
    and not open_clip.get_model_config(arch).get("quick_gelu")
}


def _meta_encoder(spec: str) -> ClipEncoder:
    """`clip:spec` with pretrained=False, built on the meta device."""
    with torch.device("meta"):
        return ClipEncoder.from_spec(spec, pretrained=False, device="meta")


def test_quickgelu_tags_are_listed() -> None:
    assert ("ViT-B-32", "openai") in QUICKGELU_TAGS and len(QUICKGELU_TAGS) >= 50
    assert BUILT["ViT-B-32"] == "openai" and {"RN50", "ViT-H-14", "ViT-bigG-14"} <= set(BUILT)


@pytest.mark.parametrize(("arch", "tag"), QUICKGELU_TAGS, ids=[f"{a}/{t}" for a, t in QUICKGELU_TAGS])
def test_quickgelu_tag_resolves_to_quickgelu(arch: str, tag: str) -> None:
    """The config open_clip builds for every QuickGELU tag (its own flag or our override) runs QuickGELU."""
    assert tag_build_kwargs(arch, tag).get("force_quick_gelu") or open_clip.get_model_config(arch).get(
        "quick_gelu"
    )


@pytest.mark.parametrize(("arch", "tag"), list(BUILT.items()), ids=[f"{a}/{t}" for a, t in BUILT.items()])
def test_quickgelu_tag_builds_quickgelu(arch: str, tag: str) -> None:
    """OpenAI-style weights were trained with QuickGELU: the model built for the tag must run it."""
    enc = _meta_encoder(f"{arch}/{tag}")
    activations = {type(m) for m in enc.model.modules() if isinstance(m, (nn.GELU, QuickGELU))}
    assert activations == {QuickGELU}


def test_tag_preprocessing_applies_without_weights() -> None:
    """mean/std, interpolation and resize mode come from the tag also for a random-init stand-in."""
    cases = {  # spec → (mean, interpolation, resize is a squash to H×W)
        "ViT-L-14/laion2b_s32b_b82k": ((0.5, 0.5, 0.5), T.InterpolationMode.BICUBIC, False),
        "MobileCLIP-S1/datacompdr": ((0.0, 0.0, 0.0), T.InterpolationMode.BILINEAR, False),
        "ViT-H-14/dfn5b": ((0.48145466, 0.4578275, 0.40821073), T.InterpolationMode.BICUBIC, True),
    }
    for spec, (mean, interpolation, squash) in cases.items():
        steps = _meta_encoder(spec).image_pipeline.transforms
        normalize = next(s for s in steps if isinstance(s, T.Normalize))
        resize = next(s for s in steps if isinstance(s, T.Resize))
        assert tuple(normalize.mean) == pytest.approx(mean), spec
        assert resize.interpolation == interpolation, spec
        assert isinstance(resize.size, (tuple, list)) and len(resize.size) == 2 if squash else True, spec
        assert any(isinstance(s, T.CenterCrop) for s in steps) != squash, spec


def test_every_tag_setting_is_applied() -> None:
    """Every key open_clip's pretrained configs carry is applied or is a download location (no warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for arch, tag in open_clip.list_pretrained():
            tag_build_kwargs(arch, tag)
    assert tag_build_kwargs("ViT-B-32", "openai")["force_quick_gelu"] is True
