"""One Adam update of an fp32 weight in one pass, optionally writing its 16-bit copy (`weight_copies`).

Per element it reads the weight, its gradient and both moments and writes the weight and the moments: 28
bytes, the bandwidth floor of Adam with fp32 state (+2 for the copy). torch's fused Adam does the same
arithmetic in the same order (moments by multiply-add, then p −= lr/bc1 · m / (√v / √bc2 + eps)).
The step count and the LR may live on the device (capturable Adam, CUDA graphs): the kernel then reads them
and computes the bias corrections itself, as torch's fused Adam does.

The same pass can take over the SAE trainer's gradient clipping and unit-norm atoms, which otherwise cost ~10
extra passes over the weights with torch ops: it scales the gradient by a clip coefficient read from the
device (`clip`, from `unit_rows_grad_norm` and the other gradients' norms), and for a weight of unit-norm
rows (`unit_rows_adam_update_`, a row-blocked variant) it projects each row's gradient off the row, g −
(g·w)w, and writes the updated row renormalised, p / max(‖p‖, 1e-8), with its 16-bit copy of those values.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK, WARPS = 2048, 8
ROW_ELEMENTS = 4096
"""Elements per program of the row-blocked kernels: 4 rows of d=768 (padded to 1024), 1 row of d=4096."""
MAX_ROW_BLOCK = 16384
"""Widest row (next power of two of d) the row-blocked kernels hold in registers at once."""


@triton.jit
def _one_minus_exp(x):
    """1 − eˣ for x ≤ 0, to fp32 precision also where it is tiny (1 − β₂ᵗ at t = 1 is 10⁻³)."""
    series = -x * (1.0 + x / 2 * (1.0 + x / 3 * (1.0 + x / 4 * (1.0 + x / 5 * (1.0 + x / 6)))))
    return tl.where(x > -0.1, series, 1.0 - tl.exp(x))


@triton.jit
def _adam_math(
    p,
    g,
    m,
    v,
    lr_ptr,
    step_ptr,
    clip_ptr,
    lr,
    step,
    beta1,
    beta2,
    one_minus_beta1,
    one_minus_beta2,
    log_beta1,
    log_beta2,
    eps,
    weight_decay,
    MAXIMIZE: tl.constexpr,
    DECAY: tl.constexpr,
    LR_ON_DEVICE: tl.constexpr,
    STEP_ON_DEVICE: tl.constexpr,
    CLIP: tl.constexpr,
):
    """torch's fused Adam on loaded values (after clip_grad_norm_'s scaling when CLIP): new (p, m, v)."""
    if LR_ON_DEVICE:
        lr = tl.load(lr_ptr).to(tl.float32)
    if STEP_ON_DEVICE:
        step = tl.load(step_ptr).to(tl.float32)
    if CLIP:
        g = g * tl.load(clip_ptr)
    if MAXIMIZE:
        g = -g
    if DECAY == 1:  # L2 (Adam)
        g = g + weight_decay * p
    elif DECAY == 2:  # decoupled (AdamW)
        p = p * (1.0 - lr * weight_decay)
    # 1 − βᵗ from ln β (computed in double on the host): no fp32 rounding of βᵗ near 1.
    bc1 = _one_minus_exp(step * log_beta1)
    bc2_sqrt = tl.sqrt(_one_minus_exp(step * log_beta2))
    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * g * g
    p = p - (lr / bc1) * m / (tl.sqrt(v) / bc2_sqrt + eps)
    return p, m, v


@triton.jit
def _adam_kernel(
    p_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    copy_ptr,
    numel,
    lr_ptr,
    step_ptr,
    clip_ptr,
    lr,
    step,
    beta1,
    beta2,
    one_minus_beta1,
    one_minus_beta2,
    log_beta1,
    log_beta2,
    eps,
    weight_decay,
    MAXIMIZE: tl.constexpr,
    DECAY: tl.constexpr,
    LR_ON_DEVICE: tl.constexpr,
    STEP_ON_DEVICE: tl.constexpr,
    CLIP: tl.constexpr,
    WRITE_COPY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    p = tl.load(p_ptr + offs, mask=ok, other=0.0)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=ok, other=0.0)
    v = tl.load(v_ptr + offs, mask=ok, other=0.0)
    p, m, v = _adam_math(
        p, g, m, v, lr_ptr, step_ptr, clip_ptr, lr, step, beta1, beta2, one_minus_beta1, one_minus_beta2,
        log_beta1, log_beta2, eps, weight_decay, MAXIMIZE, DECAY, LR_ON_DEVICE, STEP_ON_DEVICE, CLIP,
    )  # fmt: skip
    tl.store(p_ptr + offs, p, mask=ok)
    tl.store(m_ptr + offs, m, mask=ok)
    tl.store(v_ptr + offs, v, mask=ok)
    if WRITE_COPY:
        tl.store(copy_ptr + offs, p.to(copy_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _unit_rows_adam_kernel(
    p_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    copy_ptr,
    n_rows,
    d,
    lr_ptr,
    step_ptr,
    clip_ptr,
    lr,
    step,
    beta1,
    beta2,
    one_minus_beta1,
    one_minus_beta2,
    log_beta1,
    log_beta2,
    eps,
    weight_decay,
    MAXIMIZE: tl.constexpr,
    DECAY: tl.constexpr,
    LR_ON_DEVICE: tl.constexpr,
    STEP_ON_DEVICE: tl.constexpr,
    CLIP: tl.constexpr,
    WRITE_COPY: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    ok = (rows[:, None] < n_rows) & (cols[None, :] < d)
    offs = rows[:, None] * d + cols[None, :]
    p = tl.load(p_ptr + offs, mask=ok, other=0.0)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=ok, other=0.0)
    v = tl.load(v_ptr + offs, mask=ok, other=0.0)
    # SAE.remove_parallel_grads: the component along the (unit) row would only change its norm.
    g = g - tl.sum(g * p, axis=1)[:, None] * p
    p, m, v = _adam_math(
        p, g, m, v, lr_ptr, step_ptr, clip_ptr, lr, step, beta1, beta2, one_minus_beta1, one_minus_beta2,
        log_beta1, log_beta2, eps, weight_decay, MAXIMIZE, DECAY, LR_ON_DEVICE, STEP_ON_DEVICE, CLIP,
    )  # fmt: skip
    # SAE.normalize_decoder; padding columns hold zeros (zero weight, gradient and moments stay zero).
    p = p / tl.maximum(tl.sqrt(tl.sum(p * p, axis=1)), 1e-8)[:, None]
    tl.store(p_ptr + offs, p, mask=ok)
    tl.store(m_ptr + offs, m, mask=ok)
    tl.store(v_ptr + offs, v, mask=ok)
    if WRITE_COPY:
        tl.store(copy_ptr + offs, p.to(copy_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _unit_rows_sumsq_kernel(p_ptr, g_ptr, out_ptr, n_rows, d, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Σ over this program's rows of ‖g − (g·w)w‖²: the projected gradient's norm², never written."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    ok = (rows[:, None] < n_rows) & (cols[None, :] < d)
    offs = rows[:, None] * d + cols[None, :]
    p = tl.load(p_ptr + offs, mask=ok, other=0.0)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    g = g - tl.sum(g * p, axis=1)[:, None] * p
    tl.store(out_ptr + tl.program_id(0), tl.sum(tl.sum(g * g, axis=1), axis=0))


def adam_update_(
    p: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor | float,
    lr: Tensor | float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float = 0.0,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    copy: Tensor | None = None,
    clip: Tensor | None = None,
) -> None:
    """p, exp_avg, exp_avg_sq updated in place by one Adam (AdamW with `decoupled_weight_decay`) step
    numbered `step` (already incremented); `copy`, when given, receives p's new value in its dtype; `clip`, a
    one-element fp32 device tensor, scales the gradient first (clip_grad_norm_'s coefficient).
    Weight, gradient and moments: contiguous fp32 tensors of one shape."""
    _check(p, grad, exp_avg, exp_avg_sq, copy)
    numel = p.numel()
    if numel == 0:
        return
    _adam_kernel[(triton.cdiv(numel, BLOCK),)](
        p,
        grad,
        exp_avg,
        exp_avg_sq,
        p if copy is None else copy,
        numel,
        *_hyper(p, step, lr, clip, beta1, beta2, eps, weight_decay),
        **_flags(step, lr, clip, copy, maximize, weight_decay, decoupled_weight_decay),
        BLOCK=BLOCK,
        num_warps=WARPS,
    )


def unit_rows_adam_update_(
    p: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor | float,
    lr: Tensor | float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float = 0.0,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    copy: Tensor | None = None,
    clip: Tensor | None = None,
) -> None:
    """`adam_update_` of a weight whose rows are kept unit norm: each row's gradient g becomes
    clip · (g − (g·w)w) (w: the row before the step), and the updated row is written (with its copy) divided
    by max(‖row‖, 1e-8). p: [rows, d] with d ≤ `MAX_ROW_BLOCK` (`rows_fit`)."""
    _check(p, grad, exp_avg, exp_avg_sq, copy)
    n_rows, rows, block_d = _row_blocks(p)
    if n_rows == 0:
        return
    _unit_rows_adam_kernel[(triton.cdiv(n_rows, rows),)](
        p,
        grad,
        exp_avg,
        exp_avg_sq,
        p if copy is None else copy,
        n_rows,
        p.shape[1],
        *_hyper(p, step, lr, clip, beta1, beta2, eps, weight_decay),
        **_flags(step, lr, clip, copy, maximize, weight_decay, decoupled_weight_decay),
        ROWS=rows,
        BLOCK_D=block_d,
        num_warps=_row_warps(block_d),
    )


def unit_rows_grad_norm(p: Tensor, grad: Tensor) -> Tensor:
    """‖G − diag(G Wᵀ) W‖ over all rows, a 0-dim fp32 device tensor (no host sync): the norm of the gradient
    `unit_rows_adam_update_` steps with, as `clip_grad_norm_` would see it after the projection."""
    _check(p, grad, None, None, None)
    n_rows, rows, block_d = _row_blocks(p)
    partial = torch.zeros(triton.cdiv(n_rows, rows), dtype=torch.float32, device=p.device)
    if n_rows:
        _unit_rows_sumsq_kernel[(len(partial),)](
            p, grad, partial, n_rows, p.shape[1], ROWS=rows, BLOCK_D=block_d, num_warps=_row_warps(block_d)
        )
    return partial.sum().sqrt()


def rows_fit(p: Tensor) -> bool:
    """Whether the row-blocked kernels take p: a 2-D weight with rows of at most `MAX_ROW_BLOCK`."""
    return p.dim() == 2 and triton.next_power_of_2(max(1, p.shape[1])) <= MAX_ROW_BLOCK


def _row_blocks(p: Tensor) -> tuple[int, int, int]:
    """(rows, rows per program, padded row width) of a 2-D weight."""
    if not rows_fit(p):
        raise ValueError(
            f"the unit-row Adam takes 2-D weights with rows of at most {MAX_ROW_BLOCK}; got {tuple(p.shape)}."
        )
    block_d = triton.next_power_of_2(max(1, p.shape[1]))
    return p.shape[0], max(1, ROW_ELEMENTS // block_d), block_d


def _row_warps(block_d: int) -> int:
    return 16 if block_d >= 8192 else 8


def _check(
    p: Tensor, grad: Tensor, exp_avg: Tensor | None, exp_avg_sq: Tensor | None, copy: Tensor | None
) -> None:
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("copy", copy)):
        if t is not None and (t.shape != p.shape or not (t.is_contiguous() and p.is_contiguous())):
            raise ValueError(
                f"{name} must be contiguous and of the weight's shape {tuple(p.shape)}, got {tuple(t.shape)}."
            )
    for name, t in (("weight", p), ("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t is not None and t.dtype != torch.float32:
            raise ValueError(
                f"the fused Adam updates fp32 weights from fp32 gradients and moments; {name} is {t.dtype}."
            )


def _hyper(
    p: Tensor,
    step: Tensor | float,
    lr: Tensor | float,
    clip: Tensor | None,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> tuple:
    """The kernels' arguments from lr_ptr to weight_decay (a pointer not read is given p)."""
    lr_on_device, step_on_device = isinstance(lr, Tensor), isinstance(step, Tensor)
    return (
        lr if lr_on_device else p,
        step if step_on_device else p,
        p if clip is None else clip,
        0.0 if lr_on_device else float(lr),
        0.0 if step_on_device else float(step),
        # 1 − β from the host in double: in fp32, 1 − fl(0.999) is off by 1.3e-5 relative.
        beta1,
        beta2,
        1.0 - beta1,
        1.0 - beta2,
        _log(beta1),
        _log(beta2),
        eps,
        weight_decay,
    )


def _flags(
    step: Tensor | float,
    lr: Tensor | float,
    clip: Tensor | None,
    copy: Tensor | None,
    maximize: bool,
    weight_decay: float,
    decoupled_weight_decay: bool,
) -> dict[str, object]:
    return {
        "MAXIMIZE": maximize,
        "DECAY": 0 if weight_decay == 0 else 2 if decoupled_weight_decay else 1,
        "LR_ON_DEVICE": isinstance(lr, Tensor),
        "STEP_ON_DEVICE": isinstance(step, Tensor),
        "CLIP": clip is not None,
        "WRITE_COPY": copy is not None,
    }


def _log(beta: float) -> float:
    return math.log(beta) if beta > 0 else -math.inf  # β = 0: 1 − βᵗ = 1
