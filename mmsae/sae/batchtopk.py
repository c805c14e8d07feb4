"""BatchTopK SAE (Bussmann et al. 2024): top B·k activations over the whole batch, JumpReLU at inference."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from mmsae import kernels
from mmsae.sae.base import register
from mmsae.sae.ranks import ranks_mean
from mmsae.sae.topk import TopKConfig, TopKSAE

DEFAULT_THRESHOLD_DECAY = 0.99
"""θ's EMA decay where neither the config nor a trainer set one (a ~100-step horizon)."""

TOKEN_CAP_RAMP_STEPS = 1000
"""Runs of fewer optimizer steps train with a token cap between 1 (one token's k, as TopK) and `token_cap`
(`BatchTopKConfig.token_cap_ramp_steps`)."""


@dataclass
class BatchTopKConfig(TopKConfig):
    threshold_decay: float | None = None
    """θ ← decay·θ + (1 − decay)·(smallest kept score of the batch). None: the trainer fits it to the run
    (`mmsae.trainer.state.threshold_decay_for_run`: a horizon of half the lr-decay phase, at most 100 steps),
    and `DEFAULT_THRESHOLD_DECAY` outside a trainer.

    Activations shrink a lot early in training; θ must describe the final weights. A 0.999 EMA
    (dictionary_learning's choice) still remembers the large early minima after 1000 steps, and a fixed
    100-step horizon spans most of a short run: either leaves θ too high at inference (held-out L0 below k).
    """
    score: Literal["activation", "projection", "cosine"] = "activation"
    """What the batch ranks: 'activation' relu(z_i) (the paper: with unit-norm atoms, a feature's share of the
    token's reconstruction); 'projection' relu(z_i) / ‖W_enc,i‖, the activation in the input's units;
    'cosine' relu(z_i) / (‖x − b_dec‖·‖W_enc,i‖). Kept values are relu(z) whatever the score.

    Raw activations ranked across tokens with no `token_cap` let tokens of many features take most of the B·k
    slots: tokens of a single true feature get no SAE feature and no gradient, and features learn mixtures
    (synthetic benchmark: 12 % of the features recovered). The default cap fixes that (66 %). On DINOv2-S
    tokens at full size (n = 4096, k = 32, 8M tokens) the capped activation ranking matches TopK at equal
    held-out L0 (FVU 0.1659 against 0.1660, no dead features), where 'projection' is 6 % above TopK with
    0.56 % dead and 'cosine' 8 % above (docs/benchmarks.md). 'projection' recovers more synthetic features
    (72 %, none dead, where the default leaves 14 % of them dead): keep it for data of many equally strong
    directions.
    """
    token_cap: float | None = 1.5
    """Each token keeps at most ⌈token_cap·k⌉ features (its highest scores), in training and at inference;
    None: no cap (the paper). The cap stops tokens of many features from taking the slots of the rest while
    leaving the batch to spread k per token unevenly; 2.0 gave the same FVU on DINOv2-S tokens (0.1666).
    Runs shorter than `token_cap_ramp_steps` train with a tighter cap.
    """
    token_cap_ramp_steps: int | None = TOKEN_CAP_RAMP_STEPS
    """A run of s < token_cap_ramp_steps optimizer steps trains with token_cap 1 + (token_cap − 1)·s /
    token_cap_ramp_steps (its length is known to the trainer, `fit_to_run`, which then records that cap and
    None here); None: `token_cap` whatever the run's length.

    Early in training the uneven split the batch ranking allows (some tokens at the cap, others below k)
    costs more than it gains; it pays once the features are formed. On DINOv2-S tokens (n = 1024, k = 16,
    batch 1024, FVU at held-out L0 = k) a 48-step run reached 0.3610 with a cap of 1.5, 0.3596 with 1.25,
    0.3563 with 1.125 and 0.3549 with 1.0 (TopK's training; TopK 0.3549). With this ramp, over two seeds at
    48 steps, BatchTopK reached 0.3544–0.3553 and Matryoshka 0.3540–0.3544 against TopK's 0.3542–0.3549
    (the cap of 1.5: 0.3597–0.3610 and 0.3561–0.3565), and at 192 steps 0.2835–0.2839 and 0.2861–0.2873
    against 0.2831–0.2867. At n = 4096, k = 32, batch 4096, 48 steps (two seeds): BatchTopK 0.2632–0.2636
    (from 0.2684–0.2695), Matryoshka 0.2587–0.2593 (from 0.2629–0.2633), TopK 0.2635–0.2646, and their
    learnt θ gave held-out L0 32.4–32.5 instead of 34.5–34.8; with the cap of 1.5 BatchTopK trailed TopK by
    1–1.5 % at 61–244 steps of that size and matched it from ~1000 steps on (docs/benchmarks.md). Data whose
    tokens hold very different numbers of features gain from the uneven split even early: the synthetic test
    problem of `tests/test_quality_recipe.py` (256 steps) gives 0.157 with the ramp, 0.151 without, TopK
    0.178.
    """

    # Checkpoints from before `score` existed ranked raw activations and hold θ in activation units; those
    # from before `token_cap` existed kept no cap. Later ones record both, and the cap as trained (no ramp).
    LEGACY_DEFAULTS: ClassVar[dict[str, Any]] = {
        "score": "activation",
        "token_cap": None,
        "token_cap_ramp_steps": None,
    }

    def validate(self) -> None:
        super().validate()
        if self.threshold_decay is not None and not 0.0 <= self.threshold_decay < 1.0:
            raise ValueError(f"threshold_decay={self.threshold_decay} must be in [0, 1).")
        if self.score not in ("projection", "cosine", "activation"):
            raise ValueError(f"score={self.score!r}: use 'activation', 'projection' or 'cosine'.")
        if self.token_cap is not None and not self.token_cap >= 1.0:
            raise ValueError(f"token_cap={self.token_cap}: use None (no cap) or a multiple of k ≥ 1.")
        if self.token_cap_ramp_steps is not None and self.token_cap_ramp_steps < 1:
            raise ValueError(f"token_cap_ramp_steps={self.token_cap_ramp_steps}: use None or ≥ 1 step.")

    def per_token_cap(self) -> int | None:
        """The most features one token keeps, ⌈token_cap·k⌉ at most n_features; None: no cap."""
        if self.token_cap is None or self.k is None:
            return None
        return min(self.n_features, math.ceil(self.token_cap * self.k - 1e-9))


