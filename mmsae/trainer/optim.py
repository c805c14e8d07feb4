"""The trainer's optimizer: one Adam param group per SAE, its LR schedule, and who keeps the atoms unit norm.

The TopK-family recipe clips each SAE's gradients to a norm (`grad_clip`), removes the decoder gradient's
component along each atom before the step and renormalises the atoms after it. For an SAE whose dictionary is
a plain `W_dec` parameter with the base class's constraints, the optimizer does all three (param-group keys
`max_grad_norm` and `unit_rows` of `mmsae.kernels.optim.Adam`): on CUDA inside its one pass per weight, and
it writes the 16-bit copy of the renormalised atoms, so the next forward does not cast them again. Variants
that compute or constrain their dictionary otherwise (archetypal, JumpReLU's threshold clamp, an SAE with
`unit_norm_decoder=False`) keep their own `remove_parallel_grads` and `normalize_decoder`, which the module
calls around the step; the optimizer still clips them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mmsae.kernels.optim import Adam
from mmsae.sae import SAE


@dataclass
class WarmupDecay:
    """LR factor: linear warm-up, flat, linear decay to 0 over the last `decay_steps`.

    A dataclass rather than a lambda so LambdaLR's state_dict (plain ints) is checkpointed weights-only safe.
    """

    total_steps: int
    warmup_steps: int
    decay_steps: int

    def __call__(self, step: int) -> float:
        warm = (step + 1) / max(1, self.warmup_steps)
        decay = (self.total_steps - step) / max(1, self.decay_steps)
        return max(0.0, min(1.0, warm, decay))


def unit_rows_of(sae: SAE) -> nn.Parameter | None:
    """The SAE's `W_dec` if the optimizer may keep its rows unit norm in the SAE's stead: a plain parameter
    of unit-norm atoms whose projection and renormalisation are the base class's (None otherwise)."""
    W_dec = sae._parameters.get("W_dec")  # not the attribute: variants may compute it (archetypal)
    cls = type(sae)
    plain = (
        cls.remove_parallel_grads is SAE.remove_parallel_grads
        and cls.normalize_decoder is SAE.normalize_decoder
    )
    return W_dec if sae.cfg.unit_norm_decoder and plain and isinstance(W_dec, nn.Parameter) else None


def make_optimizer(saes: Sequence[SAE], lrs: Sequence[float], grad_clip: float | None) -> Adam:
    """Adam(0.9, 0.999) with one param group per SAE: clipped per SAE (a sweep member never clips another),
    atoms kept unit norm where `unit_rows_of` allows. On CUDA, torch's fused Adam where the Triton step does
    not apply (bf16-mixed uses no grad scaler, so nothing stops it); CPU keeps torch's default."""
    groups: list[dict[str, Any]] = []
    for sae, lr in zip(saes, lrs):
        rows = unit_rows_of(sae)
        groups.append(
            {
                "params": list(sae.parameters()),
                "lr": lr,
                "max_grad_norm": grad_clip or None,
                "unit_rows": [] if rows is None else [rows],
            }
        )
    fused = all(p.is_cuda for g in groups for p in g["params"])
    optimizer = Adam(groups, betas=(0.9, 0.999), fused=fused or None)
    for sae in saes:  # the forwards read the copies this optimizer writes
        sae.weight_copies = optimizer.weight_copies
    return optimizer


def keeps_unit_rows(optimizer: torch.optim.Optimizer, sae: SAE) -> bool:
    """Whether `optimizer` projects and renormalises this SAE's atoms (so the module must not)."""
    W_dec = sae._parameters.get("W_dec")
    return W_dec is not None and any(
        w is W_dec for g in optimizer.param_groups for w in g.get("unit_rows", ())
    )


@torch.no_grad()
def restart_adam(optimizer: torch.optim.Optimizer, saes: Sequence[SAE], step: int) -> None:
    """Before `step`, zero Adam's state (moments, step counts) of each SAE whose `adam_restart_step` it is.
    In place: a CUDA graph replays the step on these very tensors; and a checkpoint saved before `step`
    restarts on resume as the uninterrupted run did."""
    for sae in saes:
        if sae.adam_restart_step() == step:
            for p in sae.parameters():
                for value in optimizer.state.get(p, {}).values():
                    if isinstance(value, Tensor):
                        value.zero_()
