"""Autograd-capable TopK encode and sparse decode built on the Triton kernels.

Encode: one GEMM for the pre-activations (autocast picks its dtype, as in the reference), then
the top-k select of `triton_select` instead of torch.topk; on Hopper the GEMM is `triton_gemm`'s,
whose epilogue does the select's first pass, elsewhere cuBLAS. Backward never forms a dense B×n
gradient: dW_enc only has rows at selected features (`segment_matmul`), db_enc is the sum of each feature's
entries in that same pass, and the centring bias gets db_dec = −db_encᵀ·W_enc (every selected entry reaches
x − b_dec through its encoder row), a GEMV (over the 16-bit W_enc under autocast) instead of a B×d
gather-sum; dx, when x itself needs a gradient, is that gather-sum of k encoder rows.

Decode: out = gather-sum of k decoder atoms; d values = k gathered dot products; dW_dec is the
same segment matmul as dW_enc with the decoder's output gradient. Under 16-bit autocast, when each
atom is gathered often enough per step, both gathers read a 16-bit copy of W_dec.

Decode with its loss (`decode_with_mse`, what training calls): one pass gives x̂, the normalised MSE and the
backward's d values up to a scalar (`triton_recon`), so the backward's gather-dot and the loss's passes over
x̂ are gone.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
import triton
from torch import Tensor

from mmsae.kernels import candidates, weight_copies
from mmsae.kernels.triton_dense import center_cast, col_sums, recon_sums, scaled_diff
from mmsae.kernels.triton_fp8 import centred_e4m3_rows
from mmsae.kernels.triton_gemm import fused_gemm_applies, linear_group_maxima
from mmsae.kernels.triton_group import group_topk, group_topk_applies
from mmsae.kernels.triton_recon import decode_mse
from mmsae.kernels.triton_select import (
    MAX_K,
    SELECT_DTYPES,
    group_config,
    group_select_fits,
    select_from_group_maxima,
    topk_select,
)
from mmsae.kernels.triton_sparse import FeatureSort, gather_dot, gather_sum, segment_matmul, sort_by_feature
from mmsae.kernels.weight_copies import WeightCopies

LOW_PRECISION_TABLE_MIN_REUSE = 4
"""Decode from a 16-bit copy of an fp32 W_dec when B·k ≥ this × n (gathers per atom per step)."""


class _SharedSort:
    """`sort_by_feature` of one index array, made by whichever backward pass needs it first.

    Both segment matmuls (dW_enc in the encoder's backward, dW_dec in the decoder's) read the same
    indices in feature order; sharing the sort saves a radix sort, a searchsorted and the tokens'
    row numbers per step (~40 µs at benchmark size 1). The holder keeps the indices' storage alive,
    so its address cannot be reused by another index array while it is registered."""

    def __init__(self, indices_BK: Tensor, n: int):
        self.indices_BK, self.n = indices_BK.detach(), n
        self._sorted: FeatureSort | None = None

    def get(self) -> FeatureSort:
        if self._sorted is None:
            self._sorted = sort_by_feature(self.indices_BK, self.n)
        return self._sorted


_SORTS: weakref.WeakValueDictionary[tuple[object, ...], _SharedSort] = weakref.WeakValueDictionary()
"""Live holders by (address, version, shape, n) of their indices; an entry dies with the last
autograd context that holds it, and an in-place change of the indices bumps their version."""


def _shared_sort(indices_BK: Tensor, n: int) -> _SharedSort:
    if torch.is_inference(indices_BK):
        # Inference tensors have no version counter to key on, and no backward will ever read their sort
        # (autograd cannot save them): an unshared holder, which sorts nothing unless asked.
        return _SharedSort(indices_BK, n)
    key = (indices_BK.device, indices_BK.data_ptr(), indices_BK._version, tuple(indices_BK.shape), n)
    holder = _SORTS.get(key)
    if holder is None:
        holder = _SORTS[key] = _SharedSort(indices_BK, n)
    return holder


def _linear_topk(x_BD: Tensor, W_ND: Tensor, b_N: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """relu(top-k) of x·Wᵀ + b: on Hopper the GEMM's epilogue writes the group select's maxima."""
    n = W_ND.shape[0]
    cfg = group_config(n, k)
    if (
        x_BD.dtype in SELECT_DTYPES
        and k <= min(n, MAX_K)
        and group_select_fits(k, cfg)
        and fused_gemm_applies(x_BD, W_ND, cfg.group)
    ):
        pre_BN, gmax_BG = linear_group_maxima(x_BD, W_ND, b_N, cfg.group)
        values_BK = pre_BN.new_empty(pre_BN.shape[0], k)
        indices_BK = torch.empty(pre_BN.shape[0], k, dtype=torch.int64, device=pre_BN.device)
        select_from_group_maxima(pre_BN, gmax_BG, k, cfg, values_BK, indices_BK)
        return values_BK, indices_BK
    pre_BN = F.linear(x_BD, W_ND, b_N)
    if pre_BN.dtype in SELECT_DTYPES and k <= MAX_K:
        return topk_select(pre_BN, k)  # the group select with its streaming pass (large k: "bound")
    # The select kernels are written for 16-bit keys; fp32 (no autocast) keeps torch.topk.
    values_BK, indices_BK = pre_BN.topk(k, dim=-1, sorted=False)
    return values_BK.relu(), indices_BK


class _TopKEncode(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(
        ctx,
        x_BD: Tensor,
        b_dec: Tensor | None,
        W_enc: Tensor,
        b_enc: Tensor,
        k: int,
        copies: WeightCopies | None,
    ) -> tuple[Tensor, Tensor]:
        x_lp, W_lp = _encoder_operands(ctx, x_BD, b_dec, W_enc, copies)
        values_BK, indices_BK = _linear_topk(x_lp, W_lp, weight_copies.cast(copies, b_enc, x_lp.dtype), k)
        # dW_enc is built from the input the GEMM actually consumed (bf16 under autocast).
        ctx.save_for_backward(x_lp, W_lp, values_BK, indices_BK)
        ctx.mark_non_differentiable(indices_BK)
        ctx.feature_sort = _shared_sort(indices_BK, W_enc.shape[0])
        return values_BK, indices_BK

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_values_BK: Tensor, _grad_indices: Tensor | None):
        x_BD, W_lp, values_BK, indices_BK = ctx.saved_tensors
        # relu after topk: no gradient through entries that were clipped to zero.
        g_BK = (grad_values_BK * (values_BK > 0)).contiguous()
        return (*_encoder_grads(ctx, g_BK, x_BD, W_lp, indices_BK), None, None)


def _encoder_operands(
    ctx, x_BD: Tensor, b_dec: Tensor | None, W_enc: Tensor, copies: WeightCopies | None
) -> tuple[Tensor, Tensor]:
    """(x − b_dec, W_enc) in the encoder GEMM's dtype, cast once here (as autocast would) so the backward's
    dx gathers the 16-bit rows; records the input dtypes on ctx for `_encoder_grads`."""
    dtype = _gemm_dtype(x_BD, b_dec, W_enc)
    ctx.x_dtype, ctx.W_dtype = x_BD.dtype, W_enc.dtype
    ctx.b_dec_dtype = None if b_dec is None else b_dec.dtype
    # Centring and cast in one pass: (x − b_dec) in fp32, rounded once, as (x - b_dec).to(dtype).
    x_lp = x_BD.to(dtype) if b_dec is None else center_cast(x_BD, b_dec, dtype)
    return x_lp, weight_copies.cast(copies, W_enc, dtype)  # the optimizer's 16-bit copy when it keeps one


def _gemm_dtype(x_BD: Tensor, b_dec: Tensor | None, W_enc: Tensor) -> torch.dtype:
    """The encoder GEMM's dtype: autocast's, else the promoted dtype of its operands."""
    if torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    x_dtype = x_BD.dtype if b_dec is None else torch.promote_types(x_BD.dtype, b_dec.dtype)
    return torch.promote_types(x_dtype, W_enc.dtype)


def _encoder_grads(
    ctx, g_BK: Tensor, x_BD: Tensor, W_lp: Tensor, indices_BK: Tensor
) -> tuple[Tensor | None, ...]:
    """(dx, db_dec, dW_enc, db_enc) of pre-activations taken at `indices_BK` with gradient `g_BK`, for an
    encoder whose inputs are (x, b_dec, W_enc, b_enc): no dense [B, n] gradient."""
    n = W_lp.shape[0]
    grad_x = grad_b_dec = grad_W = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = gather_sum(g_BK, indices_BK, W_lp, ctx.x_dtype)
    grad_b_N = None
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
        grad_b_N = torch.empty(n, dtype=torch.float32, device=g_BK.device)
    if ctx.needs_input_grad[2]:  # with db_enc's per-feature sums of the same coefficients, when wanted
        grad_W = segment_matmul(
            g_BK, indices_BK, x_BD, n, ctx.W_dtype, ctx.feature_sort.get(), sums_N=grad_b_N
        )
    elif grad_b_N is not None:
        grad_b_N.zero_().index_add_(0, indices_BK.flatten(), g_BK.flatten().float())
    if grad_b_N is not None:
        if ctx.needs_input_grad[3]:
            grad_b = grad_b_N.to(ctx.W_dtype)
        if ctx.needs_input_grad[1]:
            # −db_encᵀ·W over the W the GEMM read (16 bits under autocast, as autograd's dx would use):
            # fp32 sums, half the bytes of an fp32 GEMV over W_enc.
            grad_b_dec = -col_sums(W_lp, weights_B=grad_b_N)[0].to(ctx.b_dec_dtype)
    return grad_x, grad_b_dec, grad_W, grad_b


class _EncodeAt(torch.autograd.Function):
    """Pre-activations at given features, (x − b_dec)·W_enc[idx]ᵀ + b_enc[idx], in fp32: k gathered dot
    products per row, and the TopK encode's sparse backward (AuxK's dead features: no dense [B, n] pass)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(
        ctx,
        x_BD: Tensor,
        b_dec: Tensor | None,
        W_enc: Tensor,
        b_enc: Tensor,
        indices_BK: Tensor,
        copies: WeightCopies | None,
    ) -> Tensor:
        x_lp, W_lp = _encoder_operands(ctx, x_BD, b_dec, W_enc, copies)
        pre_BK = gather_dot(x_lp, indices_BK, W_lp, torch.float32).add_(b_enc.float()[indices_BK])
        ctx.save_for_backward(x_lp, W_lp, indices_BK)
        ctx.feature_sort = _shared_sort(indices_BK, W_enc.shape[0])
        return pre_BK

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_pre_BK: Tensor):
        x_BD, W_lp, indices_BK = ctx.saved_tensors
        return (*_encoder_grads(ctx, grad_pre_BK.contiguous(), x_BD, W_lp, indices_BK), None, None)


