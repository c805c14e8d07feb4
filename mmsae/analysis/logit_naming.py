"""Logit naming: name an SAE's features by what they do to a classifier's logits.

For an encoder with a classifier head (`encoder.has_classifier`, e.g. an ImageNet CNN), a feature's
decoder atom is pushed through the rest of the network and the head (`encoder.logits_from_hook`):

    effect_j = mean_b [ logits(x_b + s_j · W_dec[j]) − logits(x_b) ]

added at every token of reference activations x_b of the hook, with s_j the feature's typical
activation. After a linear head (the pooled features) this is exact and the same for every x_b; after
a spatial block it is the finite-difference effect through the remaining non-linear layers. The
classes with the largest logit increase name the feature — next to the CLIP-text names of naming.py,
and usable where no text tower exists.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor

from mmsae.analysis.naming import NameCandidate
from mmsae.encoders.base import Encoder
from mmsae.sae import SAE
from mmsae.sae.base import as_dense


def require_classifier(encoder: Encoder) -> None:
    if not getattr(encoder, "has_classifier", False):
        raise TypeError(
            f"Encoder {encoder.id!r} has no classifier head: logit naming needs a model with one, e.g. "
            "get_encoder('timm:mobilenetv2_100', pretrained=True) after `mmsae zoo install`."
        )


@torch.no_grad()
def typical_activations(sae: SAE, acts_ND: Tensor) -> Tensor:
    """Mean non-zero activation of every feature over `acts_ND` [n]; 0 for features that never fire."""
    codes_Nn = as_dense(sae.encode(acts_ND.to(sae.W_dec.device, sae.W_dec.dtype))).float()
    on_n = (codes_Nn > 0).sum(0)
    return torch.where(on_n > 0, codes_Nn.sum(0) / on_n.clamp_min(1), 0.0).cpu()


@torch.no_grad()
def logit_effects(
    sae: SAE,
    encoder: Encoder,
    acts_BTD: Tensor,
    scales_n: Tensor | None = None,
    hook: str | None = None,
    chunk: int = 32,
) -> Tensor:
    """Logit change [n, K] of adding each feature's atom × its scale at every token of `acts_BTD`.

    `acts_BTD` are reference activations of the SAE's hook, every token as `to_tokens` gives it (a few
    images suffice: after a linear head every reference gives the same effect). `scales_n` default: the
    features' typical activation on these references (features that never fire there get scale 1)."""
    require_classifier(encoder)
    hook = hook or sae.cfg.hook
    if hook is None:
        raise ValueError("The SAE's cfg records no hook point: pass hook='<module path>'.")
    if acts_BTD.ndim != 3 or acts_BTD.shape[-1] != sae.d_in:
        raise ValueError(
            f"acts_BTD must be [B, T, {sae.d_in}] activations of {hook!r}, got {tuple(acts_BTD.shape)}."
        )
    device = encoder.device
    base_BTD = acts_BTD.to(device=device, dtype=torch.float32)
    if scales_n is None:
        scales_n = typical_activations(sae, base_BTD.flatten(0, 1))
        scales_n = torch.where(scales_n > 0, scales_n, 1.0)
    atoms_nD = sae.W_dec.detach().to(device, torch.float32) * scales_n.to(device)[:, None]
    logits0_BK = encoder.logits_from_hook(hook, base_BTD).float()
    B = base_BTD.shape[0]
    out = []
    for start in range(0, sae.n_features, chunk):
        a_cD = atoms_nD[start : start + chunk]
        c = a_cD.shape[0]
        x_cBTD = base_BTD[None] + a_cD[:, None, None, :]  # every (feature, reference) pair
        logits = encoder.logits_from_hook(hook, x_cBTD.flatten(0, 1)).float().view(c, B, -1)
        out.append((logits - logits0_BK[None]).mean(1).cpu())
    return torch.cat(out)


def logit_names(
    effects_nK: Tensor, class_names: Sequence[str], top: int = 5, live: Tensor | None = None
) -> list[list[NameCandidate]]:
    """The `top` classes by logit increase for each feature (score = logit change); empty where not `live`."""
    if effects_nK.shape[-1] != len(class_names):
        raise ValueError(
            f"Effects have {effects_nK.shape[-1]} classes but {len(class_names)} class names were given."
        )
    scores, idx = effects_nK.float().topk(min(top, len(class_names)), dim=-1)
    live_n = live if live is not None else torch.ones(len(effects_nK), dtype=torch.bool)
    return [
        [NameCandidate(class_names[j], float(s)) for s, j in zip(sc.tolist(), ix.tolist())] if ok else []
        for sc, ix, ok in zip(scores, idx, live_n.tolist())
    ]


def name_features_by_logits(
    sae: SAE,
    encoder: Encoder,
    acts_BTD: Tensor,
    top: int = 5,
    hook: str | None = None,
    scales_n: Tensor | None = None,
) -> list[list[NameCandidate]]:
    """Logit names of every feature of `sae` from reference activations [B, T, D] of its hook.

    `scales_n`: each feature's typical activation (default: on the references; pass it from a larger
    pass so that rare features get a name). Features with scale 0 never fired and get no name."""
    require_classifier(encoder)
    if scales_n is None:
        scales_n = typical_activations(sae, acts_BTD.flatten(0, 1))
    effects = logit_effects(sae, encoder, acts_BTD, torch.where(scales_n > 0, scales_n, 1.0), hook)
    return logit_names(effects, encoder.class_names, top, live=scales_n > 0)


def features_named(names: Sequence[Sequence[NameCandidate]], label: str, rank: int = 1) -> list[int]:
    """Features with `label` (case-insensitive) among their first `rank` names, strongest effect first."""
    want = label.strip().lower()
    hits = [
        (cands[r].score, j)
        for j, cands in enumerate(names)
        for r in range(min(rank, len(cands)))
        if cands[r].name.lower() == want
    ]
    return [j for _, j in sorted(hits, reverse=True)]


def label_agreement(
    names: Sequence[Sequence[NameCandidate]],
    pooled_Nn: Tensor,
    labels: Sequence[Sequence[str]],
    top_images: int = 5,
    rank: int = 1,
) -> tuple[float, int]:
    """How often a feature's logit name agrees with the labels of its top-activating images.

    `pooled_Nn`: per-image codes (e.g. max over tokens); `labels[i]`: the correct class names of image i
    (empty = unlabelled). A feature counts when some of its `top_images` images (activation > 0) are
    labelled; it agrees when one of its first `rank` names is the most frequent label among them.
    Returns (agreement fraction, number of features counted)."""
    if pooled_Nn.shape[0] != len(labels):
        raise ValueError(f"{pooled_Nn.shape[0]} images of codes but {len(labels)} label lists.")
    agree = counted = 0
    k = min(top_images, pooled_Nn.shape[0])
    for j, cands in enumerate(names):
        values, ids = pooled_Nn[:, j].float().topk(k)
        found = [labels[int(i)] for v, i in zip(values, ids) if v > 0 and labels[int(i)]]
        if not found or not cands:
            continue
        counts = Counter(name.lower() for names_i in found for name in set(names_i))
        majority = {name for name, c in counts.items() if c == max(counts.values())}
        counted += 1
        agree += any(c.name.lower() in majority for c in cands[:rank])
    return (agree / counted if counted else 0.0), counted


__all__ = [
    "features_named",
    "label_agreement",
    "logit_effects",
    "logit_names",
    "name_features_by_logits",
    "require_classifier",
    "typical_activations",
]
