"""One Adam update of an fp32 weight in one pass, optionally writing its 16-bit copy (`weight_copies`).

Per element it reads the weight, its gradient and both moments and writes the weight and the moments: 28
bytes, the bandwidth floor of Adam with fp32 state (+2 for the copy). torch's fused Adam does the same
arithmetic in the same order (moments by multiply-add, then p −= lr/bc1 · m / (√v / √bc2 + eps)).
The step count and the LR may live on the device (capturable Adam, CUDA graphs): the kernel then reads them
and computes the bias corrections itself, as torch's fused Adam does.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK, WARPS = 2048, 8


@triton.jit
def _one_minus_exp(x):
    """1 − eˣ for x ≤ 0, to fp32 precision also where it is tiny (1 − β₂ᵗ at t = 1 is 10⁻³)."""
    series = -x * (1.0 + x / 2 * (1.0 + x / 3 * (1.0 + x / 4 * (1.0 + x / 5 * (1.0 + x / 6)))))
    return tl.where(x > -0.1, series, 1.0 - tl.exp(x))


@triton.jit
def _adam_kernel(
    p_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    copy_ptr,
    lr_ptr,
    step_ptr,
    numel,
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
    WRITE_COPY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    p = tl.load(p_ptr + offs, mask=ok, other=0.0)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=ok, other=0.0)
    v = tl.load(v_ptr + offs, mask=ok, other=0.0)
    if LR_ON_DEVICE:
        lr = tl.load(lr_ptr).to(tl.float32)
    if STEP_ON_DEVICE:
        step = tl.load(step_ptr).to(tl.float32)
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
    tl.store(p_ptr + offs, p, mask=ok)
    tl.store(m_ptr + offs, m, mask=ok)
    tl.store(v_ptr + offs, v, mask=ok)
    if WRITE_COPY:
        tl.store(copy_ptr + offs, p.to(copy_ptr.dtype.element_ty), mask=ok)


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
) -> None:
    """p, exp_avg, exp_avg_sq updated in place by one Adam (AdamW with `decoupled_weight_decay`) step
    numbered `step` (already incremented); `copy`, when given, receives p's new value in its dtype.
    Weight, gradient and moments: contiguous fp32 tensors of one shape."""
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("copy", copy)):
        if t is not None and (t.shape != p.shape or not (t.is_contiguous() and p.is_contiguous())):
            raise ValueError(
                f"{name} must be contiguous and of the weight's shape {tuple(p.shape)}, got {tuple(t.shape)}."
            )
    for name, t in (("weight", p), ("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.dtype != torch.float32:
            raise ValueError(
                f"the fused Adam updates fp32 weights from fp32 gradients and moments; {name} is {t.dtype}."
            )
    numel = p.numel()
    if numel == 0:
        return
    lr_on_device, step_on_device = isinstance(lr, Tensor), isinstance(step, Tensor)
    _adam_kernel[(triton.cdiv(numel, BLOCK),)](
        p,
        grad,
        exp_avg,
        exp_avg_sq,
        p if copy is None else copy,
        lr if lr_on_device else p,
        step if step_on_device else p,
        numel,
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
        MAXIMIZE=maximize,
        DECAY=0 if weight_decay == 0 else 2 if decoupled_weight_decay else 1,
        LR_ON_DEVICE=lr_on_device,
        STEP_ON_DEVICE=step_on_device,
        WRITE_COPY=copy is not None,
        BLOCK=BLOCK,
        num_warps=WARPS,
    )


def _log(beta: float) -> float:
    return math.log(beta) if beta > 0 else -math.inf  # β = 0: 1 − βᵗ = 1
