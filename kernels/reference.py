"""Torch reference implementations: the ground truth every Triton kernel is tested against."""

from __future__ import annotations

from torch import Tensor


def topk_encode(x_centered: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor]:
    pre = x_centered @ W_enc.T + b_enc
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return values.relu(), indices


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, bias: Tensor | None = None) -> Tensor:
    # Dense scatter + GEMM: simple and autograd-correct in every dtype (embedding_bag's bf16
    # backward is missing on CUDA). The Triton kernel does the sparse gather instead.
    dense = values.new_zeros(*values.shape[:-1], W_dec.shape[0]).scatter(-1, indices, values)
    out = dense @ W_dec.to(dense.dtype)
    return out if bias is None else out + bias


def normalized_mse(x: Tensor, x_hat: Tensor) -> Tensor:
    """‖x − x̂‖² / ‖x − x̄‖², batch means, in fp32 whatever the autocast dtype (Gao et al.)."""
    x, x_hat = x.float(), x_hat.float()
    var = (x - x.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
    return (x - x_hat).pow(2).sum(-1).mean() / var


def remove_parallel_rows_(W: Tensor, grad: Tensor) -> None:
    """grad −= (grad·w) w per row: the component along each unit-norm row would only change its norm."""
    grad -= (grad * W).sum(-1, keepdim=True) * W


def normalize_rows_(W: Tensor) -> None:
    """Each row of W divided by its norm (at least 1e-8), in place."""
    W /= W.norm(dim=-1, keepdim=True).clamp_min(1e-8)
