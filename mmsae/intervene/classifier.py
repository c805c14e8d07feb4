"""Steering and unlearning on an image classifier (an encoder with `classify`, e.g. an ImageNet CNN).

The SAE is spliced at its hook with the error term kept, so only the edited features change the
network: `class_probs(..., edits)` reads the classifier's softmax with the edits in place.

Unlearning follows SAeUron's selection and blocking, with images instead of prompts and no timesteps:
each feature's mean activation over the tokens of a concept's images and of the other images, each
normalised to sum 1; score = concept − other; keep features scoring above the `percentile` (and > 0).
Blocking: where a selected feature fires above its mean over all images, set it to (its mean on the
concept) × `multiplier` (< 0). The selection is an `UnlearnSelection` with a single step, 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import Tensor

from mmsae.encoders.base import Encoder
from mmsae.intervene.edits import Edit, EditContext
from mmsae.intervene.intervention import Intervention, Splice, check_compatible
from mmsae.intervene.unlearn import ConceptFeatures, UnlearnSelection, feature_sums, score_features
from mmsae.legacy_names import legacy_kwargs
from mmsae.sae.base import SAE

STEP = 0  # the one "timestep" of a classifier selection


def require_classify(encoder: Encoder) -> None:
    if not getattr(encoder, "has_classifier", False):
        raise TypeError(
            f"Encoder {encoder.id!r} has no classifier head (classify): use a classifier such as "
            "get_encoder('timm:mobilenetv2_100', pretrained=True)."
        )


@torch.no_grad()
def class_probs(
    encoder: Encoder,
    images: Sequence[Image.Image] | Tensor,
    sae: SAE | None = None,
    edits: Sequence[Edit] = (),
    batch_size: int = 32,
    hook: str | None = None,
) -> Tensor:
    """Softmax [N, K] of the classifier on `images`, with `edits` of `sae` spliced in (error term kept)."""
    require_classify(encoder)
    if edits and sae is None:
        raise ValueError("Edits need the SAE they refer to: pass sae=...")
    intervention = Intervention(encoder, Splice(sae, list(edits), hook=hook)) if edits else None
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        if intervention is None:
            out.append(encoder.classify(batch).float().softmax(-1).cpu())
        else:
            with intervention:
                out.append(encoder.classify(batch).float().softmax(-1).cpu())
    return torch.cat(out)


@torch.no_grad()
def token_means(
    encoder: Encoder, sae: SAE, hook: str, images: Sequence[Image.Image], batch_size: int = 32
) -> Tensor:
    """Mean activation [n] of every feature over all tokens of `images` at `hook` (fp64)."""
    sums = torch.zeros(sae.n_features, dtype=torch.float64)
    count = 0
    for start in range(0, len(images), batch_size):
        acts = encoder.activations(list(images[start : start + batch_size]), [hook])[hook].acts_ND
        x_ND = acts.to(sae.W_dec.device, sae.W_dec.dtype)
        sums += feature_sums(sae.encode(x_ND), sae.n_features).cpu()
        count += x_ND.shape[0]
    return sums / max(count, 1)


def select_class_features(
    encoder: Encoder,
    sae: SAE,
    concepts: Mapping[str, Sequence[Image.Image]],
    other_images: Sequence[Image.Image],
    percentile: float = 99.0,
    hook: str | None = None,
) -> UnlearnSelection:
    """SAeUron's score-based selection on images: each concept's features (see the module docstring).

    A concept's "other" images are `other_images` plus every other concept's images."""
    require_classify(encoder)
    hook = hook or sae.cfg.hook
    if hook is None:
        raise ValueError("The SAE's cfg records no hook point: pass hook='<module path>'.")
    check_compatible(encoder, sae, hook)
    if not concepts or any(len(v) == 0 for v in concepts.values()) or len(other_images) == 0:
        raise ValueError("Give every concept at least one image, and at least one other (retained) image.")
    sets = {**{name: list(v) for name, v in concepts.items()}, "": list(other_images)}
    means = {name: (token_means(encoder, sae, hook, imgs), len(imgs)) for name, imgs in sets.items()}
    return select_from_means(sae, hook, means, percentile, encoder.id)


def select_from_means(
    sae: SAE,
    hook: str,
    means: Mapping[str, tuple[Tensor, int]],
    percentile: float = 99.0,
    encoder_id: str | None = None,
) -> UnlearnSelection:
    """The selection from per-set token means: `means[name]` = (mean activation [n], number of images)
    for every concept and, under "", for the other images."""
    if not 0 < percentile < 100:
        raise ValueError(f"percentile={percentile} must lie strictly between 0 and 100.")
    if "" not in means or len(means) < 2:
        raise ValueError('means needs at least one concept and the other images under "".')

    def mean_of(names: Sequence[str]) -> Tensor:  # image-weighted mean of the sets' token means
        return sum(means[n][0] * means[n][1] for n in names) / sum(means[n][1] for n in names)

    selection = UnlearnSelection(hook, sae.cfg.encoder or encoder_id, sae.n_features, percentile)
    m_all = mean_of(list(means))
    for name in (n for n in means if n):
        score_n = score_features(means[name][0], mean_of([n for n in means if n != name]))
        threshold = torch.quantile(score_n, percentile / 100)
        features = torch.nonzero((score_n > threshold) & (score_n > 0)).flatten()
        selection.concepts[name] = ConceptFeatures(
            {STEP: features.tolist()},
            {STEP: means[name][0][features].tolist()},
            {STEP: m_all[features].tolist()},
        )
    return selection


@dataclass(frozen=True)
class Block(Edit):
    """SAeUron's blocking for one feature: where it fires above `mean_all`, set mean_concept × multiplier."""

    mean_concept: float = 0.0
    mean_all: float = 0.0
    multiplier: float = -5.0
    op: ClassVar[str] = "block"

    def apply(self, f_N: Tensor, ctx: EditContext) -> Tensor:
        blocked = torch.full_like(f_N, self.mean_concept * self.multiplier)
        return torch.where(f_N > self.mean_all, blocked, f_N)


