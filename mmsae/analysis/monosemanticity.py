"""Monosemanticity score (sae-for-vlm) in linear time, streamed over images.

Definition, with ã_k(i) the min-max normalised activation of feature k on image i and s_ij the
cosine of image embeddings from a *separate* image encoder:

    MS_k = Σ_{i<j} ã_k(i) ã_k(j) s_ij / Σ_{i<j} ã_k(i) ã_k(j).

With unit embeddings p̂_i and V_k = Σ_i ã_k(i) p̂_i this is (‖V_k‖² − Σ ã²) / ((Σ ã)² − Σ ã²).
Min and max are only known at the end, so the pass keeps raw-activation moments and expands
ã = (a − m)/(M − m): V_k ∝ S_k − m·P with S_k = Σ_i a_k(i) p̂_i and P = Σ_i p̂_i; the common
1/(M − m)² factor cancels in the ratio. Memory is O(n·E), time O(N·n·E).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mmsae.analysis.images import ImageLike, embed_images, pooled_codes, stack_pixels
from mmsae.argorder import encoder_and_sae
from mmsae.datasets.images import open_image
from mmsae.encoders.base import Encoder, TokenMode
from mmsae.sae import SAE


class MonosemanticityAccumulator:
    """Streams (image activations [B, n], unit image embeddings [B, E]) into per-feature MS scores."""

    def __init__(self, n_features: int, embed_dim: int, device: str | torch.device = "cpu"):
        f64 = {"dtype": torch.float64, "device": device}
        self.S_nE = torch.zeros(n_features, embed_dim, **f64)  # Σ_i a_k(i) p̂_i
        self.P_E = torch.zeros(embed_dim, **f64)  # Σ_i p̂_i
        self.sum_a = torch.zeros(n_features, **f64)
        self.sum_a2 = torch.zeros(n_features, **f64)
        self.min_a = torch.full((n_features,), torch.inf, **f64)
        self.max_a = torch.full((n_features,), -torch.inf, **f64)
        self.n_images = 0

    @torch.no_grad()
    def update(self, acts_Bn: Tensor, embeds_BE: Tensor) -> None:
        if acts_Bn.shape[0] != embeds_BE.shape[0]:
            raise ValueError(f"{acts_Bn.shape[0]} activation rows but {embeds_BE.shape[0]} embeddings.")
        a, p = acts_Bn.double().to(self.S_nE.device), embeds_BE.double().to(self.S_nE.device)
        p = p / p.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        self.S_nE += a.T @ p
        self.P_E += p.sum(0)
        self.sum_a += a.sum(0)
        self.sum_a2 += a.pow(2).sum(0)
        self.min_a = torch.minimum(self.min_a, a.min(0).values)
        self.max_a = torch.maximum(self.max_a, a.max(0).values)
        self.n_images += a.shape[0]

    def compute(self) -> Tensor:
        """MS_k per feature, float32 [n]; NaN where undefined (never fired, or fired on one image only)."""
        m, N = self.min_a, self.n_images
        V = self.S_nE - m[:, None] * self.P_E  # (M − m)·V_k
        sum_t = self.sum_a - N * m  # (M − m)·Σ ã
        sum_t2 = self.sum_a2 - 2 * m * self.sum_a + N * m.pow(2)  # (M − m)²·Σ ã²
        num = V.pow(2).sum(-1) - sum_t2
        den = sum_t.pow(2) - sum_t2
        live = (self.max_a > m) & (den > 1e-12 * sum_t.pow(2).clamp_min(1e-300))
        return torch.where(live, num / den.clamp_min(1e-300), torch.nan).float().cpu()


def monosemanticity_pairwise(acts_Nn: Tensor, embeds_NE: Tensor) -> Tensor:
    """The O(N²) definition, for validation on small data only."""
    a = acts_Nn.double()
    lo, hi = a.min(0).values, a.max(0).values
    t = (a - lo) / (hi - lo).where(hi > lo, torch.ones_like(hi))
    p = embeds_NE.double() / embeds_NE.double().norm(dim=-1, keepdim=True)
    s = p @ p.T
    iu = torch.triu_indices(len(a), len(a), offset=1)
    w = t[iu[0]] * t[iu[1]]  # [pairs, n]
    num, den = (w * s[iu[0], iu[1]][:, None]).sum(0), w.sum(0)
    return torch.where(
        (hi > lo) & (den > 0), num / den.where(den > 0, torch.ones_like(den)), torch.nan
    ).float()


@torch.no_grad()
def monosemanticity(
    encoder: Encoder,
    sae: SAE,
    embedder: Encoder,
    images: Sequence[ImageLike],
    hook: str | None = None,
    tokens: TokenMode = "all",
    pool: str = "max",
    batch_size: int = 32,
) -> Tensor:
    """MS scores [n] of `sae` (reading `hook` of `encoder`) on `images`, similarity from `embedder`.

    The embedder should differ from the encoder the SAE reads (sae-for-vlm uses DINOv2 for CLIP SAEs);
    any encoder with `encode_image` works.
    """
    encoder, sae = encoder_and_sae(encoder, sae, "monosemanticity")
    hook = hook or sae.cfg.hook or encoder.default_hook
    acc: MonosemanticityAccumulator | None = None
    for start in tqdm(range(0, len(images), batch_size), desc="monosemanticity", unit="batch"):
        pil = [open_image(p) for p in images[start : start + batch_size]]
        acts = encoder.activations(stack_pixels(encoder, pil), [hook], tokens=tokens)[hook]
        a_Bn = pooled_codes(sae, acts, len(pil), pool)
        p_BE = embed_images(embedder, stack_pixels(embedder, pil))
        if acc is None:
            acc = MonosemanticityAccumulator(sae.n_features, p_BE.shape[-1], device=a_Bn.device)
        acc.update(a_Bn, p_BE)
    if acc is None:
        raise ValueError("No images given: the monosemanticity score needs at least two images.")
    return acc.compute()
