"""Measured effects of SAE features on a real image classifier, end to end and offline.

The pipeline shared by `benchmarks/bench_effects.py`, the effects tests and `mmsae demo`:
real photos (foolbox's ImageNet samples, the labelled scikit-image photos, interior photos) →
augmented crops → activations of a classifier (e.g. the zoo's MobileNetV2) at a hook → TopK SAE →
logit names → concept search by class name, steering and SAeUron unlearning, each with its number.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from mmsae.analysis.logit_naming import (
    features_named,
    label_agreement,
    name_features_by_logits,
    typical_activations,
)
from mmsae.analysis.naming import NameCandidate
from mmsae.datasets.images import Example, ExampleDataset, RandomCrops
from mmsae.encoders.base import Encoder
from mmsae.intervene.classifier import (
    ablation_edits,
    block_edits,
    class_probs,
    select_from_means,
    steering_edits,
    top1_rate,
)
from mmsae.intervene.unlearn import feature_sums
from mmsae.sae import SAE
from mmsae.sae.base import as_dense


@dataclass
class Photo:
    image: Image.Image
    labels: tuple[str, ...] = ()
    """Correct ImageNet class names (first = the label); empty = unlabelled."""
    name: str = ""


class PhotoList(ExampleDataset):
    """In-memory photos as an image data set (the base of `RandomCrops`)."""

    def __init__(self, photos: Sequence[Photo]):
        self.photos = list(photos)

    def __len__(self) -> int:
        return len(self.photos)

    def __getitem__(self, index: int) -> Example:
        self._check_index(index)
        return Example(index, image=self.photos[index].image)

    def fingerprint(self) -> str:
        return "|".join(p.name for p in self.photos)


def real_photos(interior: bool = True) -> list[Photo]:
    """foolbox's 20 ImageNet samples and the labelled scikit-image photos (labelled), interior photos."""
    from mmsae.datasets.photos import (
        SKIMAGE_IMAGENET_LABELS,
        FoolboxSamples,
        InteriorPhotos,
        LabeledSkimagePhotos,
    )

    fool, sk = FoolboxSamples("imagenet"), LabeledSkimagePhotos()
    photos = [Photo(fool[i].image, (fool.label_name(i),), f"foolbox-{i}") for i in range(len(fool))]
    photos += [Photo(sk[i].image, SKIMAGE_IMAGENET_LABELS[n], n) for i, n in enumerate(sk.names)]
    if interior:
        rooms = InteriorPhotos()
        photos += [Photo(rooms[i].image, (), f"interior-{i}") for i in range(len(rooms))]
    return photos


def crops_of(photos: Sequence[Photo], n: int, seed: int = 0, size: int = 224) -> list[Photo]:
    """`n` augmented crops (cycling over `photos`), each resized to `size` and carrying its photo's labels."""
    crops = RandomCrops(PhotoList(photos), n=n, scale=(0.35, 1.0), seed=seed)
    out = []
    for i in range(n):
        src = photos[i % len(photos)]
        out.append(Photo(crops[i].image.resize((size, size), Image.BICUBIC), src.labels, src.name))
    return out


@dataclass
class EffectsConfig:
    hook: str = "global_pool"
    n_crops: int = 256
    n_features: int = 256
    k: int = 16
    tokens: int = 40_000
    batch_size: int = 256
    references: int = 8
    """Crops whose activations serve as the base of the logit effects."""
    steer_multiple: float = 10.0
    """Steering adds each feature at this multiple of its typical activation."""
    name_rank: int = 1
    """Steering uses the features with the target among their first `name_rank` logit names (where
    none has, those with it among their first five)."""
    percentile: float = 99.0
    multiplier: float = -5.0
    seed: int = 0
    targets: tuple[str, ...] = ("espresso", "Egyptian cat")


@dataclass
class TrainedSAE:
    sae: SAE
    crops: list[Photo]
    acts_NTD: Tensor
    """Activations of every crop at the hook, [N, T, D]."""
    names: list[list[NameCandidate]] = field(default_factory=list)

    @property
    def pooled_Nn(self) -> Tensor:
        N, T, _ = self.acts_NTD.shape
        codes = as_dense(self.sae.encode(self.acts_NTD.flatten(0, 1).to(self.sae.W_dec.dtype))).float()
        return codes.view(N, T, -1).amax(1)


