"""Model adapters: `get_encoder("clip:ViT-B-32/openai")` → an `Encoder` with named hook points."""

from mmsae.encoders.base import Encoder, TokenActs, TokenMode
from mmsae.encoders.capabilities import (
    Classifier,
    Generator,
    ImageEmbedder,
    MissingCapabilityError,
    Sampler,
    TextEmbedder,
    UpdateEditor,
    require,
)
from mmsae.encoders.registry import FAMILIES, TINY_PRESETS, get_encoder
from mmsae.encoders.weights import WeightsUnavailableError

__all__ = [
    "FAMILIES",
    "TINY_PRESETS",
    "Classifier",
    "Encoder",
    "Generator",
    "ImageEmbedder",
    "MissingCapabilityError",
    "Sampler",
    "TextEmbedder",
    "TokenActs",
    "TokenMode",
    "UpdateEditor",
    "WeightsUnavailableError",
    "get_encoder",
    "require",
]