def _decode_table(values_BK: Tensor, W_dec: Tensor, copies: WeightCopies | None = None) -> Tensor:
    """The atoms the decoder gathers: W_dec, or its 16-bit copy under 16-bit codes when the optimizer keeps
    one, or when each atom is gathered often enough per step (B·k ≥ 4n) to repay one pass over W_dec."""
    if values_BK.element_size() == 2 < W_dec.element_size():
        # 16-bit atoms gather at ~2× the rate of fp32 ones (512-column tiles, docs/kernels-notes.md).
        copy = None if copies is None else copies.current(W_dec, values_BK.dtype)
        if copy is not None:
            return copy
        if values_BK.numel() >= LOW_PRECISION_TABLE_MIN_REUSE * W_dec.shape[0]:
            return weight_copies.cast(copies, W_dec, values_BK.dtype)
    return W_dec


def _decode_setup(
    ctx,
    values_BK: Tensor,
    indices_BK: Tensor,
    W_dec: Tensor,
    bias_D: Tensor | None,
    copies: WeightCopies | None,
) -> tuple[Tensor, torch.dtype]:
    """(the table to gather, the output dtype) of a decoder forward; records on `ctx` what `_decode_backward`
    reads besides the saved tensors."""
    ctx.feature_sort = _shared_sort(indices_BK, W_dec.shape[0])  # the encoder's, when it made them
    ctx.bias_dtype = None if bias_D is None else bias_D.dtype
    out_dtype = values_BK.dtype if bias_D is None else torch.promote_types(values_BK.dtype, bias_D.dtype)
    return _decode_table(values_BK, W_dec, copies), out_dtype


