"""Relaxed archetypal SAE (RA-SAE, Fel et al. 2025): atoms are near-convex combinations of data.

D = C·A + Λ: A (m×d) are fixed anchors, the k-means centroids of the centred init sample; each row
of C lies on the simplex (softmax or relu-normalised logits); the relaxation Λ is kept within
‖Λ_i‖ ≤ δ after every optimizer step. Anchoring atoms in the data hull makes dictionaries far more
stable across seeds. The encoder is TopK; `W_dec` is computed, so decode, AuxK, save/load and
`fold_input_scale` work unchanged through the base class hooks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from mmsae.sae.base import register
from mmsae.sae.topk import TopKConfig, TopKSAE


@dataclass
class ArchetypalConfig(TopKConfig):
    unit_norm_decoder: bool = False
    n_anchors: int | None = None
    """m, the number of k-means anchors; None = min(n_latents, 1024). The init sample needs ≥ m rows."""
    delta: float = 1.0
    """Bound on each relaxation row ‖Λ_i‖, in input units (divided by s when the input scale is folded)."""
    simplex: Literal["softmax", "relu"] = "softmax"
    kmeans_iters: int = 25

    def __post_init__(self) -> None:
        if self.n_anchors is None:
            self.n_anchors = min(self.n_latents, 1024)

    def validate(self) -> None:
        super().validate()
        if self.unit_norm_decoder:
            raise ValueError(
                "Archetypal atoms are anchor mixtures of free norm: set unit_norm_decoder=False."
            )
        if self.simplex not in ("softmax", "relu"):
            raise ValueError(f"simplex={self.simplex!r}: use 'softmax' or 'relu'.")
        if self.n_anchors < 1 or self.delta < 0:
            raise ValueError(f"n_anchors={self.n_anchors} must be ≥ 1 and delta={self.delta} ≥ 0.")


@torch.no_grad()
def kmeans(x_ND: Tensor, m: int, iters: int) -> Tensor:
    """Lloyd's k-means; [m, d] centroids. An empty cluster keeps its previous centroid."""
    centroids_MD = x_ND[torch.randperm(x_ND.shape[0], device=x_ND.device)[:m]].clone()
    for _ in range(iters):
        assign_N = torch.cdist(x_ND, centroids_MD).argmin(dim=-1)
        sums_MD = torch.zeros_like(centroids_MD).index_add_(0, assign_N, x_ND)
        counts_M = torch.bincount(assign_N, minlength=m).to(x_ND.dtype)
        filled = counts_M > 0
        centroids_MD[filled] = sums_MD[filled] / counts_M[filled, None]
    return centroids_MD


@register("archetypal")
class ArchetypalSAE(TopKSAE):
    Config = ArchetypalConfig
    cfg: ArchetypalConfig

    def init_decoder(self, atoms_ND: Tensor) -> None:
        m, d = self.cfg.n_anchors, self.cfg.d_in
        anchors_MD = torch.randn(m, d)
        self.register_buffer("anchors", anchors_MD / anchors_MD.norm(dim=-1, keepdim=True))
        # Peaked random mixtures: near-uniform ones would make every atom the anchors' mean.
        logits_NM = 3.0 * torch.randn(self.cfg.n_latents, m)
        self.C = nn.Parameter(logits_NM.abs() if self.cfg.simplex == "relu" else logits_NM)
        self.relax = nn.Parameter(torch.zeros(self.cfg.n_latents, d))

    def mixing(self) -> Tensor:
        """Rows of C mapped onto the simplex, [n, m]."""
        if self.cfg.simplex == "softmax":
            return self.C.softmax(dim=-1)
        weights_NM = self.C.relu()
        return weights_NM / weights_NM.sum(dim=-1, keepdim=True).clamp_min(1e-12)

    @property
    def W_dec(self) -> Tensor:  # type: ignore[override]
        return self.mixing() @ self.anchors + self.relax

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        if x.shape[0] < self.cfg.n_anchors:
            raise ValueError(
                f"init sample has {x.shape[0]} rows but n_anchors={self.cfg.n_anchors}: "
                "pass a larger sample or lower n_anchors."
            )
        super().init_from_data(x)
        centred_ND = x.float() - self.b_dec.float()
        self.anchors.copy_(kmeans(centred_ND, self.cfg.n_anchors, self.cfg.kmeans_iters))
        atoms_ND = self.W_dec
        self.W_enc.copy_(atoms_ND / atoms_ND.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        # The trainer's post-step hook: project each Λ_i back into the ball of radius δ.
        norms_N1 = self.relax.norm(dim=-1, keepdim=True)
        self.relax.mul_((self.cfg.delta / norms_N1.clamp_min(1e-12)).clamp(max=1.0))

    @torch.no_grad()
    def scale_dictionary(self, factor: float) -> None:
        self.anchors *= factor
        self.relax *= factor
        self.cfg.delta *= factor


__all__ = ["ArchetypalConfig", "ArchetypalSAE", "kmeans"]
