"""ReLU SAE with a decoder-norm-weighted L1 penalty (Anthropic, April 2024 update)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

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
from mmsae.sae.ranks import sum_over_ranks

DEFAULT_L1_WARMUP_STEPS = 2000
L0_ADAPT_RATE = 0.03
"""`target_l0`'s integral gain in runs of at most `L0_ADAPT_FULL_RATE_STEPS` steps."""
L0_ADAPT_FULL_RATE_STEPS = 1600
"""Longer runs divide the gain by √(steps / this), as the default lr's short-run boost falls."""
L0_ADAPT_RATE_UNKNOWN_RUN = 0.01


@dataclass
class ReLUConfig(SAEConfig):
    unit_norm_decoder: bool = False
    """Free atom norms: the penalty is weighted by ‖W_dec,i‖, so shrinking atoms cannot game it."""
    l1_coef: float | None = None
    """λ; None = 5 / d_in: Anthropic's λ=5 for inputs scaled to E‖x‖=√d, divided by the d that
    normalised MSE divides out."""
    l1_warmup_steps: int | None = None
    """λ rises linearly from 0 over this many steps (0 = no warm-up). None = 2000; with `target_l0`, a tenth
    of the run (at most 2000) once the trainer knows its length: a 2000-step warm-up left λ far too low in a
    192-step run (held-out L0 93 for a target of 16 on DINOv2-S tokens, docs/benchmarks.md)."""
    target_l0: float | None = None
    """If set, λ is calibrated while training so that the batch L0 settles at this value (`calibrate`): after
    the warm-up, log λ moves by l0_adapt_rate · e + l0_damping · (e − e_prev) per step, e = log(L0 /
    target_l0) clipped to ±1 (a PI controller on log λ); `l1_coef` (times the warm-up) is λ's start. Held-out
    L0 can sit above the training batches' (new images fire more features)."""
    l0_adapt_rate: float | None = None
    """The integral gain (with `target_l0`): log λ's step at an L0 e times the target. None = 0.03 ×
    min(1, √(1600 / run steps)) once the trainer knows the run's length (else 0.01). The weights follow λ
    with a lag, longer where the lr is lower: the default lr falls ∝ 1/√steps in runs of more than ~1600
    steps (`mmsae.sae.lr`), and a gain that outruns the lag overshoots."""
    l0_damping: float = 1.0
    """The gain on log L0's change (with `target_l0`): λ falls as soon as L0 falls, before L0 passes the
    target. L0 follows λ late and lopsidedly: a ReLU feature pushed below zero on every token gets no gradient
    to come back, so an undershoot is slow to undo. With λ's start ~4× too high (l1_coef 0.05 on DINOv2-S
    tokens, 192 steps, target 16), relu ended at held-out L0 4.6 without damping, 17.3 with it
    (docs/benchmarks.md, "`target_l0` for the L1-penalty variants")."""

    restart_adam: bool | None = None
    """With `target_l0`: Adam's moments and step counts of all the SAE's weights restart from zero when λ's
    warm-up ends. Its second moment otherwise keeps the large gradients of the first, nearly dense steps for
    ~1/(1 − β₂) = 1000 steps, so in a short run each encoder bias moved by a small fraction of the lr per step
    and the encoder could not follow λ. At n = 4096 (192 steps of 1024 DINOv2-S tokens, target 32) relu ended
    at L0 42.3 on training photos, 32.8 with the restart, at held-out FVU 0.329 (0.391 without it at L0 34.8,
    a target of 26); gated at 35.2, 31.5 with it, FVU 0.262 (0.314 at L0 32.0). At n = 1024 (target 16) it
    lowers FVU too but leaves more features dead (relu 16 % against 7 %): rare features are no longer held
    back by the dense steps' moment (docs/benchmarks.md, "`target_l0` for the L1-penalty variants"). None =
    in runs of at most `L0_ADAPT_FULL_RATE_STEPS` steps once the trainer knows the run's length: longer runs
    already landed (L0 31.4 for 32 in 1953 steps) and were not measured with it."""

    def validate(self) -> None:
        super().validate()
        if self.l1_coef is not None and self.l1_coef < 0:
            raise ValueError(f"l1_coef={self.l1_coef} must be ≥ 0.")
        if self.target_l0 is not None and not 0 < self.target_l0 <= self.n_features:
            raise ValueError(f"target_l0={self.target_l0} must be in (0, n_features={self.n_features}].")
        if self.l0_adapt_rate is not None and self.l0_adapt_rate <= 0:
            raise ValueError(f"l0_adapt_rate={self.l0_adapt_rate} must be > 0.")
        if self.l0_damping < 0:
            raise ValueError(f"l0_damping={self.l0_damping} must be ≥ 0.")


def weighted_l1(acts_BN: Tensor, W_dec_ND: Tensor) -> Tensor:
    """Σ_i a_i ‖W_dec,i‖ averaged over tokens, in fp32."""
    return (acts_BN.float() * W_dec_ND.float().norm(dim=-1)).sum(-1).mean()


