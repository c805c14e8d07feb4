"""`Intervention`: splice SAEs into a model at their hook points, edit features, restore on exit.

At each hook the output x (as tokens [B, T, D]) becomes

    x′ = (x − x̂) + decode(f′)   if keep_error (default)   — saev's steering, error term kept
    x′ = decode(f′)              otherwise                  — the "spliced" model of fidelity metrics

with f = encode(x) and f′ the codes after the edits. The decoder is linear, so both reduce to a
base (x or x̂) plus Σ_i (f′_i − f_i)·W_dec[i] over the edited features only: no dense code tensor is
built, and with the error kept and no code edits the encoder is not run at all. `Direction` edits
add s·W_dec[i]. An SAE with per-token input normalisation (`sae.cfg.input_norm`) codes and decodes
xₙ = normalize(x) and x̂ is x̂ₙ denormalised, so every change above is scaled by the token's scale
(and the error term is that of x). Masks, the timestep window and the CFG half restrict *where* x is
replaced:
x_out = x + gate·(x′ − x). Leaving the block removes every hook, restoring the model exactly.

An SAE trained on block updates (`sae.cfg.site == "update"`, UNet stores extracted with `update=True`)
reads x = out − in instead, and the block writes out′ = in + x′ (as out + (x′ − x), so that an unedited
update leaves the output bit-identical). Everything above (error term, masks, window, CFG half) applies
to the update.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mmsae.encoders.base import Encoder
from mmsae.encoders.capabilities import Sampler, UpdateEditor, require
from mmsae.intervene.edits import Edit, EditContext
from mmsae.legacy_names import legacy_kwargs, module_getattr
from mmsae.sae.base import SAE, SparseCodes, as_dense

CfgHalf = Literal["both", "cond", "uncond"]


@dataclass
class Splice:
    """One SAE at one hook point, its edits, and where they apply."""

    sae: SAE
    edits: Sequence[Edit] = ()
    hook: str | None = None
    """Defaults to the hook recorded in the SAE's cfg.json."""
    keep_error: bool = True
    token_mask: Tensor | None = None
    """[T] or [B, T], bool or weights in [0, 1]: tokens the intervention applies to."""
    spatial_mask: Tensor | None = None
    """[h, w] weights in [0, 1] over the image; resized to the hook's (H, W) token grid."""
    timesteps: tuple[int, int] | None = None
    """Inclusive window [low, high] of scheduler timesteps (UNets); None = every step."""
    cfg_half: CfgHalf = "both"
    """Which classifier-free-guidance half to edit (UNets): 'cond', 'uncond' or 'both'."""
    max_acts: Tensor | None = None
    """[n_features] maximum observed activations, needed by `SetMax` edits."""
    n_applied: int = field(default=0, init=False)
    """How many forward calls this splice edited (skipped timesteps do not count)."""


@legacy_kwargs
def feature_columns(codes: SparseCodes | Tensor, features: Tensor) -> Tensor:
    """Activations [N, E] of the features `features` ([E] int64), whatever form the codes take."""
    if isinstance(codes, SparseCodes):
        hit_NKE = codes.indices.unsqueeze(-1) == features
        return (codes.values.unsqueeze(-1) * hit_NKE).sum(-2)
    return as_dense(codes)[:, features]


def _code_feature_list(edits: Sequence[Edit]) -> list[int]:
    return sorted({e.feature for e in edits if e.needs_codes})


def code_features(edits: Sequence[Edit], device: torch.device | str) -> Tensor:
    """Sorted distinct features [E] that the code edits of `edits` read, on `device`."""
    return torch.tensor(_code_feature_list(edits), dtype=torch.int64, device=device)