def block_edits(
    selection: UnlearnSelection, concepts: Sequence[str], multiplier: float = -5.0
) -> list[Block]:
    """One `Block` per selected feature of `concepts` (a feature shared by two keeps the first's means)."""
    selection.check_concepts(concepts)
    if multiplier >= 0:
        raise ValueError(f"multiplier={multiplier} must be negative (SAeUron uses −1 … −30).")
    edits: dict[int, Block] = {}
    for name in concepts:
        c = selection.concepts[name]
        for feature, m_c, m_a in zip(c.features[STEP], c.mean_concept[STEP], c.mean_all[STEP]):
            edits.setdefault(feature, Block(feature, m_c, m_a, multiplier))
    return [edits[j] for j in sorted(edits)]


@legacy_kwargs
def steering_edits(features: Sequence[int], strengths: Tensor | Sequence[float]) -> list[Edit]:
    """Adding features: + strength_j · W_dec[j] at every token (a `Direction` edit per feature)."""
    from mmsae.intervene.edits import Direction

    return [Direction(int(j), float(s)) for j, s in zip(features, strengths)]


@legacy_kwargs
def ablation_edits(features: Sequence[int]) -> list[Edit]:
    """Removing features: their codes set to 0 (with the error term kept, x − Σ f_j · W_dec[j])."""
    from mmsae.intervene.edits import Zero

    return [Zero(int(j)) for j in features]


def top1_rate(probs_NK: Tensor, accepted: Sequence[Sequence[int]]) -> float:
    """Share of images whose top-1 class is one of their accepted classes."""
    top = probs_NK.argmax(-1).tolist()
    return sum(t in set(acc) for t, acc in zip(top, accepted)) / max(len(top), 1)


def agreement_rate(probs_NK: Tensor, reference_NK: Tensor) -> float:
    """Share of images whose top-1 class is unchanged from `reference_NK`."""
    return float((probs_NK.argmax(-1) == reference_NK.argmax(-1)).float().mean())


def describe_selection(selection: UnlearnSelection, names: Sequence[Any] | None = None) -> dict[str, list]:
    """Each concept's selected features (with their first logit name when `names` is given)."""
    out: dict[str, list] = {}
    for concept, c in selection.concepts.items():
        features = c.features[STEP]
        out[concept] = [(j, names[j][0].name if names and names[j] else "") for j in features]
    return out


__all__ = [
    "Block",
    "ablation_edits",
    "agreement_rate",
    "block_edits",
    "class_probs",
    "describe_selection",
    "require_classify",
    "select_class_features",
    "select_from_means",
    "steering_edits",
    "token_means",
    "top1_rate",
]
