"""Encoder capabilities: each real encoder class declares what it can do; asking for an undeclared one
raises an error that names the capability, the encoder and who has it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import mmsae
from mmsae.encoders import get_encoder
from mmsae.encoders.capabilities import (
    CAPABILITIES,
    Classifier,
    Generator,
    ImageEmbedder,
    MissingCapabilityError,
    Sampler,
    TextEmbedder,
    UpdateEditor,
    capabilities,
    require,
)

ROOT = Path(__file__).resolve().parent.parent

DECLARED = {
    "clip:tiny": ["ImageEmbedder", "TextEmbedder"],
    "timm:test_vit": ["Classifier"],
    "llava:tiny": ["Generator"],
    "unet:tiny": ["Sampler", "UpdateEditor"],
}


@pytest.fixture(scope="module")
def encoders() -> dict:
    return {spec: get_encoder(spec) for spec in DECLARED}


def test_each_real_encoder_declares_its_capabilities(encoders) -> None:
    for spec, names in DECLARED.items():
        assert capabilities(encoders[spec]) == names, spec


def test_declared_capabilities_work_on_tiny_models(encoders) -> None:
    clip, vit = encoders["clip:tiny"], encoders["timm:test_vit"]
    pixels = torch.rand(2, 3, *clip.image_size)
    assert require(clip, ImageEmbedder, "a test").encode_image(pixels).shape == (2, clip.embed_dim)
    assert require(clip, TextEmbedder, "a test").encode_text(["a cat"]).shape == (1, clip.embed_dim)
    assert clip.logit_scale() == pytest.approx(float(clip.model.logit_scale.exp()))
    logits = require(vit, Classifier, "a test").classify(torch.rand(1, 3, 224, 224))
    assert logits.shape == (1, len(vit.class_names))
    unet = require(encoders["unet:tiny"], Sampler, "a test")
    assert unet.schedule_length() == unet.pipe.scheduler.config.num_train_timesteps
    assert len(unet.sample(["a cat"], num_inference_steps=1)) == 1
    assert unet.current_timestep >= 0


@pytest.mark.parametrize(
    ("capability", "spec", "summary"),
    [
        (ImageEmbedder, "timm:test_vit", "embeds images"),
        (TextEmbedder, "timm:test_vit", "text tower"),
        (Classifier, "clip:tiny", "classification head"),
        (Generator, "clip:tiny", "writes answers"),
        (Sampler, "clip:tiny", "samples images"),
        (UpdateEditor, "timm:test_vit", "block updates"),
    ],
)
def test_missing_capability_error_names_it(encoders, capability, spec, summary) -> None:
    with pytest.raises(MissingCapabilityError) as err:
        require(encoders[spec], capability, what="Concept search", hint="Try another encoder.")
    message = str(err.value)
    assert message.startswith("Concept search needs")
    assert f"capability {capability.__name__}" in message and summary in message
    assert repr(spec) in message and capability.examples in message
    assert message.endswith("Try another encoder.")
    assert isinstance(err.value, ValueError) and isinstance(err.value, TypeError)


def test_product_code_asks_for_declared_capabilities(encoders) -> None:
    """The ways in: steering, unlearning, naming and cfg halves refuse encoders without the capability."""
    from mmsae.analysis.naming import text_embeddings
    from mmsae.intervene import Set, Splice
    from mmsae.intervene.steer import steer_llava, zero_shot_probs
    from mmsae.intervene.unlearn import Unlearner, UnlearnSelection

    vit, clip = encoders["timm:test_vit"], encoders["clip:tiny"]
    sae = mmsae.build_sae("topk", 64, 32, k=2, hook="blocks.1", encoder=vit.id)
    with pytest.raises(MissingCapabilityError, match=r"Zero-shot labels needs .* TextEmbedder"):
        zero_shot_probs(vit, torch.zeros(1, 64), ["cat", "dog"])
    with pytest.raises(MissingCapabilityError, match=r"steer_llava needs .* Generator"):
        steer_llava(vit, sae, torch.zeros(1, 3, 224, 224), "What is this?", [Set(0, 1.0)])
    with pytest.raises(MissingCapabilityError, match=r"Naming and text queries needs .* TextEmbedder"):
        text_embeddings(vit, ["dog"])
    selection = UnlearnSelection(hook="blocks.1", encoder=vit.id, n_features=32, percentile=99.0)
    with pytest.raises(MissingCapabilityError, match=r"Concept unlearning needs .* Sampler"):
        Unlearner(clip, sae, selection)
    with pytest.raises(MissingCapabilityError, match=r"A timestep window needs .* Sampler"):
        mmsae.intervene.Intervention(vit, Splice(sae, [Set(1, 1.0)], timesteps=(0, 10)))


def test_no_capability_probes_left() -> None:
    """Capabilities are asked for by declaration: no hasattr/getattr on an encoder for one of them."""
    members = {"encode_image", "encode_text", "sample", "generate", "edit_update", "pipe", "sampling"}
    members |= {
        "current_timestep",
        "classify",
        "logits_from_hook",
        "class_names",
        "is_text_hook",
        "embed_dim",
    }
    found = []
    for folder in ("mmsae", "apps", "encoders"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Name)
                    and node.func.id in ("hasattr", "getattr")
                    and len(node.args) >= 2
                    and isinstance(node.args[1], ast.Constant)
                    and node.args[1].value in members
                ):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, found
    assert len(CAPABILITIES) == 6


def test_encoder_comes_before_the_sae_and_the_old_order_warns(encoders) -> None:
    """One argument order, (encoder, sae, ...); calls in the earlier (sae, encoder) order still work for one
    release, with a DeprecationWarning."""
    from mmsae.analysis.heatmap import feature_heatmaps
    from mmsae.analysis.naming import atom_directions
    from mmsae.index import ConceptIndex, IndexConfig

    clip = encoders["clip:tiny"]
    sae = mmsae.build_sae("topk", clip.embed_dim, 16, k=2, hook="visual", encoder=clip.id)
    assert atom_directions(clip, sae) is not None
    with pytest.deprecated_call(match=r"atom_directions takes \(encoder, sae, \.\.\.\)"):
        assert torch.equal(atom_directions(sae, clip), atom_directions(clip, sae))
    image = torch.rand(3, *clip.image_size)
    from PIL import Image

    pil = Image.fromarray((image.permute(1, 2, 0).numpy() * 255).astype("uint8"))
    patch_sae = mmsae.build_sae("topk", clip.model.visual.transformer.width, 16, k=2, encoder=clip.id)
    hook = clip.default_hook
    new = feature_heatmaps(clip, patch_sae, [pil], 0, hook)
    with pytest.deprecated_call(match="feature_heatmaps"):
        old = feature_heatmaps(patch_sae, clip, [pil], 0, hook)
    assert all((a == b).all() for a, b in zip(new, old))
    cfg = IndexConfig(concept_images=1)
    assert len(ConceptIndex.build(clip, sae, [pil], cfg=cfg, vocab=["cat"])) == 1
    with pytest.deprecated_call(match="ConceptIndex.build"):
        assert len(ConceptIndex.build([pil], sae, clip, cfg=cfg, vocab=["cat"])) == 1
