"""AbsTopK SAE: keep the k largest |pre-activations| with their sign (bidirectional features)."""

from __future__ import annotations

from torch import Tensor

from mmsae import kernels
from mmsae.sae.base import SparseCodes, register
from mmsae.sae.topk import TopKConfig, TopKSAE


def signed_topk(pre_BN: Tensor, k: int, allowed_N: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(values, indices) of the k entries of largest magnitude, signs kept.

    With `allowed_N`, only those features; when fewer than k are allowed, the extra slots hold value 0.
    """
    scores_BN = pre_BN.detach().abs()
    if allowed_N is not None:
        scores_BN = scores_BN.masked_fill(~allowed_N, -1.0)  # below every |z| ≥ 0
    indices = kernels.topk_indices(scores_BN, k)
    values = pre_BN.gather(-1, indices)
    if allowed_N is not None:
        values = values.masked_fill(~allowed_N[indices], 0.0)
    return values, indices


LONG_RUN_STEPS = 1953
"""8M tokens at batch 4096: the longest run where AbsTopK at half TopK's lr kept its features alive."""


@register("abstopk")
class AbsTopKSAE(TopKSAE):
    """f = the k entries of z = W_enc(x − b_dec) + b_enc largest in |z|, keeping their sign.

    Codes can be negative: metrics must count `values != 0`, never `values > 0`.
    """

    Config = TopKConfig
    cfg: TopKConfig

    @classmethod
    def default_lr_scale(cls, total_steps: int | None = None, batch_size: int | None = None) -> float:
        """Half TopK's, and × (`LONG_RUN_STEPS` / steps)^¼ in longer runs.

        At TopK's lr 1.4-1.7 % of its features died on DINOv2-S tokens (n = 4096, k = 32, 8M tokens in 1,953
        steps, two seeds; a larger AuxK, a shorter dead window or rescaled dead rows left 1.2-1.6 %), at half
        of it 0.02 %, for a held-out FVU 1.3 % higher. The same tokens in 7,812 steps (batch 1024) lost 1.20 %
        at half, 0.51 % at 0.7 × that (0.02 % at 0.5 ×), for an FVU 1.2 % higher (docs/benchmarks.md, "Default
        recipe"). Short runs keep half: at batch 512 in 117 steps a lower lr only cost FVU."""
        steps = total_steps or LONG_RUN_STEPS
        return 0.5 * min(1.0, LONG_RUN_STEPS / steps) ** 0.25

    def _encode(self, x: Tensor) -> SparseCodes:
        values, indices = signed_topk(self.pre_acts(x), self.cfg.k)
        return SparseCodes(values, indices, self.cfg.n_features)

    def aux_indices(self, x: Tensor, dead_N: Tensor, k_aux: int) -> Tensor:
        return signed_topk(self.pre_acts(x), k_aux, dead_N)[1]  # by |z|, as the encoder

    def aux_codes(self, pre_BK: Tensor) -> Tensor:
        return pre_BK  # signed, as the encoder's


__all__ = ["AbsTopKSAE", "signed_topk"]
