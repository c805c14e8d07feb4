"""Sparse SAE kernels with one dispatch point.

`topk_encode`, `sparse_decode`, `decode_with_mse` (decoder + loss, in training) and `topk_indices` (AuxK's and
AbsTopK's selections) are what the SAE family calls; `feature_sums_`, `residual_sums_`,
`merge_sorted_top_`, and `pair_keys` with `gather_pairs` (the merge's sort) are the feature-statistics pass's
per-chunk steps. On CUDA they run the Triton kernels
of this package (when available); elsewhere, or when forced, the torch reference in
`mmsae.kernels.reference`, except the CPU decoder, which gathers rows instead of the reference's dense
product (`mmsae.kernels.cpu`). Force a backend with `set_backend("torch" | "triton" | "auto")` or the
environment variable `MMSAE_KERNELS`."""

from __future__ import annotations

import os
from typing import Literal

import torch
from torch import Tensor

from mmsae.kernels import cpu, reference
from mmsae.kernels.candidates import encoding as encoding
from mmsae.kernels.candidates import fp8_encode as fp8_encode
from mmsae.kernels.weight_copies import WeightCopies

Backend = Literal["auto", "torch", "triton"]
_BACKEND: Backend = os.environ.get("MMSAE_KERNELS", "auto")  # type: ignore[assignment]


def set_backend(backend: Backend) -> None:
    global _BACKEND
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"Unknown kernel backend {backend!r}; use 'auto', 'torch' or 'triton'.")
    _BACKEND = backend


def get_backend() -> Backend:
    return _BACKEND


def _use_triton(t: Tensor) -> bool:
    if _BACKEND == "torch":
        return False
    if _BACKEND == "triton":
        return True
    return t.is_cuda and _triton_available()


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    try:
        from mmsae.kernels import triton_ops  # noqa: F401
    except ImportError:
        return False
    return True


def topk_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: int,
    b_dec: Tensor | None = None,
    copies: WeightCopies | None = None,
) -> tuple[Tensor, Tensor]:
    """(values, indices) of relu(topk((x − b_dec) W_encᵀ + b_enc)); without b_dec, x is already centred.

    `copies` (the training optimizer's `WeightCopies`) lets the Triton path read its 16-bit weight copies."""
    if _use_triton(x):
        from mmsae.kernels import triton_ops

        return triton_ops.topk_encode(x, W_enc, b_enc, k, b_dec, copies)
    return reference.topk_encode(x if b_dec is None else x - b_dec, W_enc, b_enc, k)


def encode_at(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    indices: Tensor,
    b_dec: Tensor | None = None,
    copies: WeightCopies | None = None,
) -> Tensor:
    """[B, k] pre-activations (x − b_dec)·W_enc[indices]ᵀ + b_enc[indices] of [B, d] rows, differentiable in
    x, W_enc, b_enc and b_dec. The Triton path computes only the k entries and their sparse backward (fp32
    values, as the 16-bit GEMM with an fp32 bias gives under autocast); the reference gathers them from the
    dense pre-activations."""
    if _use_triton(x):
        from mmsae.kernels import triton_ops

        return triton_ops.encode_at(x, W_enc, b_enc, indices, b_dec, copies)
    return (x if b_dec is None else x - b_dec).matmul(W_enc.T).add(b_enc).gather(-1, indices)


def topk_indices(scores_BN: Tensor, k: int) -> Tensor:
    """[B, k] int64 indices of the k largest scores of each row, unsorted, without a gradient.

    The Triton select takes 16-bit or fp32 [B, n] row-major scores with k ≤ min(n, INDICES_MAX_K) (fp32: where
    the group select fits): it picks exactly the set of a stable sort (ties to the lowest column), −∞ ranks
    below every number, so a row with fewer than k finite scores fills the rest with distinct −∞ columns.
    Anything else gets torch.topk, whose choice among ties is unspecified: gather the values from the scores'
    source to keep their gradient."""
    scores_BN = scores_BN.detach()
    if _use_triton(scores_BN) and _select_applies(scores_BN, k):
        from mmsae.kernels import triton_select

        return triton_select.topk_select(scores_BN, k)[1]
    return scores_BN.topk(k, dim=-1, sorted=False).indices


