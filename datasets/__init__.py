"""Data sets: images, captions, prompts and (image, prompt) pairs for extraction; synthetic activations
with known features."""

from mmsae.datasets.image_prompts import ImagePrompts
from mmsae.datasets.images import (
    Example,
    ImageCaptions,
    ImageFolder,
    PromptList,
    RandomCrops,
    SkimagePhotos,
    load_dataset,
)

__all__ = [
    "Example",
    "ImageCaptions",
    "ImageFolder",
    "ImagePrompts",
    "PromptList",
    "RandomCrops",
    "SkimagePhotos",
    "load_dataset",
]
