"""JumpReLU SAE (Rajamanoharan et al. 2024) with rectangle-kernel straight-through estimators.

f = z·1[z > θ] with z = W_enc(x − b_dec) + b_enc and a raw (not log) per-feature threshold θ.
The step has no useful gradient, so both JumpReLU and the L0 count use pseudo-derivatives
evaluated at the *pre-activations* z (dictionary_learning #55 applied them to f):
    ∂JumpReLU/∂θ = −(θ/ε)·K((z − θ)/ε),   ∂H(z − θ)/∂θ = −(1/ε)·K((z − θ)/ε),   K = 1[|u| < ½].
They are the exact θ-derivatives of the objective with z smoothed by a width-ε box (tested).
With `ste_inputs` (the default, as in Anthropic's January 2025 recipe) the same pseudo-derivatives,
sign flipped, also reach z and through it W_enc and b_enc: a feature just below θ on a token it would
help learns to fire there, one just above on a token it hurts learns not to. Without that (the paper's
STE) only θ sees the jump, and on the synthetic benchmark most tokens' best features stayed below θ and
never trained (23 % vs 49 % of the features recovered at 2M tokens, docs/benchmarks.md).
θ stays an fp32 Parameter: in bf16 its small updates round away and it silently stops learning.
Units: the trainer scales inputs to E‖x‖ = √d, where a random unit encoder row gives pre-activations of
std ≈ 1 whatever d is; `threshold_init` and `bandwidth` are in those units.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

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


def rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def widen(t: Tensor, theta: Tensor) -> Tensor:
    """`t` in θ's precision (at least fp32): comparisons with θ and its gradient never run in bf16."""
    return t.to(torch.promote_types(t.dtype, theta.dtype))


class JumpReLUFunction(torch.autograd.Function):
    """z·1[z > θ]; ∂/∂θ = −(θ/ε)·K((z − θ)/ε) (θ broadcast over leading dims).

    ∂/∂z = 1[z > θ], plus (θ/ε)·K((z − θ)/ε) (the jump's pseudo-derivative) when `ste_inputs`.
    """

    @staticmethod
    def forward(ctx: Any, z: Tensor, theta: Tensor, bandwidth: float, ste_inputs: bool = False) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth, ctx.ste_inputs = bandwidth, ste_inputs
        return z * (widen(z, theta) > theta).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, Tensor, None, None]:
        z, theta = ctx.saved_tensors
        z_wide, eps = widen(z, theta), ctx.bandwidth
        grad_z = grad_out * (z_wide > theta).to(grad_out.dtype)
        grad_theta = -(theta / eps) * rectangle((z_wide - theta) / eps) * widen(grad_out, theta)
        if ctx.ste_inputs:
            grad_z = grad_z - grad_theta.to(grad_z.dtype)  # the jump moves with z − θ: opposite signs
        return grad_z, grad_theta.reshape(-1, theta.shape[-1]).sum(0), None, None


