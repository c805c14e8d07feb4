"""Text-embedding steering (Concept Steerers) with an SAE on a diffusion model's text encoder.

z = relu(W_enc(h_c − b_dec) + b_enc) on the concept prompt's activations h_c, *without* top-k;
δ = strength · z · W_dec (no b_dec), one row per token position. While sampling, δ is added to the
prompt's activations and subtracted from the negative (unconditional) prompt's; strength < 0 steers
away from the concept (−0.5 nudity, −0.7 violence in the paper).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mmsae.encoders.base import Encoder
from mmsae.encoders.capabilities import Sampler, require
from mmsae.intervene.intervention import check_compatible
from mmsae.intervene.steer import GenerationSteerResult, sampler_settings
from mmsae.sae.base import SAE


def concept_delta(sae: SAE, concept_TD: Tensor, strength: float) -> Tensor:
    """δ [T, D] = strength · relu(pre_acts(h_c)) · W_dec: the dense (not top-k) codes, no b_dec."""
    sae.check_input(concept_TD)
    # An SAE with per-token input normalisation codes xₙ; its atoms move x by each token's scale.
    concept_n_TD, stats = sae.normalize(concept_TD.to(sae.W_dec.dtype))
    codes_TN = sae.pre_acts(concept_n_TD).relu()
    delta_TD = strength * codes_TN @ sae.W_dec
    return delta_TD if sae.cfg.input_norm == "none" else delta_TD * stats.scale.to(delta_TD.dtype)


def _text_hook(encoder: Encoder, sae: SAE, hook: str | None) -> str:
    hook = hook or sae.cfg.hook
    if hook is None:
        raise ValueError(
            "The SAE's cfg records no hook point: pass hook='text_encoder.text_model.encoder.layers.9'."
        )
    require(encoder, Sampler, what="Text steering")
    if not encoder.is_text_hook(hook):
        raise ValueError(
            f"Text steering needs an SAE on a text-encoder hook of a diffusion encoder; {hook!r} of "
            f"{encoder.id!r} is not one (hooks like 'text_encoder.text_model.encoder.layers.9')."
        )
    check_compatible(encoder, sae, hook)
    return hook


@torch.no_grad()
def text_concept_delta(
    encoder: Encoder, sae: SAE, concept: str, strength: float, hook: str | None = None
) -> Tensor:
    """δ [T, D] for the concept prompt, from its activations at the SAE's text-encoder hook."""
    hook = _text_hook(encoder, sae, hook)
    captured: list[Tensor] = []

    def record(acts_BTD: Tensor) -> Tensor:
        captured.append(acts_BTD)
        return acts_BTD

    pipe = require(encoder, Sampler, what="text_concept_delta").pipe
    with encoder.edit(hook, record):
        pipe.encode_prompt(
            prompt=[concept],
            device=encoder.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
    return concept_delta(sae, captured[0][0], strength)


@contextlib.contextmanager
def text_steering(encoder: Encoder, hook: str, delta_TD: Tensor) -> Iterator[None]:
    """Add δ to the prompt's text activations and subtract it from the negative prompt's.

    Stable Diffusion pipelines encode the prompts, then the negative prompts, before the first UNet
    call; a counter reset at each UNet call therefore tells the two text-encoder calls apart.
    """
    calls = [0]

    def steer(acts_BTD: Tensor) -> Tensor:
        sign = 1.0 if calls[0] == 0 else -1.0
        calls[0] += 1
        if acts_BTD.shape[1] != delta_TD.shape[0]:
            raise ValueError(
                f"The concept was encoded with {delta_TD.shape[0]} tokens but the prompt with "
                f"{acts_BTD.shape[1]}; both must be padded to the tokenizer's max length."
            )
        return acts_BTD + sign * delta_TD.to(acts_BTD.dtype)

    def reset(_mod: nn.Module, _args: Any) -> None:
        calls[0] = 0

    handle = require(encoder, Sampler, what="text_steering").pipe.unet.register_forward_pre_hook(reset)
    try:
        with encoder.edit(hook, steer):
            yield
    finally:
        handle.remove()


def steer_prompts(
    encoder: Encoder,
    sae: SAE,
    prompts: Sequence[str],
    concept: str,
    strength: float,
    hook: str | None = None,
    seed: int = 0,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    **sample: Any,
) -> GenerationSteerResult:
    """Same-seed samples of `prompts`, bare and steered toward (strength > 0) or away from `concept`; steps
    and guidance left None are the encoder's (the model's own)."""
    hook = _text_hook(encoder, sae, hook)
    delta_TD = text_concept_delta(encoder, sae, concept, strength, hook)
    kw = sampler_settings(num_inference_steps, guidance_scale, seed=seed, **sample)
    sampler = require(encoder, Sampler, what="steer_prompts")
    before = sampler.sample(list(prompts), **kw)
    with text_steering(encoder, hook, delta_TD):
        after = sampler.sample(list(prompts), **kw)
    return GenerationSteerResult(before, after)


__all__ = ["concept_delta", "steer_prompts", "text_concept_delta", "text_steering"]
