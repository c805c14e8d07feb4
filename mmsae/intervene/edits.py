"""Feature edits: what an `Intervention` does to an SAE's codes at a hook point.

Every edit names one feature. Code edits (`Set`, `Add`, `Scale`, `Clamp`, `SetMax`, `Zero`)
map that feature's activation column to a new column; `Direction` adds s·W_dec[i] to the
activation without encoding (sdxl-unbox's additive steering). `parse_edit` reads the CLI
spelling ("set:12=5", "dir:3=-4", ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import ClassVar

import torch
from torch import Tensor

from mmsae.legacy_names import LegacyKwargsMeta, renamed_from


@dataclass
class EditContext:
    """What an edit may need besides the column: per-feature max activations, the UNet timestep."""

    max_acts: Tensor | None = None
    timestep: int | None = None


@renamed_from("feature")
@dataclass(frozen=True)
class Edit(metaclass=LegacyKwargsMeta):
    """Base class: an edit of feature `feature`. Subclasses implement `apply`."""

    feature: int
    op: ClassVar[str] = "edit"
    needs_codes: ClassVar[bool] = True
    """False for edits that never read the codes (the intervention can skip the encoder)."""

    def __post_init__(self) -> None:
        # A NaN or infinite strength would silently turn the edited activations (and images) into NaN.
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(
                    f"{type(self).__name__} edit of feature {self.feature}: {f.name}={value} is not a finite "
                    "number; give a real value."
                )

    def apply(self, f_N: Tensor, ctx: EditContext) -> Tensor:
        """New activations [N] of this feature from the current ones [N] (fp32)."""
        raise NotImplementedError

    def check(self, n_features: int) -> None:
        if not 0 <= self.feature < n_features:
            raise IndexError(
                f"{type(self).__name__} edit names feature {self.feature}, but the SAE has {n_features} "
                f"features (valid: 0..{n_features - 1})."
            )


@dataclass(frozen=True)
class Set(Edit):
    """f_i := value on every (masked) token."""

    value: float = 0.0
    op: ClassVar[str] = "set"

    def apply(self, f_N: Tensor, ctx: EditContext) -> Tensor:
        return torch.full_like(f_N, self.value)


@dataclass(frozen=True)
class Add(Edit):
    value: float = 0.0
    op: ClassVar[str] = "add"

    def apply(self, f_N: Tensor, ctx: EditContext) -> Tensor:
        return f_N + self.value


@dataclass(frozen=True)
class Scale(Edit):
    factor: float = 1.0
    op: ClassVar[str] = "scale"

    def apply(self, f_N: Tensor, ctx: EditContext) -> Tensor:
        return f_N * self.factor


@dataclass(frozen=True)
class Clamp(Edit):
    """f_i := clamp(f_i, low, high); either bound may be None."""

    low: float | None = None
    high: float | None = None
    op: ClassVar[str] = "clamp"

    def apply(self, f_N: Tensor, ctx: EditContext) -> Tensor:
        return f_N.clamp(self.low, self.high)


@dataclass(frozen=True)
class SetMax(Edit):
    """f_i := s × (max observed activation of feature i), saev's steering (s from −10 to 10)."""

    multiple: float = 1.0
    op: ClassVar[str] = "max"

    def apply(self, f_N: Tensor, ctx: EditContext) -> Tensor:
        if ctx.max_acts is None:
            raise ValueError(
                f"SetMax on feature {self.feature} needs the maximum activation of each feature: pass "
                "max_acts=mmsae.intervene.max_activations(encoder, sae, batches) to the Splice."
            )
        return torch.full_like(f_N, self.multiple * float(ctx.max_acts[self.feature]))


@dataclass(frozen=True)
class Zero(Edit):
    op: ClassVar[str] = "zero"

    def apply(self, f_N: Tensor, ctx: EditContext) -> Tensor:
        return torch.zeros_like(f_N)


@dataclass(frozen=True)
class Direction(Edit):
    """x := x + strength · W_dec[i] on every (masked) token; needs no encoding."""

    strength: float = 1.0
    op: ClassVar[str] = "dir"
    needs_codes: ClassVar[bool] = False

    def apply(self, f_N: Tensor, ctx: EditContext) -> Tensor:
        raise TypeError("Direction adds a decoder row to the activation; it does not edit codes.")


_PARSERS = {
    "set": lambda i, v: Set(i, v[0]),
    "add": lambda i, v: Add(i, v[0]),
    "scale": lambda i, v: Scale(i, v[0]),
    "max": lambda i, v: SetMax(i, v[0]),
    "dir": lambda i, v: Direction(i, v[0]),
    "zero": lambda i, v: Zero(i),
    "clamp": lambda i, v: Clamp(i, v[0], v[1]),
}
_ARITY = {"set": 1, "add": 1, "scale": 1, "max": 1, "dir": 1, "zero": 0, "clamp": 2}
EDIT_SYNTAX = "set:I=V, add:I=V, scale:I=V, max:I=S, dir:I=S, zero:I, clamp:I=LOW:HIGH (empty bound = none)"


def parse_edit(spec: str) -> Edit:
    """Parse the CLI spelling of an edit, e.g. "set:12=5", "clamp:3=:2", "zero:7"."""
    op, sep, rest = spec.partition(":")
    if not sep or op not in _PARSERS:
        raise ValueError(f"Cannot parse edit {spec!r}; expected one of: {EDIT_SYNTAX}.")
    feature, _, values = rest.partition("=")
    parts = values.split(":") if values else []
    if len(parts) != _ARITY[op]:
        raise ValueError(f"Edit {spec!r}: {op!r} takes {_ARITY[op]} value(s); syntax: {EDIT_SYNTAX}.")
    try:
        nums = [float(p) if p else None for p in parts]
        index = int(feature)
    except ValueError:
        raise ValueError(
            f"Edit {spec!r} has a non-numeric feature or value; syntax: {EDIT_SYNTAX}."
        ) from None
    if op != "clamp" and None in nums:
        raise ValueError(f"Edit {spec!r}: {op!r} needs a value; syntax: {EDIT_SYNTAX}.")
    return _PARSERS[op](index, nums)


__all__ = [
    "EDIT_SYNTAX",
    "Add",
    "Clamp",
    "Direction",
    "Edit",
    "EditContext",
    "Scale",
    "Set",
    "SetMax",
    "Zero",
    "parse_edit",
]