class StepFunction(torch.autograd.Function):
    """1[z > θ]; ∂/∂θ = −(1/ε)·K((z − θ)/ε); ∂/∂z = +(1/ε)·K((z − θ)/ε) with `ste_inputs`, else none
    (the paper)."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, theta: Tensor, bandwidth: float, ste_inputs: bool = False) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth, ctx.ste_inputs = bandwidth, ste_inputs
        return (widen(z, theta) > theta).to(theta.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, Tensor, None, None]:
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = -(1.0 / eps) * rectangle((widen(z, theta) - theta) / eps) * widen(grad_out, theta)
        grad_z = -grad_theta.to(z.dtype) if ctx.ste_inputs else None
        return grad_z, grad_theta.reshape(-1, theta.shape[-1]).sum(0), None, None


@dataclass
class JumpReLUConfig(SAEConfig):
    threshold_init: float = 1.0
    """Initial θ, in the trainer's input units (pre-activation std ≈ 1). The paper's 0.001 is meant for
    inputs scaled to E‖x‖² = 1: here θ would have to climb ~2000× at ≤ lr per Adam step while the encoder
    moves much faster (L0 still 64 for a target of 4 after 0.5M tokens); 0.1 left 83 % of features dead,
    2.0 recovered 35 % of the features against 49 % for 1.0 (synthetic benchmark, docs/benchmarks.md)."""
    bandwidth: float = 1.0
    """ε, the width of the rectangle kernel, in the same units. The paper's 0.001 (for E‖x‖² = 1) lets
    almost no token into the window here; among 0.1, 0.5, 1.0 and 2.0, 1.0 recovered the most features."""
    ste_inputs: bool = True
    """Pseudo-derivatives of the jump also reach the pre-activations (see the module docstring)."""
    min_threshold: float = 1e-6
    """θ is clamped to at least this after every optimizer step (raw θ must stay positive)."""
    sparsity_coef: float | None = None
    """None = 1.0 with `target_l0` (0.01 left L0 at 18.9 for a target of 4: the quadratic penalty's pull
    vanishes near the target, so it must be strong to land there), else 1e-3 (coefficient of L0)."""
    sparsity_warmup_steps: int = 100
    """The sparsity coefficient rises linearly from 0 over this many steps (0 = no warm-up). 2000 spanned the
    whole 2M-token benchmark run and recovered 40 % of the features against 49 % for 100 (target_l0=4)."""
    target_l0: float | None = None
    """If set, the penalty is sparsity_coef·(L0/target_l0 − 1)² instead of sparsity_coef·L0."""
    LEGACY_DEFAULTS: ClassVar[dict[str, Any]] = {"ste_inputs": False}
    """Checkpoints from before `ste_inputs` existed resume training with the paper's STE."""

    def validate(self) -> None:
        super().validate()
        if self.bandwidth <= 0 or self.threshold_init <= 0 or self.min_threshold <= 0:
            raise ValueError("bandwidth, threshold_init and min_threshold must be positive.")
        if self.sparsity_coef is not None and self.sparsity_coef < 0:
            raise ValueError(f"sparsity_coef={self.sparsity_coef} must be ≥ 0 (None picks the default).")
        if self.target_l0 is not None and not 0 < self.target_l0 <= self.n_features:
            raise ValueError(f"target_l0={self.target_l0} must be in (0, n_features={self.n_features}].")


@register("jumprelu")
class JumpReLUSAE(SAE):
    Config = JumpReLUConfig
    cfg: JumpReLUConfig

    def __init__(self, cfg: JumpReLUConfig):
        super().__init__(cfg)
        self.threshold = nn.Parameter(torch.full((cfg.n_features,), cfg.threshold_init, dtype=torch.float32))

    def _encode(self, x: Tensor) -> Tensor:
        return self.jump(self.pre_acts(x))

    def jump(self, pre_BN: Tensor) -> Tensor:
        return JumpReLUFunction.apply(pre_BN, self.threshold, self.cfg.bandwidth, self.cfg.ste_inputs)

    def _forward(self, x: Tensor) -> SAEOutput:
        pre_BN = self.pre_acts(x)
        codes_BN = self.jump(pre_BN)
        return SAEOutput(self.decode(codes_BN), codes_BN, {"pre_acts": pre_BN})

    def sparsity_coef_at(self, step: int) -> float:
        coef = self.cfg.sparsity_coef
        if coef is None:
            coef = 1.0 if self.cfg.target_l0 is not None else 1e-3
        return coef * linear_warmup(step, self.cfg.sparsity_warmup_steps)

    def loss(
        self, x: Tensor, out: SAEOutput, step: int | Tensor = 0, dead: DeadFeatures | None = None
    ) -> LossOutput:
        mse = normalized_mse(x, out.x_hat)
        fires_BN = StepFunction.apply(
            out.aux["pre_acts"], self.threshold, self.cfg.bandwidth, self.cfg.ste_inputs
        )
        l0 = fires_BN.sum(-1).mean()
        penalty = l0 if self.cfg.target_l0 is None else (l0 / self.cfg.target_l0 - 1).pow(2)
        loss = mse + self.sparsity_coef_at(step) * penalty
        return LossOutput(loss, {"mse": mse.detach(), "l0": l0.detach()})

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        # The trainer's post-step hook: also keep the raw threshold positive.
        super().normalize_decoder()
        self.threshold.clamp_(min=self.cfg.min_threshold)


__all__ = ["JumpReLUConfig", "JumpReLUFunction", "JumpReLUSAE", "StepFunction"]