@torch.no_grad()
def hook_activations(encoder: Encoder, images: Sequence[Image.Image], hook: str, batch: int = 32) -> Tensor:
    """[N, T, D] activations of every token of `images` at `hook`."""
    out = []
    for start in range(0, len(images), batch):
        chunk = list(images[start : start + batch])
        acts = encoder.activations(chunk, [hook])[hook].acts_ND.float().cpu()
        out.append(acts.view(len(chunk), -1, acts.shape[-1]))
    return torch.cat(out)


def train_sae(encoder: Encoder, cfg: EffectsConfig, photos: Sequence[Photo] | None = None) -> TrainedSAE:
    """Crops → activations → TopK SAE (in memory) → logit names of every feature."""
    from mmsae import train

    crops = crops_of(photos if photos is not None else real_photos(), cfg.n_crops, cfg.seed)
    acts_NTD = hook_activations(encoder, [c.image for c in crops], cfg.hook)
    sae = train(
        acts_NTD.flatten(0, 1),
        sae="topk",
        n_features=cfg.n_features,
        k=cfg.k,
        tokens=cfg.tokens,
        batch_size=cfg.batch_size,
        hook=cfg.hook,
        encoder=encoder.id,
        seed=cfg.seed,
        warmup_steps=10,
        devices=1,
    ).eval()
    trained = TrainedSAE(sae, crops, acts_NTD)
    g = torch.Generator().manual_seed(cfg.seed)
    refs = acts_NTD[torch.randperm(len(crops), generator=g)[: cfg.references]]
    scales_n = typical_activations(sae, acts_NTD.flatten(0, 1))  # every crop: rare features get names
    trained.names = name_features_by_logits(sae, encoder, refs, hook=cfg.hook, scales_n=scales_n)
    return trained


def sae_metrics(t: TrainedSAE) -> dict[str, float]:
    """FVU, L0, dead fraction on the training crops, and logit-name / top-image label agreement."""
    from mmsae.metrics import evaluate

    m = evaluate(t.sae, [t.acts_NTD.flatten(0, 1)])
    labels = [c.labels for c in t.crops]
    pooled = t.pooled_Nn
    agree1, counted = label_agreement(t.names, pooled, labels, rank=1)
    agree5, _ = label_agreement(t.names, pooled, labels, rank=5)
    return {
        "fvu": m["fvu"],
        "l0": m["l0"],
        "dead_fraction": m["dead_fraction"],
        "name_agreement_top1": agree1,
        "name_agreement_top5": agree5,
        "features_with_labelled_images": counted,
    }


def search_by_name(t: TrainedSAE, pooled_Nn: Tensor, query: str, k: int = 5, rank: int = 1) -> list[int]:
    """Images (rows of `pooled_Nn`) ranked by the summed codes of the features with `query` among their
    first `rank` logit names."""
    features = features_named(t.names, query, rank)
    if not features:
        return []
    score = pooled_Nn[:, features].sum(-1)
    order = score.argsort(descending=True, stable=True)
    return [int(i) for i in order[:k] if score[i] > 0]


def precision_at_k(
    t: TrainedSAE, encoder: Encoder, photos: Sequence[Photo], query: str, k: int = 1, rank: int = 1
) -> float:
    """Share of the top-`k` photos for `query` (by the features with it among their first `rank` logit
    names) that show it."""
    acts = hook_activations(encoder, [p.image for p in photos], t.sae.cfg.hook)
    codes = as_dense(t.sae.encode(acts.flatten(0, 1))).float().view(len(photos), acts.shape[1], -1)
    hits = search_by_name(t, codes.amax(1), query, k, rank)
    return sum(query in photos[i].labels for i in hits) / k


def class_index(encoder: Encoder, name: str) -> int:
    return list(encoder.class_names).index(name)


