"""TopK SAE with AuxK on dead latents (Gao et al. 2024, "Scaling and evaluating sparse autoencoders")."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from mmsae import kernels
from mmsae.sae.base import SAE, LossOutput, SAEConfig, SAEOutput, SparseCodes, normalized_mse, register


@dataclass
class TopKConfig(SAEConfig):
    k: int | None = 32
    aux_k: int | None = None
    """Dead latents used by AuxK; None = d_in // 2 (Gao et al.), 0 disables AuxK."""
    aux_coef: float = 1 / 32

    def validate(self) -> None:
        if self.k is None:
            raise ValueError(f"{type(self).__name__} needs k (active latents per token).")
        super().validate()


@register("topk")
class TopKSAE(SAE):
    """f = relu(topk(W_enc(x − b_dec) + b_enc)); codes are returned as (values, indices)."""

    Config = TopKConfig
    cfg: TopKConfig

    def encode(self, x: Tensor) -> SparseCodes:
        values, indices = kernels.topk_encode(x, self.W_enc, self.b_enc, self.cfg.k, b_dec=self.b_dec)
        return SparseCodes(values, indices, self.cfg.n_latents)

    def forward(self, x: Tensor) -> SAEOutput:
        self.check_input(x)
        codes = self.encode(x)
        return SAEOutput(self.decode(codes), codes, {})

    def loss(self, x: Tensor, out: SAEOutput, step: int = 0) -> LossOutput:
        mse = normalized_mse(x, out.x_hat)
        return self.with_auxk(x, out.x_hat, mse, {"mse": mse.detach()})

    def with_auxk(self, x: Tensor, x_hat: Tensor, loss: Tensor, metrics: dict[str, Tensor]) -> LossOutput:
        """`loss` plus aux_coef × AuxK when latents are dead (shared by the TopK family's objectives)."""
        aux = self.auxk_loss(x, x_hat)
        if aux is None:
            return LossOutput(loss, metrics)
        return LossOutput(loss + self.cfg.aux_coef * aux, {**metrics, "auxk": aux.detach()})

    def auxk_loss(self, x: Tensor, x_hat: Tensor) -> Tensor | None:
        """Reconstruct the residual from the top `aux_k` dead latents.

        The target is the *detached* residual and the aux reconstruction has no b_dec
        (sparsify #132 re-added it). Scaled by min(num_dead / aux_k, 1).
        """
        aux_k = self.cfg.d_in // 2 if self.cfg.aux_k is None else self.cfg.aux_k
        if aux_k == 0:
            return None
        num_dead = self.num_dead()
        if num_dead == 0:
            return None
        values, indices = self.select_aux(self.pre_acts(x), self.dead_mask(), min(aux_k, num_dead))
        e_hat = kernels.sparse_decode(values, indices, self.W_dec)
        residual = (x - x_hat).detach().float()
        var = (x.float() - x.float().mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
        aux = (e_hat.float() - residual).pow(2).sum(-1).mean() / var
        return aux * min(num_dead / aux_k, 1.0)

    def select_aux(self, pre_BN: Tensor, dead_N: Tensor, k_aux: int) -> tuple[Tensor, Tensor]:
        """The AuxK codes: relu of the `k_aux` largest pre-activations among dead latents (k_aux ≤ #dead)."""
        values, indices = pre_BN.masked_fill(~dead_N, float("-inf")).topk(k_aux, dim=-1, sorted=False)
        return values.relu(), indices


__all__ = ["TopKConfig", "TopKSAE"]