def _decode_backward(ctx, grad_out_BD: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(d values, dW_dec, d bias) of the decoder from its output gradient; `ctx` saved values, indices,
    W_dec and the gathered table, and holds the shared feature sort and the bias dtype."""
    values_BK, indices_BK, W_dec, table_ND = ctx.saved_tensors[:4]
    grad_out_BD = grad_out_BD.contiguous()
    grad_bias = None
    # With a bias the output is fp32 (16-bit codes + fp32 bias), and so is its gradient: the gathers read
    # it in the codes' dtype, at half the bytes, as they read a 16-bit output. One pass makes
    # that copy and the bias gradient's column sums.
    wide = grad_out_BD.element_size() > values_BK.element_size()
    if ctx.needs_input_grad[3] or wide:
        sums_D, copy_BD = col_sums(grad_out_BD, values_BK.dtype if wide else None)
        grad_out_BD = grad_out_BD if copy_BD is None else copy_BD
        if ctx.needs_input_grad[3]:
            grad_bias = sums_D.to(ctx.bias_dtype)
    grad_values = grad_W = None
    if ctx.needs_input_grad[0]:
        grad_values = gather_dot(grad_out_BD, indices_BK, table_ND, values_BK.dtype)
    if ctx.needs_input_grad[2]:
        grad_W = segment_matmul(
            values_BK, indices_BK, grad_out_BD, W_dec.shape[0], W_dec.dtype, ctx.feature_sort.get()
        )
    return grad_values, grad_W, grad_bias


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(
        ctx,
        values_BK: Tensor,
        indices_BK: Tensor,
        W_dec: Tensor,
        bias_D: Tensor | None,
        copies: WeightCopies | None,
    ) -> Tensor:
        table_ND, out_dtype = _decode_setup(ctx, values_BK, indices_BK, W_dec, bias_D, copies)
        ctx.save_for_backward(values_BK, indices_BK, W_dec, table_ND)
        return gather_sum(values_BK, indices_BK, table_ND, out_dtype, bias_D)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out_BD: Tensor):
        grad_values, grad_W, grad_bias = _decode_backward(ctx, grad_out_BD)
        return grad_values, None, grad_W, grad_bias, None


class _DecodeMSE(torch.autograd.Function):
    """(x̂, Σ(x − x̂)² / Σ(x − x̄)² per-row means) of `sparse_decode` and `normalized_mse` in one kernel.

    The loss's gradient w.r.t. x̂ is s·(x̂ − x) with s = 2g / Σ(x − x̄)²; the forward keeps r = x̂ − x and the
    dots ⟨r, atom⟩ (`triton_recon`), so a backward reached through the loss alone only scales them: d values
    = s·dots, dW_dec = the segment matmul of r with s on its coefficients, d bias = s·Σ_b r. When x̂ itself
    also gets a gradient, its sum with s·r goes through the plain decoder backward."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(
        ctx,
        values_BK: Tensor,
        indices_BK: Tensor,
        W_dec: Tensor,
        bias_D: Tensor | None,
        x_BD: Tensor,
        copies: WeightCopies | None,
    ) -> tuple[Tensor, Tensor]:
        table_ND, out_dtype = _decode_setup(ctx, values_BK, indices_BK, W_dec, bias_D, copies)
        fused = decode_mse(values_BK, indices_BK, table_ND, x_BD, out_dtype, bias_D)
        denom = _loss_denominator(fused.var_sum, x_BD.shape[0])
        ctx.save_for_backward(values_BK, indices_BK, W_dec, table_ND, fused.residual, fused.dots, denom)
        ctx.set_materialize_grads(False)
        return fused.x_hat, fused.err_sum / denom

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_x_hat: Tensor | None, grad_mse: Tensor | None):
        values_BK, indices_BK, W_dec, _, r_BD, dots_BK, denom = ctx.saved_tensors
        if grad_mse is None:  # only x̂ was used
            if grad_x_hat is None:
                return None, None, None, None, None, None
            return (*_split(_decode_backward(ctx, grad_x_hat)), None, None)
        scale = grad_mse.float() * 2 / denom
        if grad_x_hat is not None:
            grad_out = grad_x_hat.float() + scale * r_BD.float()
            return (*_split(_decode_backward(ctx, grad_out)), None, None)
        grad_values = grad_W = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_values = torch.mul(dots_BK, scale, out=values_BK.new_empty(values_BK.shape))  # one pass
        if ctx.needs_input_grad[2]:
            grad_W = segment_matmul(
                values_BK, indices_BK, r_BD, W_dec.shape[0], W_dec.dtype, ctx.feature_sort.get(), scale
            )
        if ctx.needs_input_grad[3]:
            grad_bias = (col_sums(r_BD)[0] * scale).to(ctx.bias_dtype)
        return grad_values, None, grad_W, grad_bias, None, None


