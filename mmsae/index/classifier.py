"""Classifier-backed concept indexes: an encoder with a classifier head and no CLIP text tower.

Such an index embeds images by their unit logit vectors (image-to-image search in class space), names
features by their effect on the logits (`mmsae.analysis.logit_naming`), and answers a text query with
the class names: "espresso" → the features whose logit name is espresso → the images where they fire.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from mmsae.analysis.logit_naming import logit_effects, logit_names, typical_activations
from mmsae.analysis.naming import NameCandidate
from mmsae.encoders.base import Encoder
from mmsae.encoders.capabilities import Classifier, ImageEmbedder
from mmsae.index.codes import SparseCodeStore
from mmsae.sae import SAE

REFERENCE_IMAGES = 8
"""Indexed images whose activations are the base of the logit effects."""


def is_classifier_embedder(embedder: Encoder) -> bool:
    """True for encoders that classify but give no CLIP image / text embeddings."""
    if isinstance(embedder, ImageEmbedder) or not isinstance(embedder, Classifier):
        return False
    return embedder.has_classifier  # a timm model may have no head


@torch.no_grad()
def classifier_embeddings(encoder: Encoder, pixels_BCHW: Tensor) -> Tensor:
    """Unit logit vectors [B, K]: the classifier's view of each image, for image-to-image search."""
    logits = encoder.classify(pixels_BCHW).float()
    return logits / logits.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def classifier_names(
    sae: SAE, encoder: Encoder, reference_BTD: Tensor, hook: str, top: int
) -> list[list[NameCandidate]]:
    """Logit names of every feature; features silent on the references are scaled by 1 (unit atom)."""
    scales = typical_activations(sae, reference_BTD.flatten(0, 1))
    effects = logit_effects(sae, encoder, reference_BTD, torch.where(scales > 0, scales, 1.0), hook)
    return logit_names(effects, encoder.class_names, top)


def match_class(text: str, class_names: Sequence[str]) -> str:
    """The class name a text query means (case-insensitive, exact, else the unique one containing it)."""
    want = text.strip().lower()
    lower = [c.lower() for c in class_names]
    if want in lower:
        return class_names[lower.index(want)]
    partial = [c for c, low in zip(class_names, lower) if want and want in low]
    if len(partial) == 1:
        return partial[0]
    hint = f" (it matches {', '.join(partial[:8])})" if partial else ""
    raise KeyError(
        f"{text!r} is not a class of this classifier-backed index{hint}: text queries name one of the "
        f"model's classes, e.g. {', '.join(class_names[:3])} …"
    )


def named_features(
    names: Sequence[Sequence[NameCandidate]], class_name: str, rank: int
) -> list[tuple[int, float]]:
    """(feature, logit change) of features with `class_name` in their first `rank` names, strongest first."""
    hits = [(j, c.score) for j, cands in enumerate(names) for c in cands[:rank] if c.name == class_name]
    return sorted(hits, key=lambda h: -h[1])


def images_by_features(
    codes: SparseCodeStore, features: Sequence[tuple[int, float]], n_images: int
) -> np.ndarray:
    """Score [N] of every image: Σ over the features of (pooled code × the feature's logit change)."""
    score = np.zeros(n_images, dtype=np.float64)
    for feature, weight in features:
        ids, vals = codes.column(feature)
        np.add.at(score, ids, np.asarray(vals, dtype=np.float64) * weight)
    return score


def class_features(
    names: Sequence[Sequence[NameCandidate]], class_name: str, names_per_feature: int
) -> list[tuple[int, float]]:
    """(feature, logit change) of the features naming `class_name`: first those with it as their first name,
    then those with it among their first `names_per_feature` names."""
    first = named_features(names, class_name, rank=1)
    seen = {j for j, _ in first}
    later = named_features(names, class_name, names_per_feature)
    return first + [h for h in later if h[0] not in seen]


def images_of_class(
    codes: SparseCodeStore,
    names: Sequence[Sequence[NameCandidate]],
    class_name: str,
    names_per_feature: int,
    k: int,
    allowed: np.ndarray | None,
) -> list[tuple[int, float]]:
    """(image id, score) of the k (allowed) images where the features named `class_name` fire most."""
    features = named_features(names, class_name, rank=1) or named_features(
        names, class_name, rank=names_per_feature
    )  # no feature names it first: those that name it at all
    score = images_by_features(codes, features, len(codes))
    ids = np.flatnonzero(score > 0) if allowed is None else np.intersect1d(np.flatnonzero(score > 0), allowed)
    top = ids[np.argsort(-score[ids], kind="stable")][:k]
    return [(int(i), float(score[i])) for i in top]


__all__ = [
    "REFERENCE_IMAGES",
    "class_features",
    "classifier_embeddings",
    "classifier_names",
    "images_by_features",
    "images_of_class",
    "is_classifier_embedder",
    "match_class",
    "named_features",
]
