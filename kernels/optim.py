"""Adam whose step runs one Triton pass per weight and refreshes the weights' 16-bit copies in it.

`Adam` is `torch.optim.Adam`: same arguments, same state and state-dict format (checkpoints move freely
between the two, tested), same arithmetic. Where the Triton kernels apply (`mmsae.kernels` dispatch: CUDA,
or forced) and every weight with a gradient is contiguous fp32 without AMSGrad, `step` updates each weight
in one pass at Adam's bandwidth floor (`triton_adam`) and, for weights a forward has cast to 16 bits, writes
that copy as well (`weight_copies`), so the next forward does not cast. Anything else runs torch's step.

Two optional param-group keys take over what an SAE trainer does around the step (tested against that
sequence), so that it costs no passes of its own on the fused path:

- `max_grad_norm`: the group's gradients are clipped to this total L2 norm before the step, as
  `torch.nn.utils.clip_grad_norm_(group params, max_grad_norm)` would (None or absent: no clipping).
- `unit_rows`: 2-D weights of the group whose rows are kept unit norm: each row's gradient loses its
  component along the row before clipping (`SAE.remove_parallel_grads`), and each row is divided by its norm
  (clamped to 1e-8) after the step (`SAE.normalize_decoder`); the fused step writes the 16-bit copy of the
  renormalised rows, so it stays current.

On the fused path the gradients are left as backward made them (clipping and projection are applied on the
fly); on torch's path they are modified in place, as the trainer's separate calls did. Neither key is saved
in `state_dict` (a checkpoint of either optimizer loads into the other); `load_state_dict` keeps the
optimizer's own. Everything stays on the device: the step can be captured in a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from mmsae import kernels
from mmsae.kernels.reference import normalize_rows_, remove_parallel_rows_
from mmsae.kernels.weight_copies import WeightCopies

CONSTRAINT_KEYS = ("max_grad_norm", "unit_rows")
"""Param-group keys of this Adam that torch's does not have (kept out of its state dict)."""


class Adam(torch.optim.Adam):
    """`torch.optim.Adam` (same arguments) with a fused Triton step that also writes 16-bit weight copies,
    and optional per-group gradient clipping and unit-norm rows (`max_grad_norm`, `unit_rows`: module doc).

    The copies are `self.weight_copies`; a forward reads them when it is handed that object (the trainer
    sets `sae.weight_copies = optimizer.weight_copies`)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.weight_copies = WeightCopies()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        max_norm = group.get("max_grad_norm")
        if max_norm is not None and not max_norm > 0:
            raise ValueError(f"max_grad_norm={max_norm} must be positive (None: no clipping).")
        group["unit_rows"] = rows = list(group.get("unit_rows") or ())
        in_group = {id(p) for p in group["params"]}
        for w in rows:
            if id(w) not in in_group or w.dim() != 2:
                raise ValueError(
                    f"unit_rows must list 2-D weights of the same param group; got one of shape "
                    f"{tuple(w.shape)}{'' if id(w) in in_group else ' that is not in the group'}."
                )

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        for group in state["param_groups"]:  # fresh dicts: the groups themselves keep their keys
            for key in CONSTRAINT_KEYS:
                group.pop(key, None)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        own = [{key: group[key] for key in CONSTRAINT_KEYS if key in group} for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, keys in zip(self.param_groups, own):
            group.update(keys)

    def __repr__(self) -> str:
        # unit_rows by shape: torch's repr would print the weights' values.
        groups = self.param_groups
        self.param_groups = [
            {**g, "unit_rows": [tuple(w.shape) for w in g.get("unit_rows", ())]} for g in groups
        ]
        try:
            return super().__repr__()
        finally:
            self.param_groups = groups

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:  # first: it makes the gradients the choice below looks at
            with torch.enable_grad():
                loss = closure()
        # A GradScaler (fp16) hands torch's fused step its scale and inf flag as attributes: torch steps.
        scaled = getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None
        if scaled or not all(self._fused_applies(group) for group in self.param_groups):
            self._torch_step()
            return loss
        for group in self.param_groups:
            self._fused_group_step(group)
        return loss

    def _torch_step(self) -> None:
        """torch's step between the trainer's separate torch ops, as an SAE trainer runs them."""
        for group in self.param_groups:
            for w in group.get("unit_rows", ()):
                if w.grad is not None:  # SAE.remove_parallel_grads
                    remove_parallel_rows_(w, w.grad)
            grads = [p for p in group["params"] if p.grad is not None]
            if group.get("max_grad_norm") and grads:
                torch.nn.utils.clip_grad_norm_(grads, group["max_grad_norm"])
        super().step()
        for group in self.param_groups:
            for w in group.get("unit_rows", ()):  # SAE.normalize_decoder
                normalize_rows_(w)

    def _fused_group_step(self, group: dict[str, Any]) -> None:
        from mmsae.kernels.triton_adam import adam_update_, unit_rows_adam_update_

        params = [p for p in group["params"] if p.grad is not None]
        unit = {id(w) for w in group.get("unit_rows", ())}
        steps = [self._state_of(p)["step"] for p in params]
        if steps:
            torch._foreach_add_(steps, 1)  # one launch; the kernels read the counts where they live
        clip = self._clip_coefficient(group, params, unit)
        beta1, beta2 = group["betas"]
        for p, step in zip(params, steps):
            state, copy = self.state[p], self._copy_of(p)
            update = unit_rows_adam_update_ if id(p) in unit else adam_update_
            update(
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
                clip,
            )
            # As torch's in-place step would: a backward through a graph that saved the old weight (or
            # copy) now fails instead of using the new values. Then the copy is stamped as current.
            for written in (p,) if copy is None else (p, copy):
                torch.autograd.graph.increment_version(written)
            if copy is not None:
                self.weight_copies.mark_current(p)
        for w in group.get("unit_rows", ()):
            if w.grad is None:  # not stepped, still renormalised (as the trainer's call would)
                normalize_rows_(w)

    @staticmethod
    def _clip_coefficient(group: dict[str, Any], params: list[Tensor], unit: set[int]) -> Tensor | None:
        """clip_grad_norm_'s min(1, max_norm / (‖g‖ + 1e-6)) over the group's (projected) gradients, on the
        device; None without clipping."""
        max_norm = group.get("max_grad_norm")
        if not max_norm or not params:
            return None
        from mmsae.kernels.triton_adam import unit_rows_grad_norm

        others = [p.grad for p in params if id(p) not in unit]
        norms = list(torch._foreach_norm(others)) if others else []
        norms += [unit_rows_grad_norm(p, p.grad) for p in params if id(p) in unit]
        total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
        return (max_norm / (total + 1e-6)).clamp(max=1.0).reshape(1)

    @staticmethod
    def _fused_applies(group: dict) -> bool:
        if group["amsgrad"] or group["differentiable"] or isinstance(group["betas"][0], Tensor):
            return False
        from mmsae.kernels.triton_adam import rows_fit

        return all(
            not p.grad.is_sparse
            and p.dtype == p.grad.dtype == torch.float32
            and p.is_contiguous()
            and p.grad.is_contiguous()
            and kernels._use_triton(p)
            for p in group["params"]
            if p.grad is not None
        ) and all(rows_fit(w) and w.is_contiguous() for w in group.get("unit_rows", ()))

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
