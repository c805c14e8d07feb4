"""`get_encoder(spec)`: family prefix → adapter class, imported lazily (timm users never import diffusers)."""

from __future__ import annotations

import importlib
from typing import Any

import torch

from mmsae.encoders.base import Encoder

# family → "module:Class"; each class implements `from_spec(name, pretrained, **kw)`.
FAMILIES: dict[str, str] = {
    "clip": "mmsae.encoders.clip:ClipEncoder",
    "timm": "mmsae.encoders.timm_vit:TimmEncoder",
    "llava": "mmsae.encoders.llava:LlavaEncoder",
    "unet": "mmsae.encoders.unet:UNetEncoder",
}
TINY_PRESETS = ("clip:tiny", "timm:test_vit", "llava:tiny", "unet:tiny")


def encoder_class(family: str) -> type[Encoder]:
    if family not in FAMILIES:
        raise ValueError(
            f"Unknown encoder family {family!r}; use one of {sorted(FAMILIES)} "
            "as '<family>:<model id or path>', e.g. 'clip:ViT-B-32/openai'."
        )
    module, cls = FAMILIES[family].split(":")
    return getattr(importlib.import_module(module), cls)


def get_encoder(
    spec: str,
    pretrained: bool = True,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    **kw: Any,
) -> Encoder:
    """The adapter for `spec` = '<family>:<name>'; tiny presets (TINY_PRESETS) are always random-init.

    Random init is seeded (`init_seed`, default 0) without touching the global RNG, so the same spec
    gives the same weights in every process: an index built by one command and queried by another,
    or a demo's store reused by its app, agree even without pretrained weights.
    """
    family, sep, name = spec.partition(":")
    if not sep or not name:
        raise ValueError(
            f"Encoder spec {spec!r} must look like '<family>:<name>', e.g. 'timm:test_vit'; "
            f"families: {sorted(FAMILIES)}; tiny presets: {TINY_PRESETS}."
        )
    if spec in TINY_PRESETS:
        pretrained = False
    init_seed = kw.pop("init_seed", 0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        encoder = encoder_class(family).from_spec(name, pretrained=pretrained, **kw)
    encoder.id = spec
    return encoder.to(device=device, dtype=dtype) if dtype is not None else encoder.to(device)
