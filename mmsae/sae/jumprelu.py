"""JumpReLU SAE (Rajamanoharan et al. 2024) with rectangle-kernel straight-through estimators.

f = z·1[z > θ] with z = W_enc(x − b_dec) + b_enc and a raw (not log) per-latent threshold θ.
The step has no useful gradient in θ, so both JumpReLU and the L0 count use pseudo-derivatives
evaluated at the *pre-activations* z (dictionary_learning #55 applied them to f):
    ∂JumpReLU/∂θ = −(θ/ε)·K((z − θ)/ε),   ∂H(z − θ)/∂θ = −(1/ε)·K((z − θ)/ε),   K = 1[|u| < ½].
They are the exact θ-derivatives of the objective with z smoothed by a width-ε box (tested).
θ stays an fp32 Parameter: in bf16 its small updates round away and it silently stops learning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mmsae.sae.base import SAE, LossOutput, SAEConfig, SAEOutput, linear_warmup, normalized_mse, register


def rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def widen(t: Tensor, theta: Tensor) -> Tensor:
    """`t` in θ's precision (at least fp32): comparisons with θ and its gradient never run in bf16."""
    return t.to(torch.promote_types(t.dtype, theta.dtype))


class JumpReLUFunction(torch.autograd.Function):
    """z·1[z > θ]; ∂/∂z = 1[z > θ], ∂/∂θ = −(θ/ε)·K((z − θ)/ε) (θ broadcast over leading dims)."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return z * (widen(z, theta) > theta).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, Tensor, None]:
        z, theta = ctx.saved_tensors
        z_wide, eps = widen(z, theta), ctx.bandwidth
        grad_z = grad_out * (z_wide > theta).to(grad_out.dtype)
        grad_theta = -(theta / eps) * rectangle((z_wide - theta) / eps) * widen(grad_out, theta)
        return grad_z, grad_theta.reshape(-1, theta.shape[-1]).sum(0), None


class StepFunction(torch.autograd.Function):
    """1[z > θ]; no gradient to z (as in the paper), ∂/∂θ = −(1/ε)·K((z − θ)/ε)."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return (widen(z, theta) > theta).to(theta.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[None, Tensor, None]:
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = -(1.0 / eps) * rectangle((widen(z, theta) - theta) / eps) * widen(grad_out, theta)
        return None, grad_theta.reshape(-1, theta.shape[-1]).sum(0), None


@dataclass
class JumpReLUConfig(SAEConfig):
    threshold_init: float = 0.001
    bandwidth: float = 0.001
    """ε, the width of the rectangle kernel (0.001–0.05 in the literature)."""
    min_threshold: float = 1e-6
    """θ is clamped to at least this after every optimizer step (raw θ must stay positive)."""
    sparsity_coef: float = 1e-3
    sparsity_warmup_steps: int = 2000
    """The sparsity coefficient rises linearly from 0 over this many steps (0 = no warm-up)."""
    target_l0: float | None = None
    """If set, the penalty is sparsity_coef·(L0/target_l0 − 1)² instead of sparsity_coef·L0."""

    def validate(self) -> None:
        super().validate()
        if self.bandwidth <= 0 or self.threshold_init <= 0 or self.min_threshold <= 0:
            raise ValueError("bandwidth, threshold_init and min_threshold must be positive.")
        if self.target_l0 is not None and not 0 < self.target_l0 <= self.n_latents:
            raise ValueError(f"target_l0={self.target_l0} must be in (0, n_latents={self.n_latents}].")


@register("jumprelu")
class JumpReLUSAE(SAE):
    Config = JumpReLUConfig
    cfg: JumpReLUConfig

    def __init__(self, cfg: JumpReLUConfig):
        super().__init__(cfg)
        self.threshold = nn.Parameter(torch.full((cfg.n_latents,), cfg.threshold_init, dtype=torch.float32))

    def encode(self, x: Tensor) -> Tensor:
        return JumpReLUFunction.apply(self.pre_acts(x), self.threshold, self.cfg.bandwidth)

    def forward(self, x: Tensor) -> SAEOutput:
        self.check_input(x)
        pre_BN = self.pre_acts(x)
        codes_BN = JumpReLUFunction.apply(pre_BN, self.threshold, self.cfg.bandwidth)
        return SAEOutput(self.decode(codes_BN), codes_BN, {"pre_acts": pre_BN})

    def loss(self, x: Tensor, out: SAEOutput, step: int = 0) -> LossOutput:
        mse = normalized_mse(x, out.x_hat)
        l0 = StepFunction.apply(out.aux["pre_acts"], self.threshold, self.cfg.bandwidth).sum(-1).mean()
        penalty = l0 if self.cfg.target_l0 is None else (l0 / self.cfg.target_l0 - 1).pow(2)
        coef = self.cfg.sparsity_coef * linear_warmup(step, self.cfg.sparsity_warmup_steps)
        return LossOutput(mse + coef * penalty, {"mse": mse.detach(), "l0": l0.detach()})

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        # The trainer's post-step hook: also keep the raw threshold positive.
        super().normalize_decoder()
        self.threshold.clamp_(min=self.cfg.min_threshold)


__all__ = ["JumpReLUConfig", "JumpReLUFunction", "JumpReLUSAE", "StepFunction"]
