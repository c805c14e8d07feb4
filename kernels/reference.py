"""Torch reference implementations: the ground truth every Triton kernel is tested against."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
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


def merge_sorted_top_(
    top_v: Tensor,
    top_meta: Tensor,
    grp_M: Tensor,
    v_M: Tensor,
    row_M: Tensor,
    meta_N3: Tensor,
    distinct: bool,
) -> None:
    """See `mmsae.kernels.merge_sorted_top_`: each feature's first k entries (after dropping, with `distinct`,
    an example's later entries) are the chunk's best; the running top and those, sorted stably along the
    first axis, give the new top, where `distinct` drops an entry whose example a better-ranked one holds."""
    k, n = top_v.shape
    N = meta_N3.shape[0]
    live = (grp_M < n) & (v_M != -math.inf)
    if distinct:  # an example's first entry in a feature's run is its best; later ones go
        example = _example_rank(meta_N3[:, 0])[row_M]
        by_example = (grp_M * N + example).argsort(stable=True)
        key = grp_M[by_example] * N + example[by_example]
        first = torch.ones_like(live)
        first[by_example[1:]] = key[1:] != key[:-1]
        live &= first
    kept = live.long().cumsum(0)
    before = (kept - live.long())[torch.searchsorted(grp_M, grp_M)]  # kept entries before each group
    rank = torch.where(live, kept - 1 - before, k).clamp_(max=k)  # row k: dropped
    slot = rank * (n + 1) + grp_M.clamp(max=n)
    size = ((k + 1) * (n + 1),)
    best_v = torch.full(size, -math.inf, device=v_M.device).scatter_(0, slot, v_M.float())
    best_r = torch.full(size, N, dtype=torch.long, device=v_M.device).scatter_(0, slot, row_M)
    best_meta = F.pad(meta_N3, (0, 0, 0, 1), value=-1)[best_r.view(k + 1, n + 1)[:k, :n]]
    cand_v = torch.cat([top_v, best_v.view(k + 1, n + 1)[:k, :n]])
    cand_meta = torch.cat([top_meta, best_meta])
    cand_v, idx = cand_v.sort(dim=0, descending=True, stable=True)
    if distinct:  # across the two tables: an example's first entry in this order stays
        ids = cand_meta[..., 0].gather(0, idx).masked_fill(cand_v == -math.inf, -1)
        by_id = ids.argsort(dim=0, stable=True)
        ids_s = ids.gather(0, by_id)
        dup_s = F.pad((ids_s[1:] == ids_s[:-1]) & (ids_s[1:] >= 0), (0, 0, 1, 0))
        dup = torch.zeros_like(dup_s).scatter_(0, by_id, dup_s)
        order = dup.char().argsort(dim=0, stable=True)  # kept entries first, in value order
        cand_v = cand_v.gather(0, order).masked_fill_(dup.gather(0, order), -math.inf)
        idx = idx.gather(0, order)
    out_meta = cand_meta.gather(0, idx[:k, :, None].expand(-1, -1, cand_meta.shape[-1]))
    top_v.copy_(cand_v[:k])
    top_meta.copy_(out_meta.masked_fill_((cand_v[:k] == -math.inf)[..., None], -1))


def _example_rank(example_id: Tensor) -> Tensor:
    """[N] → each token's example as a rank 0..N−1 (equal ids, equal ranks): `unique`'s inverse without
    its data-dependent output size."""
    ids_s, order = example_id.sort(stable=True)
    new = F.pad(ids_s[1:] != ids_s[:-1], (1, 0), value=True).long()
    return torch.empty_like(new).scatter_(0, order, new.cumsum(0) - 1)


def pair_keys(grp_M: Tensor, v_M: Tensor) -> Tensor:
    bits = v_M.view(torch.int16)
    ordered = torch.where(bits < 0, bits ^ 0x7FFF, bits)  # increases with the bf16 value
    ordered.masked_fill_(v_M.isnan(), 2**15 - 1)
    # group·2¹⁶ + (2¹⁵ − 1 − ordered) ∈ [0, 2³²), shifted by −2³¹ into int32.
    return (grp_M.long() * 2**16 - ordered).add_(2**15 - 1 - 2**31).int()


def gather_pairs(order_M: Tensor, grp_M: Tensor, v_M: Tensor, per_row: int) -> tuple[Tensor, Tensor, Tensor]:
    return grp_M[order_M], v_M[order_M].float(), order_M.div(per_row, rounding_mode="floor")
