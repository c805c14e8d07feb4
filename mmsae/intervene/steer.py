"""Steering applications on top of `Intervention`: CLIP/ViT images, LLaVA generations, diffusion samples.

Each runs the model twice, bare and with the SAE spliced in, and returns both results so that
callers (CLI, Gradio app) can show the change. `max_activations` supplies `SetMax` edits.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from mmsae.encoders.base import Encoder
from mmsae.encoders.capabilities import Generator, ImageEmbedder, Sampler, TextEmbedder, require
from mmsae.intervene.edits import Edit
from mmsae.intervene.intervention import Intervention, Splice, check_site, schedule_length
from mmsae.sae.base import SAE, SparseCodes

R = TypeVar("R")
Images = Image.Image | Sequence[Image.Image] | Tensor


def with_and_without(
    encoder: Encoder, splices: Splice | Sequence[Splice], run: Callable[[], R]
) -> tuple[R, R]:
    """(run() on the bare model, run() with the splices installed)."""
    intervention = Intervention(encoder, splices)  # validates before the (possibly long) bare run
    before = run()
    with intervention:
        after = run()
    return before, after


def to_pixels(encoder: Encoder, images: Images) -> Tensor:
    """PIL image(s) through the encoder's own preprocessing, or a ready [B, C, H, W] tensor; on its device."""
    if isinstance(images, Tensor):
        pixels = images if images.ndim == 4 else images[None]
    else:
        images = [images] if isinstance(images, Image.Image) else list(images)
        pixels = torch.stack([encoder.transform(im) for im in images])
    return pixels.to(encoder.device)


@torch.no_grad()
def image_outputs(encoder: Encoder, pixels_BCHW: Tensor) -> Tensor:
    """What the image model produces: CLIP's unit image embedding, or a timm model's logits."""
    if isinstance(encoder, ImageEmbedder):
        return encoder.encode_image(pixels_BCHW, normalize=True).float()
    return encoder.run_model(pixels_BCHW).float()


@torch.no_grad()
def zero_shot_probs(
    encoder: Encoder, emb_BE: Tensor, labels: Sequence[str], template: str = "a photo of a {}."
) -> Tensor:
    """CLIP zero-shot label probabilities [B, L] from unit image embeddings."""
    clip = require(
        encoder,
        TextEmbedder,
        what="Zero-shot labels",
        hint="Drop `labels` (the result then compares the model's outputs).",
    )
    if not labels:
        raise ValueError("labels is empty: pass at least two class names for zero-shot classification.")
    text_LE = clip.encode_text([template.format(label) for label in labels], normalize=True).float()
    return (clip.logit_scale() * emb_BE @ text_LE.T).softmax(-1)


@dataclass
class ImageSteerResult:
    """Outputs of a CLIP/ViT image model before and after steering."""

    before_BE: Tensor
    """CLIP: unit image embeddings; timm: class logits."""
    after_BE: Tensor
    labels: list[str] | None = None
    probs_before_BL: Tensor | None = None
    probs_after_BL: Tensor | None = None

    @property
    def cosine_B(self) -> Tensor:
        return torch.nn.functional.cosine_similarity(self.before_BE, self.after_BE, dim=-1)

    def label_shift(self) -> dict[str, float]:
        """Mean change of each label's zero-shot probability (after − before)."""
        if self.labels is None or self.probs_before_BL is None or self.probs_after_BL is None:
            raise ValueError("No labels were given to steer_image, so there is no label shift.")
        delta_L = (self.probs_after_BL - self.probs_before_BL).mean(0)
        return {label: float(d) for label, d in zip(self.labels, delta_L)}


def steer_image(
    encoder: Encoder,
    sae: SAE,
    images: Images,
    edits: Sequence[Edit],
    labels: Sequence[str] | None = None,
    template: str = "a photo of a {}.",
    **splice: Any,
) -> ImageSteerResult:
    """Steer a CLIP/timm image model; with `labels` (CLIP), report zero-shot probabilities before/after.

    `splice` takes the other `Splice` fields (hook, keep_error, token_mask, spatial_mask, max_acts).
    """
    pixels = to_pixels(encoder, images)
    before, after = with_and_without(
        encoder, Splice(sae, edits, **splice), lambda: image_outputs(encoder, pixels)
    )
    result = ImageSteerResult(before, after)
    if labels is not None:
        result.labels = list(labels)
        result.probs_before_BL = zero_shot_probs(encoder, before, labels, template)
        result.probs_after_BL = zero_shot_probs(encoder, after, labels, template)
    return result


@dataclass
class GenerationSteerResult:
    before: list[Any]
    """LLaVA: generated texts; diffusion: PIL images."""
    after: list[Any]