def steering_effect(
    t: TrainedSAE, encoder: Encoder, target: str, photos: Sequence[Photo], cfg: EffectsConfig
) -> dict[str, Any]:
    """Mean Δp(target): adding the features named `target` on photos that are not it; ablating them on
    photos that are. Error term kept."""
    features = features_named(t.names, target, cfg.name_rank) or features_named(t.names, target, 5)
    c = class_index(encoder, target)
    is_x = [target in p.labels for p in photos]
    pos = [p.image for p, x in zip(photos, is_x) if x]
    neg = [p.image for p, x in zip(photos, is_x) if not x]
    result: dict[str, Any] = {"target": target, "features": features}
    if not features:
        return {**result, "add_delta": float("nan"), "ablate_delta": float("nan")}
    scale = typical_activations(t.sae, t.acts_NTD.flatten(0, 1))[features] * cfg.steer_multiple
    add = steering_edits(features, scale)
    base_neg, base_pos = class_probs(encoder, neg)[:, c], class_probs(encoder, pos)[:, c]
    result["add_delta"] = float((class_probs(encoder, neg, t.sae, add)[:, c] - base_neg).mean())
    result["ablate_delta"] = float(
        (class_probs(encoder, pos, t.sae, ablation_edits(features))[:, c] - base_pos).mean()
    )
    result["p_neg_before"], result["p_pos_before"] = float(base_neg.mean()), float(base_pos.mean())
    return result


def crop_means(t: TrainedSAE, concepts: Sequence[str]) -> dict[str, tuple[Tensor, int]]:
    """Token-mean activation of every feature over the training crops of each concept and of the rest
    (the input of SAeUron's selection), from the activations already at hand."""
    groups = [next((n for n in concepts if c.labels[:1] == (n,)), "") for c in t.crops]
    out = {}
    for name in [*concepts, ""]:
        rows = [i for i, g in enumerate(groups) if g == name]
        if not rows:
            raise ValueError(f"No training crop shows {name or 'anything else'!r}: add photos of it.")
        x_ND = t.acts_NTD[rows].flatten(0, 1).to(t.sae.W_dec.dtype)
        sums = feature_sums(t.sae.encode(x_ND), t.sae.n_features).cpu()
        out[name] = (sums / x_ND.shape[0], len(rows))
    return out


def unlearning_effect(
    t: TrainedSAE,
    encoder: Encoder,
    concepts: Sequence[str],
    held_out: Sequence[Photo],
    others: Sequence[Photo],
    cfg: EffectsConfig,
) -> dict[str, Any]:
    """SAeUron on the classifier: select on the training crops, block, measure on held-out crops.

    `held_out`: crops of the concepts' photos (top-1 on them should fall); `others`: the other labelled
    photos (their top-1 correctness should stay)."""
    selection = select_from_means(t.sae, t.sae.cfg.hook, crop_means(t, concepts), cfg.percentile, encoder.id)
    edits = block_edits(selection, list(concepts), cfg.multiplier)
    idx = [class_index(encoder, n) for n in concepts]
    mine = [c for c in held_out if c.labels and c.labels[0] in concepts]
    accepted_mine = [[class_index(encoder, c.labels[0])] for c in mine]
    accepted_other = [[class_index(encoder, n) for n in p.labels] for p in others]
    imgs_mine, imgs_other = [c.image for c in mine], [p.image for p in others]
    before = top1_rate(class_probs(encoder, imgs_mine), accepted_mine)
    after = top1_rate(class_probs(encoder, imgs_mine, t.sae, edits), accepted_mine)
    other_before = top1_rate(class_probs(encoder, imgs_other), accepted_other)
    other_after = top1_rate(class_probs(encoder, imgs_other, t.sae, edits), accepted_other)
    return {
        "concepts": list(concepts),
        "classes": idx,
        "features": sorted({e.feature for e in edits}),
        "top1_before": before,
        "top1_after": after,
        "drop": 1 - after / before if before else float("nan"),
        "other_before": other_before,
        "other_after": other_after,
        "other_kept": other_after / other_before if other_before else float("nan"),
    }
