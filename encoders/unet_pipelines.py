"""Stable Diffusion pipelines without pretrained weights: the tiny test preset and random-init stand-ins."""

from __future__ import annotations

from typing import Any

from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel

from mmsae.encoders.tiny_tokenizer import tiny_clip_tokenizer


def tiny_pipeline() -> StableDiffusionPipeline:
    """SD-1.x with diffusers' own tiny test components (random init) and an offline CLIP tokenizer."""
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=2,
    )
    vae = tiny_vae()  # before the text encoder: seeded weights depend on the order of random inits
    tokenizer = tiny_clip_tokenizer(vocab_size=1000)
    text_encoder = CLIPTextModel(tiny_text_config(tokenizer))
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_vae() -> AutoencoderKL:
    """diffusers' tiny test VAE: 4 feature channels, two blocks (random init)."""
    return AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        norm_num_groups=2,
    )


def tiny_text_config(tokenizer: Any, **sizes: int) -> CLIPTextConfig:
    """diffusers' tiny CLIP text-encoder config with `tokenizer`'s special tokens (a 1000-token
    vocabulary, as `tiny_clip_tokenizer(1000)`); `sizes` overrides the SD-1.x test sizes (hidden 8,
    intermediate 16, 2 heads, 2 layers), e.g. for SDXL's wider encoders."""
    defaults = {"hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2, "num_hidden_layers": 2}
    return CLIPTextConfig(
        **{**defaults, **sizes},
        vocab_size=1000,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def random_init_pipeline(name: str) -> DiffusionPipeline:
    """The real architecture of `name` with random weights: configs and tokenizers come from `name`."""
    config = DiffusionPipeline.load_config(name)
    pipe_cls = StableDiffusionXLPipeline if "XL" in config["_class_name"] else StableDiffusionPipeline
    parts: dict[str, Any] = {}
    for part, (library, cls_name) in config.items():
        if (
            part.startswith("_")
            or library is None
            or part in ("safety_checker", "feature_extractor", "image_encoder")
        ):
            continue
        cls = getattr(__import__(library), cls_name)
        if part in ("unet", "vae"):
            parts[part] = cls.from_config(cls.load_config(name, subfolder=part))
        elif part.startswith("text_encoder"):
            parts[part] = cls(cls.config_class.from_pretrained(name, subfolder=part))
        else:  # tokenizers and schedulers have no weights
            parts[part] = cls.from_pretrained(name, subfolder=part)
    extra = (
        {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
        if pipe_cls is StableDiffusionPipeline
        else {}
    )
    return pipe_cls(**parts, **extra)