def _split(grads: tuple[Tensor | None, Tensor | None, Tensor | None]) -> tuple[Tensor | None, ...]:
    """(d values, dW, d bias) in `_DecodeMSE`'s input order: values, indices, W_dec, bias."""
    grad_values, grad_W, grad_bias = grads
    return grad_values, None, grad_W, grad_bias


class _NormalizedMSE(torch.autograd.Function):
    """Σ(x − x̂)² / Σ(x − x̄)² over [B, d], one pass forward and one backward; x gets no gradient."""

    @staticmethod
    def forward(ctx, x_BD: Tensor, x_hat_BD: Tensor) -> Tensor:
        err, var_sum = recon_sums(x_BD, x_hat_BD)
        denom = _loss_denominator(var_sum, x_BD.shape[0])
        ctx.save_for_backward(x_BD, x_hat_BD, denom)
        return err / denom

    @staticmethod
    def backward(ctx, grad: Tensor):
        x_BD, x_hat_BD, denom = ctx.saved_tensors
        return None, scaled_diff(x_BD, x_hat_BD, grad * 2 / denom)


def _loss_denominator(var_sum: Tensor, rows: int) -> Tensor:
    """Σ(x − x̄)², floored as the reference floors its per-row mean (at 1e-12): the normalised MSE is
    err_sum / this, and its gradient w.r.t. x̂ is 2g·(x̂ − x) / this. Sums, not means: two kernels fewer."""
    return var_sum.clamp_min(1e-12 * rows)