def steer_llava(
    encoder: Encoder,
    sae: SAE,
    images: Images,
    prompt: str,
    edits: Sequence[Edit],
    max_new_tokens: int = 20,
    **splice: Any,
) -> GenerationSteerResult:
    """Steer LLaVA through an SAE on the vision-tower layer it reads (sae-for-vlm): e.g. `Set(i, high)` on
    every image token. The hook defaults to the SAE's own (normally the encoder's `default_hook`)."""
    vlm = require(encoder, Generator, what="steer_llava")
    images = images if isinstance(images, (Tensor, list, tuple)) else [images]
    before, after = with_and_without(
        encoder,
        Splice(sae, edits, **splice),
        lambda: vlm.generate(images, prompt, max_new_tokens=max_new_tokens),
    )
    return GenerationSteerResult(list(before), list(after))


def sampled_timesteps(encoder: Encoder, num_inference_steps: int) -> list[int]:
    """The timesteps the encoder's scheduler visits for `num_inference_steps` (scheduler left untouched)."""
    scheduler = copy.deepcopy(require(encoder, Sampler, what="A timestep schedule").pipe.scheduler)
    scheduler.set_timesteps(num_inference_steps)
    return [int(t) for t in scheduler.timesteps]


def sampler_settings(num_inference_steps: int | None, guidance_scale: float | None, **sample: Any) -> dict:
    """Keyword overrides for `encoder.sample`: steps and guidance only where given, so the encoder's own
    settings (the model's defaults unless set) apply otherwise."""
    given = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale}
    return {**{k: v for k, v in given.items() if v is not None}, **sample}


def check_window_hits(encoder: Encoder, splices: Sequence[Splice], num_inference_steps: int) -> None:
    """A timestep window that contains no sampled step would silently do nothing: refuse it."""
    steps = sampled_timesteps(encoder, num_inference_steps)
    for s in splices:
        if s.timesteps is not None and not any(s.timesteps[0] <= t <= s.timesteps[1] for t in steps):
            raise ValueError(
                f"Timestep window {s.timesteps} contains none of the {num_inference_steps} sampled timesteps "
                f"{steps} (schedule 0..{schedule_length(encoder) - 1}); widen it or change "
                "num_inference_steps."
            )


def steer_diffusion(
    encoder: Encoder,
    splices: Splice | Sequence[Splice],
    prompts: Sequence[str],
    seed: int = 0,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    **sample: Any,
) -> GenerationSteerResult:
    """Sample with the same seed bare and steered (e.g. `Splice(sae, [Direction(i, 8.0)], spatial_mask=m,
    timesteps=(500, 999), cfg_half="cond")`); several splices (hooks, SAEs) apply at once. Steps and
    guidance left None are the encoder's (the model's own: SDXL-Turbo samples 1 step at guidance 0)."""
    sampler = require(encoder, Sampler, what="steer_diffusion")
    splices = [splices] if isinstance(splices, Splice) else list(splices)
    kw = sampler_settings(num_inference_steps, guidance_scale, seed=seed, **sample)
    check_window_hits(encoder, splices, kw.get("num_inference_steps", sampler.sampling.num_inference_steps))
    before, after = with_and_without(encoder, splices, lambda: sampler.sample(list(prompts), **kw))
    return GenerationSteerResult(before, after)


@torch.no_grad()
def max_activations(encoder: Encoder, sae: SAE, batches: Iterable[Any], hook: str | None = None) -> Tensor:
    """Per-feature maximum activation [n_features] (fp32) over the tokens of `batches`, for `SetMax` edits."""
    hook = hook or sae.cfg.hook
    if hook is None:
        raise ValueError("The SAE's cfg records no hook point: pass hook='<module path>'.")
    check_site(encoder, sae, hook)
    # An SAE on block updates sees updates here too (UNet encoders record them on request).
    site = {"update": True} if sae.cfg.site == "update" else {}
    max_n = torch.zeros(sae.cfg.n_features, device=sae.W_dec.device)
    for batch in tqdm(batches, desc="max activations", leave=False):
        acts_ND = encoder.activations(batch, [hook], **site)[hook].acts_ND.to(sae.W_dec)
        codes = sae.encode(acts_ND)
        if isinstance(codes, SparseCodes):
            max_n.scatter_reduce_(0, codes.indices.flatten(), codes.values.flatten().float(), "amax")
        else:
            max_n = torch.maximum(max_n, codes.float().amax(0))
    return max_n


__all__ = [
    "GenerationSteerResult",
    "ImageSteerResult",
    "image_outputs",
    "max_activations",
    "sampled_timesteps",
    "steer_diffusion",
    "steer_image",
    "steer_llava",
    "to_pixels",
    "with_and_without",
    "zero_shot_probs",
]