def batch_l0(active_BN: Tensor) -> Tensor:
    """Features with active_BN > 0 per token, averaged over the batch, in fp32; over all ranks' tokens under
    DDP, so that every rank moves λ alike (each rank's own L0 let their λ drift apart)."""
    fired = (active_BN > 0).float().sum()
    tokens = torch.full((), active_BN.shape[0], dtype=torch.float32, device=active_BN.device)  # no host copy
    stats = sum_over_ranks(torch.stack([fired, tokens]))
    return stats[0] / stats[1]


@register("relu")
class ReLUSAE(SAE):
    """f = relu(W_enc(x − b_dec) + b_enc); loss = normalised MSE + λ(step) Σ_i f_i ‖W_dec,i‖."""

    Config = ReLUConfig
    cfg: ReLUConfig

    def __init__(self, cfg: ReLUConfig):
        super().__init__(cfg)
        # λ's calibrated multiplier under `target_l0`; saved only then (older checkpoints lack it).
        self.register_buffer("l1_scale", torch.ones(()), persistent=cfg.target_l0 is not None)
        # The previous batch's L0 error (NaN: none yet), for the damping term; saved with l1_scale, so that a
        # resumed run damps its first step as the uninterrupted run did.
        self.register_buffer("l0_error", torch.full((), torch.nan), persistent=cfg.target_l0 is not None)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        if self.cfg.target_l0 is not None:  # SAEs and checkpoints saved before l0_error was kept lack it
            state_dict.setdefault(f"{prefix}l0_error", torch.full((), torch.nan))
        super()._load_from_state_dict(state_dict, prefix, *args)

    def warmup_steps(self) -> int:
        return DEFAULT_L1_WARMUP_STEPS if self.cfg.l1_warmup_steps is None else self.cfg.l1_warmup_steps

    def fit_to_run(self, total_steps: int) -> None:
        """Fit the defaults of `target_l0`'s controller to a run of `total_steps` steps (the cfg records
        them); a run without a target keeps the 2000-step warm-up."""
        if self.cfg.target_l0 is None:
            return
        if self.cfg.l1_warmup_steps is None:
            self.cfg.l1_warmup_steps = min(DEFAULT_L1_WARMUP_STEPS, max(1, total_steps // 10))
        if self.cfg.l0_adapt_rate is None:
            slower = math.sqrt(L0_ADAPT_FULL_RATE_STEPS / max(1, total_steps))
            self.cfg.l0_adapt_rate = L0_ADAPT_RATE * min(1.0, slower)
        if self.cfg.restart_adam is None:
            self.cfg.restart_adam = total_steps <= L0_ADAPT_FULL_RATE_STEPS

    def adam_restart_step(self) -> int | None:
        return self.warmup_steps() if self.cfg.target_l0 is not None and self.cfg.restart_adam else None

    def _encode(self, x: Tensor) -> Tensor:
        return self.pre_acts(x).relu()

    def l1_coef_at(self, step: int) -> float | Tensor:
        coef = 5.0 / self.cfg.d_in if self.cfg.l1_coef is None else self.cfg.l1_coef
        coef = coef * linear_warmup(step, self.warmup_steps())
        # A copy: calibrate() updates the buffer in place after the loss has used it.
        return coef if self.cfg.target_l0 is None else coef * self.l1_scale.clone()

    @torch.no_grad()
    def calibrate(self, active_BN: Tensor, step: int | Tensor = 0) -> None:
        """Move λ towards `target_l0` from this batch's L0 (features with active_BN > 0); on the device, and
        only after λ's warm-up: while the weights cannot yet follow, an integral would only wind up."""
        if self.cfg.target_l0 is None or not self.training:
            return
        error = (batch_l0(active_BN) / self.cfg.target_l0).log().clamp(-1.0, 1.0)  # log(0) = −inf clips to −1
        previous = torch.where(self.l0_error.isnan(), error, self.l0_error)
        rate = L0_ADAPT_RATE_UNKNOWN_RUN if self.cfg.l0_adapt_rate is None else self.cfg.l0_adapt_rate
        move = rate * error + self.cfg.l0_damping * (error - previous)
        after_warmup = step >= self.warmup_steps()
        if isinstance(after_warmup, Tensor):
            after_warmup = after_warmup.float()
        self.l1_scale.mul_(torch.exp(after_warmup * move))
        self.l0_error.copy_(error)

    def loss(
        self, x: Tensor, out: SAEOutput, step: int | Tensor = 0, dead: DeadFeatures | None = None
    ) -> LossOutput:
        mse = normalized_mse(x, out.x_hat)
        l1 = weighted_l1(out.codes, self.W_dec)
        loss = mse + self.l1_coef_at(step) * l1
        self.calibrate(out.codes, step)
        return LossOutput(loss, {"mse": mse.detach(), "l1": l1.detach()})


__all__ = ["ReLUConfig", "ReLUSAE", "batch_l0", "weighted_l1"]