def _check_weights(name: str, W: Tensor) -> None:
    if W.dim() != 2 or W.stride(1) != 1:
        raise ValueError(
            f"{name} must be a row-major [n, d] matrix, got shape {tuple(W.shape)} strides {W.stride()}."
        )


def topk_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: int,
    b_dec: Tensor | None = None,
    copies: WeightCopies | None = None,
) -> tuple[Tensor, Tensor]:
    """(values, indices) of relu(topk((x − b_dec) W_encᵀ + b_enc)) per row; any leading dims of x. With
    `copies`, 16-bit casts of the weights read the optimizer's copies (`weight_copies`)."""
    _check_weights("W_enc", W_enc)
    lead = x.shape[:-1]
    x_BD = x.reshape(-1, x.shape[-1]).contiguous()
    out = _fp8_topk(x_BD, b_dec, W_enc, b_enc, k, copies)
    values, indices = out if out is not None else _TopKEncode.apply(x_BD, b_dec, W_enc, b_enc, k, copies)
    return values.reshape(*lead, k), indices.reshape(*lead, k)


def _fp8_topk(
    x_BD: Tensor, b_dec: Tensor | None, W_enc: Tensor, b_enc: Tensor, k: int, copies: WeightCopies | None
) -> tuple[Tensor, Tensor] | None:
    """Inside `candidates.fp8_encode()`, an encode that needs no gradient from the fp8 GEMM's candidate
    groups (`triton_group.group_topk`); None where that does not apply."""
    state = candidates.active()
    if state is None:
        return None
    operands = (x_BD, b_dec, W_enc, b_enc)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in operands):
        return None
    dtype = _gemm_dtype(x_BD, b_dec, W_enc)
    W_lp = weight_copies.cast(copies, W_enc, dtype)
    n = W_lp.shape[0]
    kept = state.kept(k, triton.cdiv(n, group_config(n, k).group))
    # Whether the path applies depends on x's shape and on the dtype and layout of its cast, not on its
    # values: ask with one row of that cast, so that nothing is cast or quantised where it does not apply.
    if not group_topk_applies(
        x_BD.new_empty(min(len(x_BD), 1), x_BD.shape[-1], dtype=dtype), W_lp, k, kept, fp8=True
    ):
        return None
    if b_dec is None:
        x_lp = x_BD.to(dtype)
        x8 = None
    else:
        x_lp, x8 = centred_e4m3_rows(x_BD, b_dec, dtype)
    b_lp = weight_copies.cast(copies, b_enc, dtype)
    return group_topk(x_lp, W_lp, b_lp, k, kept=kept, fp8_weights=state.weights(W_enc, W_lp), x8=x8)


