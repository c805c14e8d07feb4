"""Torch reference implementations: the ground truth every Triton kernel is tested against."""

from __future__ import annotations

import math

import torch
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


def feature_sums_(
    grp_M: Tensor,
    raw_M: Tensor,
    fire: Tensor,
    total: Tensor,
    peak: Tensor,
    hist: Tensor,
    log10_range: tuple[float, float],
) -> None:
    ones = torch.ones((), dtype=fire.dtype, device=fire.device).expand(grp_M.shape[0])
    fire.index_add_(0, grp_M, ones)
    total.index_add_(0, grp_M, raw_M.to(total.dtype))
    peak.scatter_reduce_(0, grp_M, raw_M, "amax")
    lo, hi = log10_range
    bins = hist.shape[1]
    # log10 → bin index written out-of-place, in place: no temporaries.
    b = raw_M.abs().log10_().sub_(lo).div_(hi - lo).mul_(bins).floor_().clamp_(0, bins - 1).long()
    hist.view(-1).index_add_(0, b.add_(grp_M, alpha=bins), ones)


def residual_sums_(
    x_ND: Tensor, x_hat_ND: Tensor, shift_D: Tensor, x_sum: Tensor, x_sq: Tensor, sq_err: Tensor
) -> None:
    """Row norms reduce d values each and the N row sums are added pairwise, so a chunk's float32 totals
    are within ~1e-7 relative of float64 ones (a flat float32 dot product over N·d values, as torch.dot
    on the CPU, was 3e-4 off at 16384 × 768)."""
    xc_ND = torch.sub(x_ND, shift_D)  # float32 whatever x's (lower) precision
    x_sum += xc_ND.sum(0)
    x_sq += torch.linalg.vector_norm(xc_ND, dim=1).square_().sum()
    r_ND = xc_ND.sub_(x_hat_ND).add_(shift_D)  # x − x̂, rounded to float32 once per step
    sq_err += torch.linalg.vector_norm(r_ND, dim=1).square_().sum()


def merge_top(top_v: Tensor, top_meta: Tensor, best_v: Tensor, best_meta: Tensor) -> tuple[Tensor, Tensor]:
    k = top_v.shape[0]
    cand_v, idx = torch.cat([top_v, best_v]).sort(dim=0, descending=True, stable=True)
    cand_meta = torch.cat([top_meta, best_meta])
    out_v, idx = cand_v[:k], idx[:k]
    out_meta = cand_meta.gather(0, idx[..., None].expand(-1, -1, cand_meta.shape[-1]))
    return out_v, out_meta.masked_fill_((out_v == -math.inf)[..., None], -1)
