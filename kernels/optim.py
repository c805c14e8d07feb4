"""Adam whose step runs one Triton pass per weight and refreshes the weights' 16-bit copies in it.

`Adam` is `torch.optim.Adam`: same arguments, same state and state-dict format (checkpoints move freely
between the two, tested), same arithmetic. Where the Triton kernels apply (`mmsae.kernels` dispatch: CUDA,
or forced) and every weight with a gradient is contiguous fp32 without AMSGrad, `step` updates each weight
in one pass at Adam's bandwidth floor (`triton_adam`) and, for weights a forward has cast to 16 bits, writes
that copy as well (`weight_copies`), so the next forward does not cast. Anything else runs torch's step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from mmsae import kernels
from mmsae.kernels.weight_copies import WeightCopies


class Adam(torch.optim.Adam):
    """`torch.optim.Adam` (same arguments) with a fused Triton step that also writes 16-bit weight copies.

    The copies are `self.weight_copies`; a forward reads them when it is handed that object (the trainer
    sets `sae.weight_copies = optimizer.weight_copies`)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.weight_copies = WeightCopies()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:  # first: it makes the gradients the choice below looks at
            with torch.enable_grad():
                loss = closure()
        # A GradScaler (fp16) hands torch's fused step its scale and inf flag as attributes: torch steps.
        scaled = getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None
        if scaled or not all(self._fused_applies(group) for group in self.param_groups):
            super().step()
            return loss
        from mmsae.kernels.triton_adam import adam_update_

        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            steps = [self._state_of(p)["step"] for p in params]
            if steps:
                torch._foreach_add_(steps, 1)  # one launch; the kernels read the counts where they live
            beta1, beta2 = group["betas"]
            for p, step in zip(params, steps):
                state, copy = self.state[p], self._copy_of(p)
                adam_update_(
                    p,
                    p.grad,
                    state["exp_avg"],
                    state["exp_avg_sq"],
                    step,
                    group["lr"],
                    beta1,
                    beta2,
                    group["eps"],
                    group["weight_decay"],
                    group["maximize"],
                    group.get("decoupled_weight_decay", False),
                    copy,
                )
                # As torch's in-place step would: a backward through a graph that saved the old weight (or
                # copy) now fails instead of using the new values. Then the copy is stamped as current.
                for written in (p,) if copy is None else (p, copy):
                    torch.autograd.graph.increment_version(written)
                if copy is not None:
                    self.weight_copies.mark_current(p)
        return loss

    @staticmethod
    def _fused_applies(group: dict) -> bool:
        if group["amsgrad"] or group["differentiable"] or isinstance(group["betas"][0], Tensor):
            return False
        return all(
            not p.grad.is_sparse
            and p.dtype == p.grad.dtype == torch.float32
            and p.is_contiguous()
            and p.grad.is_contiguous()
            and kernels._use_triton(p)
            for p in group["params"]
            if p.grad is not None
        )

    def _state_of(self, p: Tensor) -> dict[str, Tensor]:
        """p's state as torch's fused Adam lays it out (fp32 step count on p's device); made on first use."""
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif state["step"].device != p.device or state["step"].dtype != torch.float32:
            # a host-side count, from torch's default (unfused) Adam
            state["step"] = state["step"].to(p.device, torch.float32)
        return state

    def _copy_of(self, p: Tensor) -> Tensor | None:
        """Where this step writes p's 16-bit copy, if a forward casts p (never allocated inside a capture)."""
        copies = self.weight_copies
        dtype = copies.wanted(p)
        if dtype is None:
            return None
        if p.is_cuda and torch.cuda.is_current_stream_capturing() and not copies.has_buffer(p, dtype):
            return None
        return copies.buffer(p, dtype)