def apply_edits(
    sae: SAE,
    x_ND: Tensor,
    edits: Sequence[Edit],
    ctx: EditContext,
    keep_error: bool = True,
    features_E: Tensor | None = None,
) -> Tensor:
    """x′ for tokens [N, D] (see the module docstring); computed in the SAE's dtype.

    `features_E` is `code_features(edits, device)`; hooks that run every forward pass it precomputed,
    because building it from a list is a blocking host→device copy that stalls the model's launches.
    """
    sae.check_input(x_ND)
    x_ND = x_ND.to(sae.W_dec.dtype)
    code_edits = [e for e in edits if e.needs_codes]
    # An SAE with per-token input normalisation codes and decodes xₙ; denormalising is affine per token
    # (x̂ = x̂ₙ·scale + shift), so a change Δₙ of x̂ₙ moves x̂, and thus x′, by scale·Δₙ.
    stats = sae.normalize(x_ND)[1] if sae.cfg.input_norm != "none" else None

    def in_x_space(delta_ND: Tensor) -> Tensor:
        return delta_ND if stats is None else (delta_ND.float() * stats.scale).to(x_ND.dtype)

    out_ND = x_ND
    if code_edits or not keep_error:
        codes = sae.encode(x_ND)
        if not keep_error:
            out_ND = sae.decode(codes) if stats is None else sae.denormalize(sae.decode(codes), stats)
        if code_edits:
            if features_E is None:
                features_E = code_features(code_edits, x_ND.device)
            pos = {feature: j for j, feature in enumerate(_code_feature_list(code_edits))}
            f_NE = feature_columns(codes, features_E).float()  # edits and thresholds in fp32
            new_NE = f_NE.clone()
            for e in code_edits:  # in order: two edits of one feature compose
                new_NE[:, pos[e.feature]] = e.apply(new_NE[:, pos[e.feature]], ctx)
            out_ND = out_ND + in_x_space((new_NE - f_NE).to(out_ND.dtype) @ sae.W_dec[features_E])
    for e in edits:
        if not e.needs_codes:
            out_ND = out_ND + in_x_space(e.strength * sae.W_dec[e.feature])
    return out_ND


def check_compatible(encoder: Encoder, sae: SAE, hook: str) -> None:
    """Refuse an SAE trained on another hook point or another encoder than the one it is spliced into."""
    if sae.cfg.hook is not None and sae.cfg.hook != hook:
        raise ValueError(
            f"This SAE was trained on hook {sae.cfg.hook!r} but is being spliced into {hook!r}: its "
            "features mean nothing there. Use an SAE trained on that hook, or leave Splice.hook unset "
            "to use the SAE's own hook."
        )
    if sae.cfg.encoder is not None and sae.cfg.encoder != encoder.id:
        raise ValueError(
            f"This SAE was trained on encoder {sae.cfg.encoder!r} but the model is {encoder.id!r}. "
            f"Load the encoder it was trained on (get_encoder({sae.cfg.encoder!r})) or an SAE "
            f"trained on {encoder.id!r}."
        )
    encoder.module(hook)  # raises KeyError listing the valid hook points
    if sae.W_dec.device != encoder.device:
        raise ValueError(
            f"The SAE is on {sae.W_dec.device} but the model on {encoder.device}: "
            f"call sae.to({str(encoder.device)!r}) first."
        )


def check_site(encoder: Encoder, sae: SAE, hook: str) -> None:
    """Refuse an SAE trained on block updates where the encoder cannot splice updates."""
    if sae.cfg.site == "update":
        require(
            encoder,
            UpdateEditor,
            what="An SAE trained on block updates (output − input, site='update')",
            hint=f"It can only splice module outputs at {hook!r}: use an SAE trained on that hook's outputs "
            "(extracted without update=True), or a diffusion UNet encoder.",
        )


def site_edit(
    encoder: Encoder, sae: SAE, hook: str, fn: Callable[[Tensor], Tensor]
) -> contextlib.AbstractContextManager:
    """`encoder.edit(hook, fn)`, or for an SAE on updates the encoder's edit of out − in (`edit_update`)."""
    check_site(encoder, sae, hook)
    if isinstance(encoder, UpdateEditor) and sae.cfg.site == "update":
        return encoder.edit_update(hook, fn)
    return encoder.edit(hook, fn)


