"""Data sets: images, captions and prompts for extraction; synthetic activations with known features."""

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
    "PromptList",
    "RandomCrops",
    "SkimagePhotos",
    "load_dataset",
]
