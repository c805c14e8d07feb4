"""TopK SAE with AuxK on dead features (Gao et al. 2024, "Scaling and evaluating sparse autoencoders")."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mmsae import kernels
from mmsae.sae.base import SAE, DeadFeatures, LossOutput, SAEConfig, SAEOutput, SparseCodes, register


@dataclass
class TopKConfig(SAEConfig):
    k: int | None = 32
    aux_k: int | None = None
    """Dead features used by AuxK; None = d_in // 2 (Gao et al.), 0 disables AuxK."""
    aux_coef: float = 1.0
    """Weight of the AuxK loss. It reaches only the dead features' weights, whose Adam second moments still
    hold the large gradients of their live steps: at Gao et al.'s 1/32 their updates stay too small to revive
    them within short runs (TopK, 256 steps on DINOv2-S tokens: 1.5 % dead against 0.4 % at 1, same FVU;
    docs/benchmarks.md)."""

    def validate(self) -> None:
        if self.k is None:
            raise ValueError(f"{type(self).__name__} needs k (active features per token).")
        super().validate()


@register("topk")
class TopKSAE(SAE):
    """f = relu(topk(W_enc(x − b_dec) + b_enc)); codes are returned as (values, indices)."""

    Config = TopKConfig
    cfg: TopKConfig
    fused_recon = True

    def _encode(self, x: Tensor) -> SparseCodes:
        values, indices = kernels.topk_encode(
            x, self.W_enc, self.b_enc, self.cfg.k, b_dec=self.b_dec, copies=self.weight_copies
        )
        return SparseCodes(values, indices, self.cfg.n_features)

    def loss(
        self, x: Tensor, out: SAEOutput, step: int | Tensor = 0, dead: DeadFeatures | None = None
    ) -> LossOutput:
        mse = self.recon_loss(x, out)
        return self.with_auxk(x, out.x_hat, mse, {"mse": mse.detach()}, dead)

    def with_auxk(
        self,
        x: Tensor,
        x_hat: Tensor,
        loss: Tensor,
        metrics: dict[str, Tensor],
        dead: DeadFeatures | None,
    ) -> LossOutput:
        """`loss` plus aux_coef × AuxK when features are dead (shared by the TopK family's objectives)."""
        aux = None if dead is None else self.auxk_loss(x, x_hat, dead)
        if aux is None:
            return LossOutput(loss, metrics)
        return LossOutput(loss + self.cfg.aux_coef * aux, {**metrics, "auxk": aux.detach()})

    def max_aux_k(self) -> int:
        """The configured AuxK budget: `aux_k`, or d_in // 2 (Gao et al.) when None; 0 disables AuxK."""
        return self.cfg.d_in // 2 if self.cfg.aux_k is None else self.cfg.aux_k

    def aux_size(self, num_dead: int) -> int:
        """Dead features AuxK selects per token for `num_dead` dead features (0: AuxK is off).

        min(aux_k, num_dead) rounded up to a power of two: with the trainer's host-side dead count (which may
        lag), a captured CUDA graph then serves every count up to that size (the extra slots pick live
        features masked to −∞, whose codes are 0), and a run captures a handful of graphs, not one per count.
        """
        aux_k = self.max_aux_k()
        if aux_k == 0 or num_dead == 0:
            return 0
        return min(aux_k, 1 << (num_dead - 1).bit_length())

    def loss_structure(self, num_dead: int) -> int:
        return self.aux_size(num_dead)

    def auxk_loss(self, x: Tensor, x_hat: Tensor, dead: DeadFeatures) -> Tensor | None:
        """Reconstruct the residual from the top `aux_k` dead features.

        The target is the *detached* residual and the aux reconstruction has no b_dec
        (sparsify #132 re-added it). Scaled by min(#dead / aux_k, 1), with #dead counted on the device now.
        """
        size = self.aux_size(dead.count)
        if size == 0:
            return None
        dead_N = dead.mask
        with torch.no_grad():  # only the k_aux chosen entries need a gradient: no dense [B, n] backward
            indices = self.aux_indices(x, dead_N, size)
        pre_BK = kernels.encode_at(x, self.W_enc, self.b_enc, indices, self.b_dec, self.weight_copies)
        values = self.aux_codes(pre_BK).masked_fill(~dead_N[indices], 0.0)  # slots past #dead: live features
        return self.aux_fit(x, x_hat, values, indices, dead_N)

    def aux_fit(self, x: Tensor, x_hat: Tensor, values: Tensor, indices: Tensor, dead_N: Tensor) -> Tensor:
        """AuxK's loss of given dead-feature codes: their decode (no b_dec) against the detached residual,
        normalised as the MSE, scaled by min(#dead / aux_k, 1)."""
        e_hat = kernels.sparse_decode(values, indices, self.W_dec, copies=self.weight_copies)
        residual = (x - x_hat).detach().float()
        var = (x.float() - x.float().mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
        aux = (e_hat.float() - residual).pow(2).sum(-1).mean() / var
        return aux * (dead_N.sum() / self.max_aux_k()).clamp(max=1.0)

    def aux_indices(self, x: Tensor, dead_N: Tensor, k_aux: int) -> Tensor:
        """[B, k_aux] indices of each token's dead features of largest pre-activation (slots past #dead hold
        live features, which `auxk_loss` zeroes). One GEMM whose bias is −∞ at live features gives the masked
        scores in the GEMM's own dtype (16 bits under autocast), so no [B, n] pass masks or widens them."""
        bias_N = self.b_enc.masked_fill(~dead_N, float("-inf"))
        return kernels.topk_indices(F.linear(x - self.b_dec, self.W_enc, bias_N), k_aux)

    def aux_codes(self, pre_BK: Tensor) -> Tensor:
        """AuxK's codes of the chosen pre-activations: as the encoder's (relu)."""
        return pre_BK.relu()


__all__ = ["TopKConfig", "TopKSAE"]
