"""Spliced fidelity: the model with an SAE's reconstruction in place of the activation, vs the original.

CLIP/ViT: embedding (or logit) cosine, top-1 agreement and zero-shot accuracy retained.
UNet: similarity of generations with the same seed. No edits are made: `keep_error=False` alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from mmsae.encoders.base import Encoder
from mmsae.encoders.capabilities import Sampler, require
from mmsae.intervene.intervention import Splice
from mmsae.intervene.steer import Images, image_outputs, to_pixels, with_and_without, zero_shot_probs
from mmsae.sae.base import SAE


@dataclass
class ImageFidelity:
    embedding_cosine: float
    """Mean cosine between the original and spliced outputs (CLIP embeddings or timm logits)."""
    agreement: float
    """Share of images whose top-1 prediction (zero-shot label or class) is unchanged."""
    accuracy_original: float | None = None
    accuracy_spliced: float | None = None

    @property
    def accuracy_retained(self) -> float | None:
        """Spliced accuracy / original accuracy (None without targets or when the original scores 0)."""
        if self.accuracy_original is None or self.accuracy_spliced is None or self.accuracy_original == 0:
            return None
        return self.accuracy_spliced / self.accuracy_original


@torch.no_grad()
def image_fidelity(
    encoder: Encoder,
    sae: SAE,
    images: Images,
    labels: Sequence[str] | None = None,
    targets: Tensor | None = None,
    template: str = "a photo of a {}.",
    hook: str | None = None,
) -> ImageFidelity:
    """Splice `sae` (reconstruction only) into a CLIP/timm model; compare outputs and predictions.

    With `labels` (CLIP) predictions are zero-shot labels, else the model's classes (timm logits).
    `targets` ([B] label/class indices) adds accuracy before/after.
    """
    pixels = to_pixels(encoder, images)
    before_BE, after_BE = with_and_without(
        encoder, Splice(sae, hook=hook, keep_error=False), lambda: image_outputs(encoder, pixels)
    )
    cosine = torch.nn.functional.cosine_similarity(before_BE, after_BE, dim=-1).mean()
    if labels is not None:
        before_BE, after_BE = (zero_shot_probs(encoder, e, labels, template) for e in (before_BE, after_BE))
    pred_before, pred_after = before_BE.argmax(-1), after_BE.argmax(-1)
    result = ImageFidelity(float(cosine), float((pred_before == pred_after).float().mean()))
    if targets is not None:
        targets = targets.to(pred_before.device)
        result.accuracy_original = float((pred_before == targets).float().mean())
        result.accuracy_spliced = float((pred_after == targets).float().mean())
    return result


def image_similarity(
    images_a: Sequence[Image.Image], images_b: Sequence[Image.Image], encoder: Encoder | None = None
) -> Tensor:
    """Per-pair similarity [B] of two lists of generations.

    With an image `encoder` (CLIP): cosine of its embeddings, the field's usual measure. Without:
    1 − mean absolute pixel difference in [0, 1] (1 = identical), needing no weights.
    """
    if len(images_a) != len(images_b):
        raise ValueError(f"Compare equally many images: got {len(images_a)} and {len(images_b)}.")
    if encoder is not None:
        emb_a, emb_b = (image_outputs(encoder, to_pixels(encoder, list(ims))) for ims in (images_a, images_b))
        return torch.nn.functional.cosine_similarity(emb_a, emb_b, dim=-1)
    diffs = [np.abs(_unit(a) - _unit(b.resize(a.size))).mean() for a, b in zip(images_a, images_b)]
    return 1.0 - torch.tensor(diffs, dtype=torch.float32)


def _unit(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def generation_fidelity(
    encoder: Encoder,
    sae: SAE,
    prompts: Sequence[str],
    seed: int = 0,
    num_inference_steps: int = 4,
    guidance_scale: float = 7.5,
    hook: str | None = None,
    similarity_encoder: Encoder | None = None,
    **sample: Any,
) -> Tensor:
    """Similarity [B] of same-seed UNet generations: SAE reconstruction spliced in vs the original."""
    sampler = require(encoder, Sampler, what="generation_fidelity")
    before, after = with_and_without(
        encoder,
        Splice(sae, hook=hook, keep_error=False),
        lambda: sampler.sample(
            list(prompts),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            seed=seed,
            **sample,
        ),
    )
    return image_similarity(before, after, similarity_encoder)


__all__ = ["ImageFidelity", "generation_fidelity", "image_fidelity", "image_similarity"]