INDICES_MAX_K = 256
"""Largest k `topk_indices` hands to the Triton select (docs/benchmarks.md, "Top-k select"; H200, 4096 rows):
at k ≤ 256 it takes 0.19–0.82 × torch.topk's time (bf16 and fp32, n = 4096 and 16384); at k = 384 and 512
with n = 16384 it takes 2.0 × (bf16) and 3.8 × (fp32), which made AuxK at d = 768 (k_aux 384) slower."""


def _select_applies(scores_BN: Tensor, k: int) -> bool:
    from mmsae.kernels import triton_select as ts

    if scores_BN.dim() != 2 or scores_BN.shape[0] == 0 or scores_BN.stride(1) != 1:
        return False
    n = scores_BN.shape[1]
    if not 0 < k <= min(n, ts.MAX_K, INDICES_MAX_K):
        return False
    if scores_BN.dtype in ts.WIDE_SELECT_DTYPES:  # fp32 (AuxK's pre-activations): the group select only
        return ts.group_select_fits(k, ts.group_config(n, k))
    return scores_BN.dtype in ts.SELECT_DTYPES


def sparse_decode(
    values: Tensor,
    indices: Tensor,
    W_dec: Tensor,
    bias: Tensor | None = None,
    copies: WeightCopies | None = None,
) -> Tensor:
    """Σ_j values[:, j] · W_dec[indices[:, j]] (+ bias), [B, d], differentiable in values, W_dec and bias.
    CUDA: the Triton gather; CPU fp32/fp64: `embedding_bag`'s weighted sum (`kernels.cpu`); else the
    reference's dense product."""
    if _use_triton(values):
        from mmsae.kernels import triton_ops

        return triton_ops.sparse_decode(values, indices, W_dec, bias, copies)
    if _BACKEND == "auto" and cpu.gather_decode_applies(values, indices, W_dec):
        return cpu.sparse_decode(values, indices, W_dec, bias)
    return reference.sparse_decode(values, indices, W_dec, bias)


def decode_with_mse(
    values: Tensor,
    indices: Tensor,
    W_dec: Tensor,
    bias: Tensor | None,
    x: Tensor,
    copies: WeightCopies | None = None,
) -> tuple[Tensor, Tensor]:
    """(x̂, normalized_mse(x, x̂)) with x̂ = `sparse_decode(values, indices, W_dec, bias)`: on the Triton path
    one fused pass whose backward needs no gather of its own (training's reconstruction term). Takes [B, k]
    codes and a [B, d] x that needs no gradient; anything else gets the two calls it stands for."""
    if _use_triton(values) and values.dim() == 2 and x.dim() == 2 and not x.requires_grad:
        from mmsae.kernels import triton_ops

        return triton_ops.decode_with_mse(values, indices, W_dec, bias, x, copies)
    x_hat = sparse_decode(values, indices, W_dec, bias, copies)
    return x_hat, normalized_mse(x, x_hat)


def feature_sums_(
    grp_M: Tensor,
    raw_M: Tensor,
    fire: Tensor,
    total: Tensor,
    peak: Tensor,
    hist: Tensor,
    log10_range: tuple[float, float],
) -> None:
    """Add M (feature, value) pairs to per-feature accumulators, in place: `fire` (+1) and `total` (+value),
    float64 [G]; `peak` (max), float32 [G]; `hist`, float64 [G, bins], +1 in the bin of log10|value| over
    `log10_range` (clamped to the end bins). `grp_M` int64 [M] < G, `raw_M` float32 [M]. The Triton path is
    one pass of atomics; a value within an ulp of a bin edge may land in the next bin there."""
    if _use_triton(raw_M):
        from mmsae.kernels import triton_stats

        return triton_stats.feature_sums_(grp_M, raw_M, fire, total, peak, hist, log10_range)
    return reference.feature_sums_(grp_M, raw_M, fire, total, peak, hist, log10_range)


