"""Autograd-capable TopK encode and sparse decode built on the Triton kernels.

Encode: one cuBLAS GEMM for the pre-activations (autocast picks its dtype, as in the reference),
then the top-k select of `triton_select` instead of torch.topk. Backward never forms a dense B×n
gradient: dx is a gather-sum of k encoder rows, dW_enc only has rows at selected latents
(`segment_matmul`), db_enc is an index_add of k values per token.

Decode: out = gather-sum of k decoder atoms; d values = k gathered dot products; dW_dec is the
same segment matmul as dW_enc with the decoder's output gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mmsae.kernels.triton_select import MAX_K, SELECT_DTYPES, topk_select
from mmsae.kernels.triton_sparse import gather_dot, gather_sum, segment_matmul


class _TopKEncode(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x_BD: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor]:
        # Cast once ourselves (as autocast would) so backward's dx gathers the 16-bit rows.
        if torch.is_autocast_enabled("cuda"):
            dtype = torch.get_autocast_dtype("cuda")
        else:
            dtype = torch.promote_types(x_BD.dtype, W_enc.dtype)
        x_lp, W_lp = x_BD.to(dtype), W_enc.to(dtype)
        pre_BN = F.linear(x_lp, W_lp, b_enc.to(dtype))
        if pre_BN.dtype in SELECT_DTYPES and k <= MAX_K:
            values_BK, indices_BK = topk_select(pre_BN, k)
        else:
            # The select kernel is written for 16-bit keys; fp32 (no autocast) keeps torch.topk.
            values_BK, indices_BK = pre_BN.topk(k, dim=-1, sorted=False)
            values_BK = values_BK.relu()
        # dW_enc is built from the input the GEMM actually consumed (bf16 under autocast).
        ctx.save_for_backward(x_lp, W_lp, values_BK, indices_BK)
        ctx.W_dtype = W_enc.dtype
        ctx.x_dtype = x_BD.dtype
        ctx.mark_non_differentiable(indices_BK)
        return values_BK, indices_BK

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_values_BK: Tensor, _grad_indices: Tensor | None):
        x_BD, W_lp, values_BK, indices_BK = ctx.saved_tensors
        n = W_lp.shape[0]
        # relu after topk: no gradient through entries that were clipped to zero.
        g_BK = (grad_values_BK * (values_BK > 0)).contiguous()
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = gather_sum(g_BK, indices_BK, W_lp, ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_W = segment_matmul(g_BK, indices_BK, x_BD, n, ctx.W_dtype)
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(n, dtype=torch.float32, device=g_BK.device)
            grad_b = grad_b.index_add_(0, indices_BK.flatten(), g_BK.flatten().float()).to(ctx.W_dtype)
        return grad_x, grad_W, grad_b, None


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, values_BK: Tensor, indices_BK: Tensor, W_dec: Tensor) -> Tensor:
        # Atoms stay in W_dec's dtype: gathering from a bf16 copy measured 2× slower (docs, v5).
        ctx.save_for_backward(values_BK, indices_BK, W_dec)
        return gather_sum(values_BK, indices_BK, W_dec, values_BK.dtype)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out_BD: Tensor):
        values_BK, indices_BK, W_dec = ctx.saved_tensors
        grad_out_BD = grad_out_BD.contiguous()
        grad_values = grad_W = None
        if ctx.needs_input_grad[0]:
            grad_values = gather_dot(grad_out_BD, indices_BK, W_dec, values_BK.dtype)
        if ctx.needs_input_grad[2]:
            grad_W = segment_matmul(values_BK, indices_BK, grad_out_BD, W_dec.shape[0], W_dec.dtype)
        return grad_values, None, grad_W


def _check_weights(name: str, W: Tensor) -> None:
    if W.dim() != 2 or W.stride(1) != 1:
        raise ValueError(
            f"{name} must be a row-major [n, d] matrix, got shape {tuple(W.shape)} strides {W.stride()}."
        )


def topk_encode(x_centered: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values, indices) of relu(topk(x W_encᵀ + b_enc)) per row; any leading dims of x."""
    _check_weights("W_enc", W_enc)
    lead = x_centered.shape[:-1]
    values, indices = _TopKEncode.apply(
        x_centered.reshape(-1, x_centered.shape[-1]).contiguous(), W_enc, b_enc, k
    )
    return values.reshape(*lead, k), indices.reshape(*lead, k)


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """Σ_j values[..., j] · W_dec[indices[..., j]] without a dense [.., n] code tensor."""
    _check_weights("W_dec", W_dec)
    lead, k = values.shape[:-1], values.shape[-1]
    out = _SparseDecode.apply(values.reshape(-1, k).contiguous(), indices.reshape(-1, k).contiguous(), W_dec)
    return out.reshape(*lead, W_dec.shape[1])
