"""ReLU SAE with a decoder-norm-weighted L1 penalty (Anthropic, April 2024 update)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mmsae.sae.base import (
    SAE,
    DeadFeatures,
    LossOutput,
    SAEConfig,
    SAEOutput,
    linear_warmup,
    normalized_mse,
    register,
)


@dataclass
class ReLUConfig(SAEConfig):
    unit_norm_decoder: bool = False
    """Free atom norms: the penalty is weighted by ‖W_dec,i‖, so shrinking atoms cannot game it."""
    l1_coef: float | None = None
    """λ; None = 5 / d_in: Anthropic's λ=5 for inputs scaled to E‖x‖=√d, divided by the d that
    normalised MSE divides out."""
    l1_warmup_steps: int = 2000
    """λ rises linearly from 0 over this many steps (0 = no warm-up)."""
    target_l0: float | None = None
    """If set, λ is calibrated while training so that the batch L0 settles at this value: every step λ is
    multiplied by exp(l0_adapt_rate · clamp(L0 / target_l0 − 1, −1, 1)); `l1_coef` is then λ's start."""
    l0_adapt_rate: float = 0.01
    """Step of log λ per training step at a relative L0 error of 1 (with `target_l0`)."""

    def validate(self) -> None:
        super().validate()
        if self.l1_coef is not None and self.l1_coef < 0:
            raise ValueError(f"l1_coef={self.l1_coef} must be ≥ 0.")
        if self.target_l0 is not None and not 0 < self.target_l0 <= self.n_features:
            raise ValueError(f"target_l0={self.target_l0} must be in (0, n_features={self.n_features}].")
        if self.l0_adapt_rate <= 0:
            raise ValueError(f"l0_adapt_rate={self.l0_adapt_rate} must be > 0.")


def weighted_l1(acts_BN: Tensor, W_dec_ND: Tensor) -> Tensor:
    """Σ_i a_i ‖W_dec,i‖ averaged over tokens, in fp32."""
    return (acts_BN.float() * W_dec_ND.float().norm(dim=-1)).sum(-1).mean()


@register("relu")
class ReLUSAE(SAE):
    """f = relu(W_enc(x − b_dec) + b_enc); loss = normalised MSE + λ(step) Σ_i f_i ‖W_dec,i‖."""

    Config = ReLUConfig
    cfg: ReLUConfig

    def __init__(self, cfg: ReLUConfig):
        super().__init__(cfg)
        # λ's calibrated multiplier under `target_l0`; saved only then (older checkpoints lack it).
        self.register_buffer("l1_scale", torch.ones(()), persistent=cfg.target_l0 is not None)

    def _encode(self, x: Tensor) -> Tensor:
        return self.pre_acts(x).relu()

    def l1_coef_at(self, step: int) -> float | Tensor:
        coef = 5.0 / self.cfg.d_in if self.cfg.l1_coef is None else self.cfg.l1_coef
        coef = coef * linear_warmup(step, self.cfg.l1_warmup_steps)
        # A copy: calibrate() updates the buffer in place after the loss has used it.
        return coef if self.cfg.target_l0 is None else coef * self.l1_scale.clone()

    @torch.no_grad()
    def calibrate(self, active_BN: Tensor) -> None:
        """Move λ towards `target_l0` from this batch's L0 (features with active_BN > 0); on the device."""
        if self.cfg.target_l0 is None or not self.training:
            return
        l0 = (active_BN > 0).float().sum(-1).mean()
        error = (l0 / self.cfg.target_l0 - 1).clamp(-1.0, 1.0)
        self.l1_scale.mul_(torch.exp(self.cfg.l0_adapt_rate * error))

    def loss(
        self, x: Tensor, out: SAEOutput, step: int | Tensor = 0, dead: DeadFeatures | None = None
    ) -> LossOutput:
        mse = normalized_mse(x, out.x_hat)
        l1 = weighted_l1(out.codes, self.W_dec)
        loss = mse + self.l1_coef_at(step) * l1
        self.calibrate(out.codes)
        return LossOutput(loss, {"mse": mse.detach(), "l1": l1.detach()})


__all__ = ["ReLUConfig", "ReLUSAE", "weighted_l1"]
