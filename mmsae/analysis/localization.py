"""Do features fire on the object or on the background? Energy-in-box scores against a random baseline.

For a photo with a hand-drawn object box (`mmsae.analysis.objects`), a feature's energy in the box is the
share of its activation mass on the photo (Σ over patches of max(a, 0)) that falls inside the box. Per
object, the `k` features with the most mass inside the box (the features that describe the object most)
are scored: a feature of the object keeps its mass there, a feature of the whole scene (texture, light,
position) spreads it over the background. The same rule scores a baseline basis of random directions (as
many as the SAE has features, activation max((x − x̄)·d, 0), x̄ the mean training token), so the two differ
only in the basis; the box's area fraction is what a feature blind to the object would score on average.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from mmsae.analysis.heatmap import patch_codes, sae_encoder
from mmsae.analysis.objects import ObjectBox, box_coverage, load_photo, model_view
from mmsae.encoders.base import Encoder
from mmsae.sae import SAE

Encode = Callable[[Tensor], Tensor]


def energy_in_box(codes_HWn: Tensor, coverage_HW: np.ndarray) -> Tensor:
    """Share of each feature's positive activation mass inside the box, [n] (NaN for silent features)."""
    pos_HWn = codes_HWn.clamp_min(0)
    mass_n = pos_HWn.sum((0, 1))
    inside_n = (pos_HWn * torch.as_tensor(coverage_HW)[..., None]).sum((0, 1))
    return torch.where(mass_n > 0, inside_n / mass_n.clamp_min(1e-30), torch.nan)


def random_directions(d: int, n: int, center_D: Tensor, seed: int = 0) -> Encode:
    """`encode` of `n` random unit directions: max((x − center)·d, 0), the baseline basis."""
    gen = torch.Generator().manual_seed(seed)
    dirs_nD = torch.randn(n, d, generator=gen)
    dirs_nD /= dirs_nD.norm(dim=1, keepdim=True)
    center = center_D.float().cpu()
    return lambda x_ND: ((x_ND.float().cpu() - center) @ dirs_nD.T).clamp_min(0)


def sae_and_random(sae: SAE, center_D: Tensor, seed: int = 0) -> dict[str, Encode]:
    """The two bases compared: the SAE's features and as many random directions."""
    return {"sae": sae_encoder(sae), "random": random_directions(sae.d_in, sae.n_features, center_D, seed)}


@dataclass
class BasisScore:
    """One basis' `k` features with the most mass inside an object box, their energy in it and their maps."""

    features: list[int]
    energy: list[float]
    maps: list[np.ndarray] = field(repr=False)

    @property
    def mean(self) -> float:
        return float(np.mean(self.energy)) if self.energy else float("nan")


@dataclass
class ObjectScore:
    """Localization on one object: the box's area fraction and each basis' top features' energy in it."""

    obj: ObjectBox
    area: float
    bases: dict[str, BasisScore]
    view: Image.Image = field(repr=False)
    """The photo as the model sees it; `coverage` [H, W] is the share of each patch inside the box."""
    coverage: np.ndarray = field(repr=False)


def top_inside(codes_HWn: Tensor, coverage_HW: np.ndarray, k: int) -> BasisScore:
    """Score the `k` features with the largest activation mass inside the box (silent ones never)."""
    inside_n = (codes_HWn.clamp_min(0) * torch.as_tensor(coverage_HW)[..., None]).sum((0, 1))
    top = inside_n.topk(min(k, inside_n.numel())).indices
    top = top[inside_n[top] > 0]
    energy = energy_in_box(codes_HWn[..., top], coverage_HW)
    maps = [codes_HWn[..., j].numpy() for j in top.tolist()]
    return BasisScore(top.tolist(), energy.tolist(), maps)


@torch.no_grad()
def localization_scores(
    encoder: Encoder, hook: str, bases: dict[str, Encode], objects: Sequence[ObjectBox], k: int = 3
) -> list[ObjectScore]:
    """Per object: its box's area fraction and, per basis (name → encode), its top-k features' energy."""
    if not bases or not objects:
        raise ValueError("localization_scores needs at least one basis and one object box.")
    photos = {spec: load_photo(spec) for spec in dict.fromkeys(o.photo for o in objects)}
    images = list(photos.values())
    codes = {name: dict(zip(photos, patch_codes(enc, encoder, images, hook))) for name, enc in bases.items()}
    scores = []
    for obj in objects:
        per_basis = {name: c[obj.photo] for name, c in codes.items()}
        grid = next(iter(per_basis.values())).shape[:2]
        coverage = box_coverage(encoder, photos[obj.photo], obj, (int(grid[0]), int(grid[1])))
        scored = {name: top_inside(c, coverage, k) for name, c in per_basis.items()}
        view = model_view(encoder, photos[obj.photo])
        scores.append(ObjectScore(obj, float(coverage.mean()), scored, view, coverage))
    return scores


def mean_energy(scores: Sequence[ObjectScore], basis: str) -> float:
    """Mean over objects of a basis' mean top-k energy in the box."""
    return float(np.mean([s.bases[basis].mean for s in scores]))


def format_table(scores: Sequence[ObjectScore], k: int) -> str:
    """Markdown table: per object its box's area fraction and each basis' mean top-k energy in the box."""
    names = list(scores[0].bases)
    head = "| object | photo | box area | " + " | ".join(f"{n}: top-{k} energy in box" for n in names)
    rows = [head + " | " + f"{names[0]} features |", "|---|---|---:|" + "---:|" * len(names) + "---|"]
    for s in scores:
        vals = " | ".join(f"{s.bases[n].mean:.2f}" for n in names)
        feats = ", ".join(str(f) for f in s.bases[names[0]].features)
        rows.append(f"| {s.obj.label} | `{s.obj.photo}` | {s.area:.2f} | {vals} | {feats} |")
    means = " | ".join(f"**{mean_energy(scores, n):.2f}**" for n in names)
    rows.append(f"| **mean** | | **{np.mean([s.area for s in scores]):.2f}** | {means} | |")
    return "\n".join(rows)
