"""HierarchicalTopK SAE ("Train one SAE across multiple sparsity budgets"): one model, several k.

Training encodes the sorted top-k_max; the loss is the mean over budgets k_j of the normalised
MSE of the reconstruction from the top-k_j prefix, so every budget is a good SAE by itself.
At inference `encode(x, k)` picks any budget up to k_max.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mmsae import kernels
from mmsae.sae.base import DeadFeatures, LossOutput, SAEOutput, SparseCodes, normalized_mse, register
from mmsae.sae.topk import TopKConfig, TopKSAE


@dataclass
class HierarchicalTopKConfig(TopKConfig):
    ks: tuple[int, ...] = (8, 16, 32)
    k: int | None = None
    """Always max(ks), derived; given explicitly it must agree."""

    def __post_init__(self) -> None:
        self.ks = tuple(sorted(set(self.ks)))  # cfg.json stores a list
        if not self.ks:
            raise ValueError("ks must list at least one sparsity budget, e.g. ks=(8, 16, 32).")
        if self.k is None:
            self.k = self.ks[-1]
        elif self.k != self.ks[-1]:
            raise ValueError(f"k={self.k} must equal max(ks)={self.ks[-1]} (or be left out).")

    def validate(self) -> None:
        super().validate()
        if self.ks[0] < 1:
            raise ValueError(f"Every budget in ks={self.ks} must be ≥ 1.")


@register("hierarchical_topk")
class HierarchicalTopKSAE(TopKSAE):
    Config = HierarchicalTopKConfig
    cfg: HierarchicalTopKConfig

    def _encode(self, x: Tensor, k: int | None = None) -> SparseCodes:
        """Top-k codes sorted by value (largest first); k defaults to max(ks)."""
        k = self.cfg.k if k is None else k
        if not 0 < k <= self.cfg.k:
            raise ValueError(f"k={k} is outside 1..max(ks)={self.cfg.k}, the largest budget trained.")
        values, indices = kernels.topk_encode(
            x, self.W_enc, self.b_enc, self.cfg.k, b_dec=self.b_dec, copies=self.weight_copies
        )
        values, order = values.sort(dim=-1, descending=True)
        indices = indices.gather(-1, order)
        return SparseCodes(values[..., :k], indices[..., :k], self.cfg.n_features)

    def _forward(self, x: Tensor, k: int | None = None) -> SAEOutput:
        codes = self._encode(x, k)
        return SAEOutput(self.decode(codes), codes, {})

    def loss(
        self, x: Tensor, out: SAEOutput, step: int | Tensor = 0, dead: DeadFeatures | None = None
    ) -> LossOutput:
        values, indices, n = out.codes
        budgets = [k for k in self.cfg.ks if k <= values.shape[-1]]
        per_k = torch.stack(
            [
                normalized_mse(x, self.decode(SparseCodes(values[..., :k], indices[..., :k], n)))
                for k in budgets
            ]
        )
        loss = per_k.mean()
        metrics = {f"mse_k{k}": m.detach() for k, m in zip(budgets, per_k)}
        metrics["mse"] = per_k[-1].detach()
        return self.with_auxk(x, out.x_hat, loss, metrics, dead)


__all__ = ["HierarchicalTopKConfig", "HierarchicalTopKSAE"]