def schedule_length(encoder: Encoder) -> int | None:
    """Number of training timesteps of a diffusion encoder's scheduler (None for other families)."""
    return encoder.schedule_length() if isinstance(encoder, Sampler) else None


def check_timestep_window(encoder: Encoder, window: tuple[int, int]) -> None:
    low, high = window
    require(
        encoder,
        Sampler,
        what="A timestep window",
        hint="Other encoders have no timesteps: drop `timesteps=`.",
    )
    n = schedule_length(encoder)
    if low > high or low < 0 or (n is not None and low >= n):
        limit = f"0..{n - 1}" if n is not None else "non-negative"
        raise ValueError(f"Timestep window {window} is outside the schedule: use low <= high within {limit}.")


def grid_for(T: int, aspect: float) -> tuple[int, int]:
    """(H, W) with H·W = T whose ratio H/W is closest to `aspect` (never assumes a square grid)."""
    pairs = [(h, T // h) for h in range(1, T + 1) if T % h == 0]
    H, W = min(pairs, key=lambda hw: abs(math.log(hw[0] / hw[1]) - math.log(aspect)))
    if abs(math.log(H / W) - math.log(aspect)) > math.log(1.25):
        raise ValueError(
            f"A spatial mask with aspect ratio {aspect:.2f} does not fit {T} tokens (nearest grid "
            f"{H}×{W}); use a mask shaped like the image, or token_mask for sequence models."
        )
    return H, W


def spatial_gate(mask_HW: Tensor, T: int, n_prefix: int) -> Tensor:
    """A [h, w] mask resized to the grid of the last T − n_prefix tokens; prefix tokens get weight 0."""
    H, W = grid_for(T - n_prefix, mask_HW.shape[0] / mask_HW.shape[1])
    grid = F.interpolate(mask_HW[None, None].float(), size=(H, W), mode="area")[0, 0]
    return torch.cat([grid.new_zeros(n_prefix), grid.flatten()])


def cond_rows(encoder: Encoder, hook: str, B: int, T: int) -> Tensor:
    """Bool [B]: which rows of the current call are the conditional CFG half.

    Uses the encoder's `cond` metadata when it gives one, else the diffusers convention: while a
    pipeline runs classifier-free guidance the UNet batch is [uncond, cond]; without it, all cond.
    """
    cond = encoder.extra_meta(hook, B, T).get("cond")
    if cond is not None:
        return cond[:, 0].bool()
    pipe = require(
        encoder,
        Sampler,
        what="A cfg_half (a half of classifier-free guidance)",
        hint="Use cfg_half='both'.",
    ).pipe
    # A diffusers pipeline property, absent from pipelines that never run guidance.
    if not getattr(pipe, "do_classifier_free_guidance", False):
        return torch.ones(B, dtype=torch.bool)
    return torch.arange(B) >= B // 2


class Intervention(contextlib.AbstractContextManager):
    """Context manager splicing one or more SAEs (`Splice`s) into an encoder's model.

    >>> with Intervention(encoder, Splice(sae, [Set(12, 5.0)])):   # doctest: +SKIP
    ...     emb = encoder.encode_image(pixels)
    """

    def __init__(self, encoder: Encoder, splices: Splice | Sequence[Splice], strict: bool = True):
        self.encoder = encoder
        self.splices = [splices] if isinstance(splices, Splice) else list(splices)
        if not self.splices:
            raise ValueError("Intervention needs at least one Splice(sae, edits).")
        self.hooks: list[str] = []
        for s in self.splices:
            hook = s.hook or s.sae.cfg.hook
            if hook is None:
                raise ValueError(
                    "The SAE's cfg records no hook point: pass Splice(sae, ..., hook='<module path>')."
                )
            if strict:
                check_compatible(encoder, s.sae, hook)
            check_site(encoder, s.sae, hook)
            for e in s.edits:
                e.check(s.sae.cfg.n_features)
            if s.timesteps is not None:
                check_timestep_window(encoder, s.timesteps)
            if s.max_acts is not None and s.max_acts.shape != (s.sae.cfg.n_features,):
                raise ValueError(
                    f"max_acts has shape {tuple(s.max_acts.shape)}; expected ({s.sae.cfg.n_features},)."
                )
            self.hooks.append(hook)
        self._features = [code_features(s.edits, s.sae.W_dec.device) for s in self.splices]
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> Intervention:
        if self._stack is not None:
            raise RuntimeError("This Intervention is already active; it cannot be entered twice.")
        stack = contextlib.ExitStack()
        try:
            for hook, s, features_E in zip(self.hooks, self.splices, self._features):
                # The same hook twice: applied in list order.
                fn = lambda acts, h=hook, s=s, lat=features_E: self._edit(h, s, acts, lat)
                stack.enter_context(site_edit(self.encoder, s.sae, hook, fn))
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc: Any) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    def _edit(self, hook: str, s: Splice, acts_BTD: Tensor, features_E: Tensor) -> Tensor:
        """x′ for one call of `hook`: x is the block output, or its update for an SAE on updates."""
        timestep = self.encoder.current_timestep if isinstance(self.encoder, Sampler) else None
        if s.timesteps is not None:
            if timestep is None:
                raise RuntimeError(
                    f"Splice at {hook!r} has a timestep window but the encoder reports no current "
                    "timestep: run it through the encoder's sampler."
                )
            if not s.timesteps[0] <= int(timestep) <= s.timesteps[1]:
                return acts_BTD
        B, T, D = acts_BTD.shape
        gate_BT = self._gate(hook, s, B, T, acts_BTD.device)
        ctx = EditContext(max_acts=s.max_acts, timestep=None if timestep is None else int(timestep))
        new_ND = apply_edits(s.sae, acts_BTD.reshape(B * T, D), s.edits, ctx, s.keep_error, features_E)
        new_BTD = new_ND.view(B, T, D).to(acts_BTD.dtype)
        s.n_applied += 1
        if gate_BT is None:
            return new_BTD
        return acts_BTD + gate_BT[..., None] * (new_BTD - acts_BTD)

    def _gate(self, hook: str, s: Splice, B: int, T: int, device: torch.device) -> Tensor | None:
        """Weights [B, T] of where x is replaced, or None for everywhere."""
        gate_BT: Tensor | None = None
        if s.token_mask is not None:
            m = s.token_mask.to(device=device, dtype=torch.float32)
            if m.shape not in ((T,), (B, T)):
                raise ValueError(
                    f"token_mask has shape {tuple(m.shape)} but hook {hook!r} has B={B}, T={T} tokens: "
                    f"pass [{T}] or [{B}, {T}]."
                )
            gate_BT = m.expand(B, T)
        if s.spatial_mask is not None:
            n_prefix = self.encoder.prefix_tokens(hook)
            g = spatial_gate(s.spatial_mask.to(device), T, n_prefix).expand(B, T)
            gate_BT = g if gate_BT is None else gate_BT * g
        if s.cfg_half != "both":
            rows_B = cond_rows(self.encoder, hook, B, T).to(device)
            rows_B = rows_B if s.cfg_half == "cond" else ~rows_B
            g = rows_B.float()[:, None].expand(B, T)
            gate_BT = g if gate_BT is None else gate_BT * g
        return gate_BT


__all__ = [
    "CfgHalf",
    "Intervention",
    "Splice",
    "apply_edits",
    "check_compatible",
    "check_site",
    "code_features",
    "cond_rows",
    "feature_columns",
    "grid_for",
    "site_edit",
    "spatial_gate",
]

__getattr__ = module_getattr(__name__)  # old public names (mmsae.legacy_names)
