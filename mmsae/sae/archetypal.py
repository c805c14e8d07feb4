"""Relaxed archetypal SAE (RA-SAE, Fel et al. 2025): atoms are near-convex combinations of data.

Atom i is g·D_i/‖D_i‖ with D = C·A + Λ: A (m×d) are fixed anchors, the k-means centroids of the centred init
sample; each row of C lies on the simplex (softmax or relu-normalised logits); the relaxation Λ is kept within
‖Λ_i‖ ≤ δ after every optimizer step. The archetypal constraint is on the atoms' directions (each lies in the
cone of the data hull); g (`atom_scale`) is one norm for all. Anchoring atoms in the data hull makes
dictionaries far more stable across seeds.

The init sample is `anchor_sample` rows (default max(16·m, 65536)), which the trainer draws from the first
training batches (`init_sample_rows`) and, under DDP, computes on rank 0 and broadcasts. Each atom starts
peaked on one anchor (every anchor gets ⌈n/m⌉ or ⌊n/m⌋ atoms): Adam moves C's logits by about the learning
rate per step, so the dictionary stays near its init for a long time, and atoms that start as blends of many
anchors sit near the anchors' mean, where the SAE barely reconstructs (FVU 0.93 on synthetic data, where
peaked atoms reach 0.31: tests/test_dead_features.py).

Why atoms of one norm: the encoder is TopK, which ranks codes, and an atom's share of a token is code × atom
norm. With atoms of the data's norms (D_i itself, 2 to 35 on DINOv2-S tokens scaled to E‖x‖ = √d) the long
atoms, those of the outlying clusters, need small codes, lose the ranking and die: 45 % of 2048 features after
256 steps there, 4.2 % with atoms of one norm (docs/benchmarks.md, "Dead features on real activations"). Why
g = 1/k: a token's k nearest atoms point nearly the same way, so their k codes sum to about the token only if
each is ≈ ‖x‖/k in atom units; with g = 1/k the encoder rows have unit norm, as TopK's. Putting that 1/k in
the encoder instead (rows of norm ≈ 0.006) failed: Adam's step is about the learning rate per weight whatever
the weight's size, so it rewrote such an encoder within a step (15 % dead after 32 steps). Λ stays in input
units. SAEs saved before `normalize_atoms` existed keep D itself as their dictionary.

Why dead features are re-anchored (`reanchor_dead`): an atom cannot leave its anchor within a run. Adam moves
C's logits by about the learning rate per step and Λ stays within δ, so a feature whose atom is redundant (a
near-copy of another atom, or an anchor whose direction the others already cover) loses the TopK ranking,
and AuxK, which trains its encoder row and its weights by gradient, cannot give it a direction worth firing
for: freezing C changed nothing (28 % dead either way on synthetic data, 390 steps), and on DINOv2-S tokens
18 % of 4096 features died in 600 steps (45 % on a GPU in 976 steps), their atoms at cosine 0.997 from
another atom. So after each optimizer step a dead feature (the trainer's dead clock, as AuxK) is moved onto
the anchor least covered by the live atoms (largest cosine with any of them), the dead features taking the
least-covered anchors in turn: C's row peaked on it as at init (without noise, so every DDP rank computes the
same), Λ_i = 0, and the encoder row along the new atom at the live rows' mean norm with b_enc,i = 0, so it
fires on that anchor's tokens at once. It stays in the data's hull; a feature is re-anchored again each step
until it fires. Same DINOv2-S run: 0.02 % dead, FVU 0.196 against 0.206 (docs/benchmarks.md). Its default dead
window is a 64th of the run, whatever the trainer's default: with a 16th, at full size (8M tokens) features
that died late in the run were still waiting for that verdict when it ended (1.00 % dead on held-out tokens
against 0.37 %).

Why one anchor per atom up to 4096 (`n_anchors`): four atoms per anchor (n = 4096, m = 1024) left near-copies
that re-anchoring can only place on covered anchors: FVU 0.221 against 0.196 with m = n. C is n×m, so m is
capped for wide SAEs.

The encoder is TopK; `W_dec` is computed, so decode, AuxK, save/load and `fold_input_scale` work unchanged
through the base class hooks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from mmsae.sae.base import DeadFeatures, LossOutput, SAEOutput, register
from mmsae.sae.topk import TopKConfig, TopKSAE


@dataclass
class ArchetypalConfig(TopKConfig):
    unit_norm_decoder: bool = False
    n_anchors: int | None = None
    """m, the number of k-means anchors; None = min(n_features, 4096). The init sample needs ≥ m rows."""
    delta: float = 1.0
    """Bound on each relaxation row ‖Λ_i‖, in input units (divided by s when the input scale is folded)."""
    simplex: Literal["softmax", "relu"] = "softmax"
    kmeans_iters: int = 5
    """Passes of mini-batch k-means over the init sample."""
    anchor_sample: int | None = None
    """Rows of training data the anchors are computed from; None = max(16·n_anchors, 65536)."""
    peak: float = 8.0
    """Softmax simplex: init logit of each atom's own anchor over N(0, 1) noise on the others (weight ≈ 0.6
    for m = 1024)."""
    normalize_atoms: bool = True
    """Atoms g·D_i/‖D_i‖ (module docstring); False: g·D_i, as SAEs saved before this option existed."""
    atom_scale: float | None = None
    """g, the norm of every atom; None = 1/k. SAEs saved before it existed: 1."""
    reanchor_dead: bool = True
    """After each optimizer step, move dead features onto the least-covered anchors (module docstring)."""
    LEGACY_DEFAULTS: ClassVar[dict[str, Any]] = {"normalize_atoms": False, "atom_scale": 1.0}

    def __post_init__(self) -> None:
        if self.atom_scale is None and self.k is not None:
            self.atom_scale = 1.0 / self.k
        if self.n_anchors is None:
            self.n_anchors = min(self.n_features, 4096)
        if self.anchor_sample is None:
            self.anchor_sample = max(16 * self.n_anchors, 65536)

    def validate(self) -> None:
        super().validate()
        if self.unit_norm_decoder:
            raise ValueError(
                "Archetypal atoms are anchor mixtures of free norm: set unit_norm_decoder=False."
            )
        if self.simplex not in ("softmax", "relu"):
            raise ValueError(f"simplex={self.simplex!r}: use 'softmax' or 'relu'.")
        if self.atom_scale is None or self.atom_scale <= 0:
            raise ValueError(f"atom_scale={self.atom_scale} must be > 0 (None: 1/k).")
        if self.n_anchors < 1 or self.delta < 0:
            raise ValueError(f"n_anchors={self.n_anchors} must be ≥ 1 and delta={self.delta} ≥ 0.")
        if self.anchor_sample < self.n_anchors or self.kmeans_iters < 0:
            raise ValueError(
                f"anchor_sample={self.anchor_sample} must be ≥ n_anchors={self.n_anchors} and "
                f"kmeans_iters={self.kmeans_iters} ≥ 0."
            )


@torch.no_grad()
def kmeans(x_ND: Tensor, m: int, iters: int, chunk: int = 4096, seed: int = 0) -> Tensor:
    """Mini-batch k-means (Sculley 2010) over `iters` passes of x in chunks; [m, d] centroids.

    Seeded with m distinct random rows, so anchors follow the data's density (k-means++ would favour outliers,
    and its m sequential draws take minutes on a CPU); a fixed seed, so every process computes the same
    anchors from the same sample. Each centroid moves towards the mean of its rows in a chunk with step
    count / (rows seen so far); after each pass a centroid that got no row is reseeded at a random row.
    """
    gen = torch.Generator().manual_seed(seed)
    n = x_ND.shape[0]
    centroids_MD = x_ND[torch.randperm(n, generator=gen)[:m].to(x_ND.device)].float().clone()
    seen_M = torch.zeros(m, dtype=torch.float32, device=x_ND.device)
    for _ in range(iters):
        hit_M = torch.zeros(m, dtype=torch.bool, device=x_ND.device)
        for rows in torch.randperm(n, generator=gen).to(x_ND.device).split(chunk):
            xb_BD = x_ND[rows].float()
            # argmin ‖x − c‖² = argmax x·c − ‖c‖²/2: one matmul, half the cost of cdist.
            assign_B = (xb_BD @ centroids_MD.T - centroids_MD.pow(2).sum(-1) / 2).argmax(dim=-1)
            sums_MD = torch.zeros_like(centroids_MD).index_add_(0, assign_B, xb_BD)
            counts_M = torch.bincount(assign_B, minlength=m).float()
            seen_M += counts_M
            hit_M |= counts_M > 0
            # c ← c + (count / seen)·(mean − c): the running mean of every row assigned to c so far.
            step_M1 = (counts_M / seen_M.clamp_min(1))[:, None]
            centroids_MD += step_M1 * (sums_MD / counts_M.clamp_min(1)[:, None] - centroids_MD)
        empty = (~hit_M).nonzero().squeeze(-1)
        if len(empty):
            fresh = torch.randint(n, (len(empty),), generator=gen).to(x_ND.device)
            centroids_MD[empty] = x_ND[fresh].float()
            seen_M[empty] = 0
    return centroids_MD.to(x_ND.dtype)


ARCHETYPAL_LR_SCALE = 4.0
ARCHETYPAL_FULL_LR_BATCH = 1024


@register("archetypal")
class ArchetypalSAE(TopKSAE):
    Config = ArchetypalConfig
    cfg: ArchetypalConfig
    dead_window_run_fraction = 1 / 64  # re-anchoring waits for the dead clock's verdict (module docstring)
    _dead_N: Tensor | None = None
    """The dead mask `loss` was given this step, for `normalize_decoder` (training state, not the SAE's)."""

    @classmethod
    def default_lr_scale(cls, total_steps: int | None = None, batch_size: int | None = None) -> float:
        """4 × TopK's, × √(batch / 1024) for batches of fewer tokens.

        Adam moves C's logits by about the lr per step, so at TopK's lr the atoms barely leave their anchors.
        On DINOv2-S tokens (n = 4096, k = 32, 8M tokens) ×4 gave a held-out FVU 6-10 % lower at batches
        1024-16384 (0.1686 / 0.1723 / 0.1814 against 0.1799 / 0.1905 / 0.1996) and ≤ 0.02 % dead features,
        where TopK's lr left 1.51 % dead at batch 16384; in 244 steps (1M tokens) 0.81 % dead against 7.52 %.
        Smaller batches' noisier gradients take less: on synthetic data (d = 16, n = 512, k = 8, ~390 steps)
        the best factor was 4 at batch 1024, 2.8-4 at 512, 2-2.8 at 256 and 2 at 128, where 4 left 2 % of
        the features dead (docs/benchmarks.md, "Default recipe")."""
        batch_share = min(1.0, (batch_size or ARCHETYPAL_FULL_LR_BATCH) / ARCHETYPAL_FULL_LR_BATCH)
        return ARCHETYPAL_LR_SCALE * math.sqrt(batch_share)

    def init_decoder(self, atoms_ND: Tensor) -> None:
        m, d = self.cfg.n_anchors, self.cfg.d_in
        anchors_MD = torch.randn(m, d)
        self.register_buffer("anchors", anchors_MD / anchors_MD.norm(dim=-1, keepdim=True))
        # Each atom peaked on one anchor (anchors shared out evenly, in random order): blends of many
        # anchors sit near their mean and die (module docstring).
        n = self.cfg.n_features
        own_N = torch.randperm(n) % m if n >= m else torch.randperm(m)[:n]
        if self.cfg.simplex == "softmax":
            logits_NM = torch.randn(n, m)
            logits_NM[torch.arange(n), own_N] += self.cfg.peak
        else:  # relu weights: the own anchor 1, the others U(0, 1/m), so it keeps about 2/3 of the mass
            logits_NM = torch.rand(n, m) / m
            logits_NM[torch.arange(n), own_N] += 1.0
        self.C = nn.Parameter(logits_NM)
        self.relax = nn.Parameter(torch.zeros(self.cfg.n_features, d))

    def mixing(self) -> Tensor:
        """Rows of C mapped onto the simplex, [n, m]."""
        if self.cfg.simplex == "softmax":
            return self.C.softmax(dim=-1)
        weights_NM = self.C.relu()
        return weights_NM / weights_NM.sum(dim=-1, keepdim=True).clamp_min(1e-12)

    @property
    def W_dec(self) -> Tensor:  # type: ignore[override]
        atoms_ND = self.mixing() @ self.anchors + self.relax
        if self.cfg.normalize_atoms:
            atoms_ND = atoms_ND / atoms_ND.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return atoms_ND * self.cfg.atom_scale

    def init_sample_rows(self) -> int:
        return self.cfg.anchor_sample

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        """b_dec at the sample's geometric median, anchors its centred k-means, W_enc along the atoms."""
        if x.shape[0] < self.cfg.n_anchors:
            raise ValueError(
                f"init sample has {x.shape[0]} rows but n_anchors={self.cfg.n_anchors}: "
                "train on more tokens, or lower n_anchors."
            )
        super().init_from_data(x)
        centred_ND = x.float() - self.b_dec.float()
        self.anchors.copy_(kmeans(centred_ND, self.cfg.n_anchors, self.cfg.kmeans_iters))
        atoms_ND = self.W_dec
        # A token's k nearest atoms point nearly the same way: rows u_i/(k·mean‖W_dec,i‖) (u_i the atom's
        # direction) make those k codes sum to about the token (the plain tied init overshoots by ~k, an FVU
        # in the hundreds). They have unit norm with g = 1/k; one scale for all rows keeps TopK's ranking by
        # cosine.
        norms_N1 = atoms_ND.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        self.W_enc.copy_(atoms_ND / norms_N1 / (self.cfg.k * norms_N1.mean()))

    def loss(
        self, x: Tensor, out: SAEOutput, step: int | Tensor = 0, dead: DeadFeatures | None = None
    ) -> LossOutput:
        # Kept for this step's post-step hook, which re-anchors them (the weights must not change before
        # the backward).
        self._dead_N = None if dead is None else dead.mask
        return super().loss(x, out, step, dead)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        # The trainer's post-step hook: project each Λ_i back into the ball of radius δ, then re-anchor the
        # features that `loss` was told are dead (once: a later call without a loss re-anchors nothing).
        norms_N1 = self.relax.norm(dim=-1, keepdim=True)
        self.relax.mul_((self.cfg.delta / norms_N1.clamp_min(1e-12)).clamp(max=1.0))
        dead_N, self._dead_N = self._dead_N, None
        if dead_N is not None and self.cfg.reanchor_dead:
            self.reanchor(dead_N)

    @torch.no_grad()
    def reanchor(self, dead_N: Tensor) -> None:
        """Move the features in `dead_N` ([n] bool) onto the anchors the live atoms cover least (module
        docstring).

        Fixed shapes and no host sync, so it runs inside a captured CUDA graph step; no randomness, so every
        DDP rank computes the same weights.
        """
        m = self.cfg.n_anchors
        atoms_ND = self.W_dec.float()
        dirs_ND = atoms_ND / atoms_ND.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        anchors_MD = self.anchors.float()
        anchors_MD = anchors_MD / anchors_MD.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        covered_M = (anchors_MD @ dirs_ND.T).masked_fill(dead_N[None], -2.0).amax(dim=-1)
        # The i-th dead feature (in index order) takes the i-th least-covered anchor.
        rank_N = (dead_N.long().cumsum(0) - 1).clamp_min(0) % m
        target_N = covered_M.argsort()[rank_N]
        own = self.cfg.peak if self.cfg.simplex == "softmax" else 1.0
        logits_NM = torch.zeros_like(self.C).scatter_(1, target_N[:, None], own)
        dead_N1 = dead_N[:, None]
        self.C.copy_(torch.where(dead_N1, logits_NM, self.C))
        self.relax.masked_fill_(dead_N1, 0.0)
        # The new atoms' directions without a second n×m×d product: that mixing row puts w_own on the target
        # anchor and w_other on each other one (relu simplex: the target alone).
        if self.cfg.simplex == "softmax":
            w_own, w_other = math.exp(own) / (math.exp(own) + m - 1), 1 / (math.exp(own) + m - 1)
        else:
            w_own, w_other = 1.0, 0.0
        new_ND = (w_own - w_other) * self.anchors.float()[target_N] + w_other * self.anchors.float().sum(0)
        # Encoder rows at the live rows' mean norm (all rows' when none is live): the new feature competes on
        # equal terms.
        weights_N = torch.where(
            (~dead_N).any(), (~dead_N).float(), torch.ones_like(dead_N, dtype=torch.float)
        )
        row_norm = (self.W_enc.float().norm(dim=-1) * weights_N).sum() / weights_N.sum()
        new_ND = new_ND / new_ND.norm(dim=-1, keepdim=True).clamp_min(1e-12) * row_norm
        self.W_enc.copy_(torch.where(dead_N1, new_ND.to(self.W_enc.dtype), self.W_enc))
        self.b_enc.masked_fill_(dead_N, 0.0)

    @torch.no_grad()
    def scale_dictionary(self, factor: float) -> None:
        self.anchors *= factor
        self.relax *= factor
        self.cfg.delta *= factor
        if self.cfg.normalize_atoms:  # the atoms' norm is g alone
            self.cfg.atom_scale *= factor


__all__ = ["ArchetypalConfig", "ArchetypalSAE", "kmeans"]
