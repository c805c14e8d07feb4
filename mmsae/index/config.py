"""The concept index's configuration and the records its queries return."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmsae.encoders.base import TokenMode
from mmsae.index.ann import AnnConfig
from mmsae.kernels.candidates import check_encode


@dataclass
class IndexConfig:
    hook: str | None = None
    """Hook the SAE reads; None = the SAE's recorded hook, else the encoder's default."""
    tokens: TokenMode = "all"
    pool: str = "max"
    """How token codes become one code per image: 'max' (a feature is on if it fires anywhere) or 'mean'."""
    max_codes_per_image: int = 256
    """Largest pooled codes kept per image: bounds storage at 8 bytes × this per image."""
    batch_size: int = 32
    num_workers: int = 0
    """DataLoader workers that read and preprocess the images, as in extraction (0: this process)."""
    decode: str = "pil"
    """How images are decoded, as in extraction: 'pil', 'draft' (large JPEGs at reduced size) or 'device'
    (JPEG files batch-wise on the encoder's device; see `mmsae.extract`)."""
    skip_unreadable: bool = False
    """Leave unreadable files out (listed in `ConceptIndex.skipped`) instead of failing."""
    concept_images: int = 16
    """Top images per feature whose embeddings give its direction (SAEs not on the final embedding)."""
    names_per_feature: int = 5
    encode: str = "exact"
    """How a TopK SAE's codes are computed: 'exact', or 'fp8' (on Hopper GPUs, candidate groups from an e4m3
    GEMM re-scored exactly: `StatsConfig.encode`)."""
    ann: AnnConfig = field(default_factory=AnnConfig)

    def __post_init__(self) -> None:
        check_encode(self.encode, "IndexConfig.encode")


@dataclass
class ImageHit:
    id: int
    path: str
    score: float
    """Cosine similarity (text/image queries) or pooled activation (`images_of`)."""


@dataclass
class FeatureHit:
    feature: int
    name: str
    score: float
    """Cosine between the query's text embedding and the feature's CLIP-space direction."""


@dataclass
class FeatureContribution:
    feature: int
    name: str
    activation: float
    """Pooled SAE code of the image for this feature."""
    contribution: float
    """Share of the reconstruction carried by the feature: a·‖d‖ / Σ_j a_j·‖d_j‖ over the image's features."""


def check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k (the number of results) must be a positive integer, got {k!r}.")


def config_from_dict(d: dict[str, Any]) -> IndexConfig:
    d = dict(d)
    ann = AnnConfig(**d.pop("ann", {}))
    return IndexConfig(**d, ann=ann)
