"""Matching-pursuit SAE (MP-SAE): the encoder is k greedy pursuit steps over the decoder's atoms.

r_0 = x − b_dec; each step picks i_t = argmax_i ⟨r, d̂_i⟩ among atoms not yet chosen, takes
c_t = ⟨r, d_i⟩/‖d_i‖² and updates r ← r − c_t d_i. The loop is differentiable, so reconstruction
loss alone trains W_dec and b_dec; there are no encoder weights. Using d̂_i = d_i/‖d_i‖ for the choice
and ⟨r, d_i⟩/‖d_i‖² for the value keeps codes identical after `fold_input_scale` (atoms of norm 1/s).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mmsae.sae.base import SAE, SAEConfig, SparseCodes, register


@dataclass
class MPConfig(SAEConfig):
    k: int | None = 16
    stop_tol: float = 0.0
    """Inference only: a token stops once ‖r‖ ≤ stop_tol·‖x − b_dec‖ (0 = always k steps)."""

    def validate(self) -> None:
        if self.k is None:
            raise ValueError("MP needs k, the number of pursuit steps.")
        super().validate()
        if not 0.0 <= self.stop_tol < 1.0:
            raise ValueError(f"stop_tol={self.stop_tol} must be in [0, 1): it is a relative residual norm.")


@register("mp")
class MPSAE(SAE):
    Config = MPConfig
    cfg: MPConfig

    def __init__(self, cfg: MPConfig):
        super().__init__(cfg)
        # Encoder-free: pursuit reads the dictionary itself. None keeps them out of state and optimizer.
        self.W_enc = None
        self.b_enc = None

    def _encode(self, x: Tensor) -> SparseCodes:
        residual_BD = x - self.b_dec
        norms_N = self.W_dec.norm(dim=-1).clamp_min(1e-8)
        stop_B = residual_BD.norm(dim=-1) * self.cfg.stop_tol
        chosen_BN = torch.zeros(*x.shape[:-1], self.cfg.n_features, dtype=torch.bool, device=x.device)
        values, indices = [], []
        for _ in range(self.cfg.k):
            corr_BN = residual_BD @ self.W_dec.T
            # Never re-pick an atom: SparseCodes scatter, so duplicate indices would not add up.
            scores_BN = (corr_BN.detach() / norms_N).masked_fill(chosen_BN, float("-inf"))
            idx_B1 = scores_BN.argmax(dim=-1, keepdim=True)
            coef_B1 = corr_BN.gather(-1, idx_B1) / norms_N[idx_B1].pow(2)
            if not self.training and self.cfg.stop_tol > 0:
                coef_B1 = coef_B1 * (residual_BD.norm(dim=-1, keepdim=True) > stop_B[..., None])
            residual_BD = residual_BD - coef_B1 * self.W_dec[idx_B1.squeeze(-1)]
            chosen_BN.scatter_(-1, idx_B1, True)
            values.append(coef_B1)
            indices.append(idx_B1)
        return SparseCodes(torch.cat(values, -1), torch.cat(indices, -1), self.cfg.n_features)


__all__ = ["MPSAE", "MPConfig"]