def encode_at(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    indices: Tensor,
    b_dec: Tensor | None = None,
    copies: WeightCopies | None = None,
) -> Tensor:
    """fp32 [B, k] pre-activations (x − b_dec)·W_enc[indices]ᵀ + b_enc[indices] of [B, d] rows."""
    _check_weights("W_enc", W_enc)
    return _EncodeAt.apply(x.contiguous(), b_dec, W_enc, b_enc, indices.contiguous(), copies)


def sparse_decode(
    values: Tensor,
    indices: Tensor,
    W_dec: Tensor,
    bias: Tensor | None = None,
    copies: WeightCopies | None = None,
) -> Tensor:
    """Σ_j values[..., j] · W_dec[indices[..., j]] (+ bias) without a dense [.., n] code tensor."""
    _check_weights("W_dec", W_dec)
    lead, k = values.shape[:-1], values.shape[-1]
    out = _SparseDecode.apply(
        values.reshape(-1, k).contiguous(), indices.reshape(-1, k).contiguous(), W_dec, bias, copies
    )
    return out.reshape(*lead, W_dec.shape[1])


def decode_with_mse(
    values: Tensor,
    indices: Tensor,
    W_dec: Tensor,
    bias: Tensor | None,
    x: Tensor,
    copies: WeightCopies | None = None,
) -> tuple[Tensor, Tensor]:
    """(`sparse_decode`, `normalized_mse` of it against x) from one fused decoder pass; [B, k] codes and a
    [B, d] x, which gets no gradient."""
    _check_weights("W_dec", W_dec)
    x = x.detach()  # shapes are checked by `decode_mse`
    return _DecodeMSE.apply(
        values.contiguous(),
        indices.contiguous(),
        W_dec,
        bias,
        x if x.stride(-1) == 1 else x.contiguous(),
        copies,
    )


def normalized_mse(x: Tensor, x_hat: Tensor) -> Tensor:
    """The normalised MSE of [B, d] rows (`mmsae.kernels.reference.normalized_mse`) in two fused passes."""
    if x.shape != x_hat.shape or x.dim() != 2:
        raise ValueError(f"x {tuple(x.shape)} and x_hat {tuple(x_hat.shape)} must both be [B, d].")
    return _NormalizedMSE.apply(x.detach(), x_hat)