@register("batchtopk")
class BatchTopKSAE(TopKSAE):
    """Training keeps the B·k highest-scoring relu(pre-activations) of the batch (k is a per-token average).

    The fp32 buffer `threshold` tracks an EMA of the smallest kept score; in eval mode
    f = relu(z)·1[score > θ], which does not depend on what else is in the batch. Codes are dense [B, n].
    """

    Config = BatchTopKConfig
    cfg: BatchTopKConfig

    def __init__(self, cfg: BatchTopKConfig):
        super().__init__(cfg)
        # 0 = not yet estimated; the first training batch sets it directly.
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float32))

    def fit_to_run(self, total_steps: int) -> None:
        """Tighten `token_cap` for a run of fewer than `token_cap_ramp_steps` steps (see there)."""
        super().fit_to_run(total_steps)
        ramp, cap = self.cfg.token_cap_ramp_steps, self.cfg.token_cap
        if ramp is not None and cap is not None:
            self.cfg.token_cap = 1.0 + (cap - 1.0) * min(1.0, total_steps / ramp)
        self.cfg.token_cap_ramp_steps = None  # fitted: a second call keeps the cap

    def _encode(self, x: Tensor) -> Tensor:
        acts_BN = self.pre_acts(x).relu()
        score_BN = self.selection_score(x, acts_BN)
        if not self.training:
            return acts_BN * (score_BN > self.threshold)
        # Features outside their token's cap score 0, and a batch short of positive scores fills its B·k
        # slots with zeros: those must not keep their activation.
        return acts_BN * (self.batch_topk_mask(score_BN) & (score_BN > 0))

    def selection_score(self, x: Tensor, acts_BN: Tensor) -> Tensor:
        """What is ranked across the batch and compared with θ, fp32 [B, n]: the `BatchTopKConfig.score` of
        each feature, 0 outside each token's ⌈token_cap·k⌉ highest.

        Under `fold_input_scale(s)` z is unchanged and ‖W_enc,i‖ grows by s: the 'activation' and 'cosine'
        scores keep their values (‖x − b_dec‖ shrinks by s), 'projection' shrinks by s, and so does θ.
        """
        with torch.autocast(device_type=x.device.type, enabled=False):
            score_BN = acts_BN.detach().float()
            if self.cfg.score != "activation":
                score_BN = score_BN / self.W_enc.detach().float().norm(dim=-1).clamp_min(1e-12)
            if self.cfg.score == "cosine":
                token_norm_B1 = (x.float() - self.b_dec.float()).norm(dim=-1, keepdim=True)
                score_BN = score_BN / token_norm_B1.clamp_min(1e-12)
            cap = self.cfg.per_token_cap()
            if cap is not None and cap < score_BN.shape[-1]:
                # The Triton select on CUDA (fp32 rows, k ≤ 256: under half torch.topk's time at k = 32–64).
                top_BK = kernels.topk_indices(score_BN.reshape(-1, score_BN.shape[-1]), cap)
                top_BK = top_BK.view(*score_BN.shape[:-1], cap)
                score_BN = torch.zeros_like(score_BN).scatter_(-1, top_BK, score_BN.gather(-1, top_BK))
            return score_BN

    def batch_topk_mask(self, score_BN: Tensor) -> Tensor:
        """Bool mask of the k·B highest scores of `score_BN` (any leading shape); updates θ."""
        flat = score_BN.flatten()
        n_keep = self.cfg.k * (flat.numel() // self.cfg.n_features)
        values, indices = flat.topk(n_keep, sorted=False)
        self.update_threshold(values)
        return torch.zeros_like(flat, dtype=torch.bool).index_fill_(0, indices, True).view_as(score_BN)

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        super().fold_input_scale(scale)
        if self.cfg.score == "projection":  # θ is in the input's units (see `selection_score`)
            self.threshold /= scale

    @torch.no_grad()
    def update_threshold(self, kept_scores: Tensor) -> None:
        # fp32 whatever the autocast dtype, and no host sync: a batch with nothing positive leaves θ alone.
        with torch.autocast(device_type=kept_scores.device.type, enabled=False):
            kept = kept_scores.float()
            batch_min = ranks_mean(kept.masked_fill(kept <= 0, float("inf")).min())
            decay = self.cfg.threshold_decay
            ema = self.threshold.lerp(batch_min, 1.0 - (DEFAULT_THRESHOLD_DECAY if decay is None else decay))
            ema = torch.where(self.threshold > 0, ema, batch_min)
            self.threshold.copy_(torch.where(batch_min.isfinite(), ema, self.threshold))


__all__ = ["DEFAULT_THRESHOLD_DECAY", "TOKEN_CAP_RAMP_STEPS", "BatchTopKConfig", "BatchTopKSAE"]