def residual_sums_(
    x_ND: Tensor, x_hat_ND: Tensor, shift_D: Tensor, x_sum: Tensor, x_sq: Tensor, sq_err: Tensor
) -> None:
    """Add Σ(x − s) ([d]), Σ‖x − s‖² and Σ‖x − x̂‖² of [N, d] rows to float64 accumulators, in place, the
    chunk's sums taken in float32 (s: a float32 [d] shift that keeps the variance free of cancellation).
    The Triton path reads x and x̂ once, with no [N, d] temporaries."""
    if _use_triton(x_ND) and x_ND.dim() == 2 and x_ND.shape == x_hat_ND.shape:
        from mmsae.kernels import triton_stats

        return triton_stats.residual_sums_(x_ND, x_hat_ND, shift_D, x_sum, x_sq, sq_err)
    return reference.residual_sums_(x_ND, x_hat_ND, shift_D, x_sum, x_sq, sq_err)


def pair_keys(grp_M: Tensor, v_M: Tensor) -> Tensor:
    """int32 sort keys of M (group, bf16 value) pairs, group < 2¹⁶: a stable sort of them orders the pairs by
    group, then by value, largest first, NaNs (of either sign) first and −0 after +0. The key is
    group · 2¹⁶ + the value's bits mapped to a descending integer, shifted into int32."""
    if v_M.dtype != torch.bfloat16 or grp_M.shape != v_M.shape:
        raise ValueError(f"pair_keys takes bf16 values and groups of one shape, got {v_M.dtype} values.")
    if _use_triton(v_M):
        from mmsae.kernels import triton_pairs

        return triton_pairs.pair_keys(grp_M, v_M)
    return reference.pair_keys(grp_M, v_M)


def gather_pairs(order_M: Tensor, grp_M: Tensor, v_M: Tensor, per_row: int) -> tuple[Tensor, Tensor, Tensor]:
    """(grp[order], v[order] as float32, order // per_row): sparse codes' pairs in sorted order with the token
    row of each (pair i of [N, per_row] codes belongs to row i // per_row), in one pass on the Triton path."""
    if _use_triton(v_M):
        from mmsae.kernels import triton_pairs

        return triton_pairs.gather_pairs(order_M, grp_M, v_M, per_row)
    return reference.gather_pairs(order_M, grp_M, v_M, per_row)


def merge_sorted_top_(
    top_v: Tensor,
    top_meta: Tensor,
    grp_M: Tensor,
    v_M: Tensor,
    row_M: Tensor,
    meta_N3: Tensor,
    distinct: bool,
) -> None:
    """Merge a chunk's (feature, value) entries into a running top k per feature, in place.

    `top_v` float32 [k, n] and `top_meta` int64 [k, n, 3] (example, token, timestep) hold each feature's best
    entries, best first, −∞ / −1 where empty. The chunk's M entries come sorted by feature `grp_M` (int64,
    n for entries to ignore), then by value `v_M` (float32) descending, stably; `row_M` is each entry's row
    of `meta_N3` (int64 [N, 3]). The new top is a stable descending sort's first k of the running top
    followed by the entries in their order (equal values: the running top first, then the earlier entry); a
    NaN ranks first, −∞ counts as no entry. With `distinct`, an entry whose example (meta column 0) a
    better-ranked entry holds is dropped, so each example keeps its best entry per feature. The Triton path
    reads each feature's run a window at a time and ranks the window against the top in registers."""
    if _use_triton(top_v) and top_v.dtype == v_M.dtype == torch.float32:
        from mmsae.kernels import triton_stats

        return triton_stats.merge_sorted_top_(top_v, top_meta, grp_M, v_M, row_M, meta_N3, distinct)
    return reference.merge_sorted_top_(top_v, top_meta, grp_M, v_M, row_M, meta_N3, distinct)


def normalized_mse(x: Tensor, x_hat: Tensor) -> Tensor:
    """‖x − x̂‖² / ‖x − x̄‖² (batch means, fp32); x gets no gradient on the Triton path, which takes
    [B, d] rows and falls back to the reference for other shapes or when x requires a gradient."""
    if _use_triton(x_hat) and x.dim() == 2 and x.shape == x_hat.shape and not x.requires_grad:
        from mmsae.kernels import triton_ops

        return triton_ops.normalized_mse(x, x_hat)
    return reference.normalized_mse(x, x_hat)
