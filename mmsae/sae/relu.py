"""ReLU SAE with a decoder-norm-weighted L1 penalty (Anthropic, April 2024 update)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from mmsae.sae.base import (
    SAE,
    DeadLatents,
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

    def validate(self) -> None:
        super().validate()
        if self.l1_coef is not None and self.l1_coef < 0:
            raise ValueError(f"l1_coef={self.l1_coef} must be ≥ 0.")


def weighted_l1(acts_BN: Tensor, W_dec_ND: Tensor) -> Tensor:
    """Σ_i a_i ‖W_dec,i‖ averaged over tokens, in fp32."""
    return (acts_BN.float() * W_dec_ND.float().norm(dim=-1)).sum(-1).mean()


@register("relu")
class ReLUSAE(SAE):
    """f = relu(W_enc(x − b_dec) + b_enc); loss = normalised MSE + λ(step) Σ_i f_i ‖W_dec,i‖."""

    Config = ReLUConfig
    cfg: ReLUConfig

    def encode(self, x: Tensor) -> Tensor:
        return self.pre_acts(x).relu()

    def l1_coef_at(self, step: int) -> float:
        coef = 5.0 / self.cfg.d_in if self.cfg.l1_coef is None else self.cfg.l1_coef
        return coef * linear_warmup(step, self.cfg.l1_warmup_steps)

    def loss(
        self, x: Tensor, out: SAEOutput, step: int | Tensor = 0, dead: DeadLatents | None = None
    ) -> LossOutput:
        mse = normalized_mse(x, out.x_hat)
        l1 = weighted_l1(out.codes, self.W_dec)
        loss = mse + self.l1_coef_at(step) * l1
        return LossOutput(loss, {"mse": mse.detach(), "l1": l1.detach()})


__all__ = ["ReLUConfig", "ReLUSAE", "weighted_l1"]
