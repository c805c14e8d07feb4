"""SAE quality metrics: reconstruction (FVU, cosine), sparsity (L0, dead fraction, density) and
dictionary recovery against known directions (MMCS, fraction recovered, seed stability).

Streaming accumulators keep float64 sums so that millions of tokens do not lose precision.
Codes may be dense or `SparseCodes`, and may be signed (AbsTopK): "active" means non-zero.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mmsae.sae.base import SAE, Codes, SparseCodes

RECOVERY_THRESHOLD = 0.9


def _tokens(x: Tensor) -> Tensor:
    """[..., d] -> [N, d] in float64."""
    return x.reshape(-1, x.shape[-1]).double()


class FVU:
    """Streaming FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖², with x̄ the mean over *all* tokens seen.

    The total variance is merged batch by batch (Chan et al.) rather than as Σ‖x‖² − N‖x̄‖²,
    which cancels catastrophically when activations have a large mean (residual streams do).
    """

    def __init__(self) -> None:
        self.n_tokens = 0
        self.sq_err = 0.0
        self.mean_D: Tensor | None = None
        self.sq_dev = 0.0  # Σ‖x − x̄‖² over the tokens seen so far

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor) -> None:
        if x.shape != x_hat.shape:
            raise ValueError(f"x has shape {tuple(x.shape)} but x_hat has {tuple(x_hat.shape)}.")
        x_ND, x_hat_ND = _tokens(x), _tokens(x_hat)
        n = x_ND.shape[0]
        if n == 0:
            return
        self.sq_err += (x_ND - x_hat_ND).pow(2).sum().item()
        batch_mean_D = x_ND.mean(0)
        batch_sq_dev = (x_ND - batch_mean_D).pow(2).sum().item()
        if self.mean_D is None:
            self.mean_D, self.sq_dev = batch_mean_D, batch_sq_dev
        else:
            total = self.n_tokens + n
            delta_D = batch_mean_D - self.mean_D.to(batch_mean_D.device)
            self.sq_dev += batch_sq_dev + delta_D.pow(2).sum().item() * self.n_tokens * n / total
            self.mean_D = self.mean_D.to(batch_mean_D.device) + delta_D * (n / total)
        self.n_tokens += n

    def compute(self) -> float:
        if self.n_tokens == 0:
            raise ValueError("FVU.compute() called before any update(): feed at least one batch.")
        return self.sq_err / max(self.sq_dev, 1e-300)

    def explained_variance(self) -> float:
        return 1.0 - self.compute()


def explained_variance(x: Tensor, x_hat: Tensor) -> float:
    """1 − FVU on one batch."""
    fvu = FVU()
    fvu.update(x, x_hat)
    return fvu.explained_variance()


def cosine(x: Tensor, x_hat: Tensor, eps: float = 1e-12) -> Tensor:
    """Per-token cos(x, x̂), shape [N] (float64)."""
    x_ND, x_hat_ND = _tokens(x), _tokens(x_hat)
    num = (x_ND * x_hat_ND).sum(-1)
    return num / (x_ND.norm(dim=-1) * x_hat_ND.norm(dim=-1)).clamp_min(eps)


def active_mask(codes: Codes) -> tuple[Tensor, Tensor | None]:
    """(non-zero mask, feature indices or None for dense codes), flattened to tokens."""
    if isinstance(codes, SparseCodes):
        k = codes.values.shape[-1]
        return codes.values.reshape(-1, k) != 0, codes.indices.reshape(-1, k)
    return codes.reshape(-1, codes.shape[-1]) != 0, None


def l0_tensor(codes: Codes) -> Tensor:
    """Mean number of non-zero features per token, left on the device (no host sync in training loops)."""
    active, _ = active_mask(codes)
    return active.sum(-1).double().mean()


def l0(codes: Codes) -> float:
    """Mean number of non-zero features per token (signed codes count as active when < 0)."""
    return l0_tensor(codes).item()


class FeatureDensity:
    """Per-feature firing counts over a token window: density, dead fraction, log10 histogram.

    A feature is dead *for this window* if it never fired in it; evaluate on at least ~10/p tokens
    to tell a rare feature (density p) from a dead one.
    """

    def __init__(self, n_features: int) -> None:
        self.fires_N = torch.zeros(n_features, dtype=torch.float64)
        self.n_tokens = 0

    @torch.no_grad()
    def update(self, codes: Codes) -> None:
        active, indices = active_mask(codes)
        if indices is None:
            counts = active.sum(0).double().cpu()
        else:
            counts = torch.bincount(indices[active].cpu(), minlength=self.fires_N.numel()).double()
        self.fires_N += counts
        self.n_tokens += active.shape[0]

    def density(self) -> Tensor:
        """Firing frequency per feature, [n] float64."""
        return self.fires_N / max(self.n_tokens, 1)

    def dead_fraction(self) -> float:
        if self.n_tokens == 0:
            raise ValueError("FeatureDensity has seen no tokens: call update() first.")
        return (self.fires_N == 0).double().mean().item()

    def log10_histogram(self, bins: int = 50) -> tuple[np.ndarray, np.ndarray]:
        """(counts, bin edges) of log10 density over features that fired at least once."""
        return log10_density_histogram(self.density(), bins)


def log10_density_histogram(density: Tensor, bins: int = 50) -> tuple[np.ndarray, np.ndarray]:
    alive = density[density > 0].double().cpu().numpy()
    if alive.size == 0:
        return np.zeros(bins, dtype=np.int64), np.linspace(-10, 0, bins + 1)
    return np.histogram(np.log10(alive), bins=bins)


def plot_density(
    density: Tensor, path: str | os.PathLike | None = None, bins: int = 50, title: str = "Feature density"
) -> bytes:
    """Histogram of log10 firing density as PNG bytes (also written atomically to `path` if given)."""
    # The object-oriented Agg API: no pyplot global state, no display needed, thread-safe.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts, edges = log10_density_histogram(density, bins)
    n_dead = int((density == 0).sum())
    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.stairs(counts, edges, fill=True)
    ax.set_xlabel("log10 firing density")
    ax.set_ylabel("features")
    ax.set_title(f"{title} ({n_dead} dead of {density.numel()})")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    png = buf.getvalue()
    if path is not None:
        from mmsae.fileio import atomic_write_bytes

        atomic_write_bytes(Path(path), png)
    return png


def _unit_rows(w: Tensor) -> Tensor:
    w = w.detach().double()
    return w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def max_cosine(features_FD: Tensor, atoms_ND: Tensor, absolute: bool = False, chunk: int = 1024) -> Tensor:
    """For each known direction, the best cosine with any atom, [F] (chunked: F×n can be large).

    `absolute=True` compares |cos|: an SAE with signed codes may store a direction as −g.
    """
    feats, atoms = _unit_rows(features_FD), _unit_rows(atoms_ND).to(features_FD.device)
    if feats.shape[-1] != atoms.shape[-1]:
        raise ValueError(f"Features have d={feats.shape[-1]} but atoms have d={atoms.shape[-1]}.")
    out = []
    for block in feats.split(chunk):
        cos = block @ atoms.T
        out.append((cos.abs() if absolute else cos).max(-1).values)
    return torch.cat(out)


def mmcs(features_FD: Tensor, atoms_ND: Tensor, absolute: bool = False) -> float:
    """Mean max cosine similarity: mean over known directions g of max_i cos(g, d_i)."""
    return max_cosine(features_FD, atoms_ND, absolute).mean().item()


def fraction_recovered(
    features_FD: Tensor, atoms_ND: Tensor, threshold: float = RECOVERY_THRESHOLD, absolute: bool = False
) -> float:
    """Share of known directions with some atom at cosine > threshold."""
    return (max_cosine(features_FD, atoms_ND, absolute) > threshold).double().mean().item()


@torch.no_grad()
def seed_stability(atoms_a_ND: Tensor, atoms_b_MD: Tensor) -> float:
    """Mean cosine of a one-to-one (Hungarian) matching between two dictionaries (min(N, M) pairs)."""
    from scipy.optimize import linear_sum_assignment

    cos = (_unit_rows(atoms_a_ND) @ _unit_rows(atoms_b_MD).to(atoms_a_ND.device).T).cpu().numpy()
    rows, cols = linear_sum_assignment(cos, maximize=True)
    return float(cos[rows, cols].mean())


@torch.no_grad()
def evaluate(
    sae: SAE, batches: Iterable[Tensor], features: Tensor | None = None, threshold: float = RECOVERY_THRESHOLD
) -> dict[str, float]:
    """Run `sae` (in eval mode) over `batches` ([..., d] each) and report quality metrics.

    Keys: fvu, explained_variance, cosine, l0, dead_fraction (over the evaluated tokens), n_tokens;
    with known `features` [F, d] also mmcs and fraction_recovered. If any code was negative
    (AbsTopK-style signed codes) an atom's sign is arbitrary, so recovery compares |cos|.
    """
    device = sae.W_dec.device
    fvu, density = FVU(), FeatureDensity(sae.n_features)
    cos_sum, l0_sum, signed = 0.0, 0.0, False
    was_training = sae.training
    sae.eval()
    try:
        for x in batches:
            x_ND = x.reshape(-1, x.shape[-1]).to(device)
            out = sae(x_ND)
            fvu.update(x_ND, out.x_hat)
            density.update(out.codes)
            cos_sum += cosine(x_ND, out.x_hat).sum().item()
            l0_sum += l0(out.codes) * x_ND.shape[0]
            values = out.codes.values if isinstance(out.codes, SparseCodes) else out.codes
            signed = signed or bool((values < 0).any())
    finally:
        sae.train(was_training)
    n = fvu.n_tokens
    if n == 0:
        raise ValueError("evaluate() got no tokens: `batches` was empty.")
    result = {
        "fvu": fvu.compute(),
        "explained_variance": fvu.explained_variance(),
        "cosine": cos_sum / n,
        "l0": l0_sum / n,
        "dead_fraction": density.dead_fraction(),
        "n_tokens": float(n),
    }
    if features is not None:
        best_F = max_cosine(features.to(device), sae.W_dec, absolute=signed)
        result["mmcs"] = best_F.mean().item()
        result["fraction_recovered"] = (best_F > threshold).double().mean().item()
    return result


__all__ = [
    "FVU",
    "RECOVERY_THRESHOLD",
    "FeatureDensity",
    "active_mask",
    "cosine",
    "evaluate",
    "explained_variance",
    "fraction_recovered",
    "l0",
    "log10_density_histogram",
    "max_cosine",
    "mmcs",
    "plot_density",
    "seed_stability",
]
