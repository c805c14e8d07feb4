"""BatchTopK SAE (Bussmann et al. 2024): top B·k activations over the whole batch, JumpReLU at inference."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mmsae.sae.base import register
from mmsae.sae.topk import TopKConfig, TopKSAE


@dataclass
class BatchTopKConfig(TopKConfig):
    threshold_decay: float = 0.99
    """θ ← decay·θ + (1 − decay)·(smallest kept activation of the batch).

    A ~100-step horizon: activations shrink a lot early in training, and a 0.999 EMA (dictionary_learning's
    choice) still remembers those large early minima after 1000 steps, leaving θ too high at inference
    (held-out L0 far below k).
    """

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.threshold_decay < 1.0:
            raise ValueError(f"threshold_decay={self.threshold_decay} must be in [0, 1).")


@register("batchtopk")
class BatchTopKSAE(TopKSAE):
    """Training keeps the B·k largest relu(pre-activations) of the batch (so k is an average per token).

    The fp32 buffer `threshold` tracks an EMA of the smallest kept positive activation; in eval
    mode f = z·1[z > θ], which does not depend on what else is in the batch. Codes are dense [B, n].
    """

    Config = BatchTopKConfig
    cfg: BatchTopKConfig

    def __init__(self, cfg: BatchTopKConfig):
        super().__init__(cfg)
        # 0 = not yet estimated; the first training batch sets it directly.
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float32))

    def encode(self, x: Tensor) -> Tensor:
        acts_BN = self.pre_acts(x).relu()
        if not self.training:
            return acts_BN * (acts_BN > self.threshold)
        return self.batch_topk(acts_BN)

    def batch_topk(self, acts_BN: Tensor) -> Tensor:
        """Keep the k·B largest entries of `acts_BN` (any leading shape) and update θ."""
        flat = acts_BN.flatten()
        n_keep = self.cfg.k * (flat.numel() // self.cfg.n_latents)
        values, indices = flat.topk(n_keep, sorted=False)
        self.update_threshold(values)
        return torch.zeros_like(flat).scatter(0, indices, values).view_as(acts_BN)

    @torch.no_grad()
    def update_threshold(self, kept_values: Tensor) -> None:
        # fp32 whatever the autocast dtype, and no host sync: a batch with nothing positive leaves θ alone.
        with torch.autocast(device_type=kept_values.device.type, enabled=False):
            kept = kept_values.float()
            batch_min = kept.masked_fill(kept <= 0, float("inf")).min()
            ema = self.threshold.lerp(batch_min, 1.0 - self.cfg.threshold_decay)
            ema = torch.where(self.threshold > 0, ema, batch_min)
            self.threshold.copy_(torch.where(batch_min.isfinite(), ema, self.threshold))


__all__ = ["BatchTopKConfig", "BatchTopKSAE"]
