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
from mmsae.datasets.photos import (
    FoolboxSamples,
    InteriorPhotos,
    LabeledSkimagePhotos,
    PhotoFiles,
    imagenet_class_names,
)

__all__ = [
    "Example",
    "FoolboxSamples",
    "ImageCaptions",
    "ImageFolder",
    "InteriorPhotos",
    "LabeledSkimagePhotos",
    "PhotoFiles",
    "PromptList",
    "RandomCrops",
    "SkimagePhotos",
    "imagenet_class_names",
    "load_dataset",
]
