"""16-bit copies of fp32 weights, written by the optimizer in the same pass that updates the weights.

Under bf16 autocast every step casts W_enc and W_dec to 16 bits before the GEMM and the gathers: a read of
4 bytes and a write of 2 per weight, 0.05 ms of a 1.8 ms step at benchmark size 1 (docs/kernels-notes.md).
The optimizer (`mmsae.kernels.optim.Adam`) already reads and writes every weight; writing the 16-bit value
there too costs 2 bytes per weight and no extra pass.

The copies are one `WeightCopies` object, owned by the optimizer (`Adam.weight_copies`) and handed to the
SAE (`sae.weight_copies`, set by the trainer), whose forward passes it to the kernels. A forward calls
`copies.cast(w, dtype)`, which returns the optimizer's copy when it is current and otherwise casts (and
asks for a copy from now on); the optimizer asks `wanted(w)` and refreshes `buffer(w, dtype)` in its update,
then `mark_current(w)`. A copy is current while the weight's version counter and storage are those it was
made from: any in-place torch op on the weight (atom renormalisation, `load_state_dict`, `.data` swaps)
makes the forward cast again, so a stale copy is never read. Without a `WeightCopies` (`None`: inference,
analysis, an SAE outside training) the kernels cast as autocast would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary


@dataclass
class _Copy:
    tensor: Tensor
    made_from: tuple[int, int] | None = None
    """(version, data_ptr) of the weight when the copy was last written; None until then."""


def _stamp(w: Tensor) -> tuple[int, int]:
    return w._version, w.data_ptr()


class WeightCopies:
    """The 16-bit copies of one optimizer's weights, keyed by the weight (weakly: they go with it)."""

    def __init__(self) -> None:
        self._wanted: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight -> the dtype its forward casts to
        self._copies: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight -> _Copy

    def current(self, w: Tensor, dtype: torch.dtype) -> Tensor | None:
        """The optimizer's copy of w in `dtype` if it holds w's present values, else None."""
        copy = self._copies.get(w)
        if copy is not None and copy.tensor.dtype == dtype and copy.made_from == _stamp(w):
            return copy.tensor
        return None

    def cast(self, w: Tensor, dtype: torch.dtype) -> Tensor:
        """`w.to(dtype)`, or the optimizer's copy of w when it is current (same values, no pass over w).
        The copy carries no gradient to w: call this inside an autograd Function's forward (as `triton_ops`
        does)."""
        if w.dtype == dtype:
            return w
        copy = self.current(w, dtype)
        if copy is not None:
            return copy
        if w.requires_grad and w.is_leaf:  # a trained weight: the optimizer may keep a copy from now on
            self._wanted[w] = dtype
        return w.to(dtype)

    def wanted(self, w: Tensor) -> torch.dtype | None:
        """The dtype a forward has cast w to, if any: the optimizer then writes a copy in it."""
        return self._wanted.get(w)

    def buffer(self, w: Tensor, dtype: torch.dtype) -> Tensor:
        """The copy's storage, allocated on first use and reused after (CUDA graphs replay into it)."""
        copy = self._copies.get(w)
        if (
            copy is None
            or copy.tensor.dtype != dtype
            or copy.tensor.shape != w.shape
            or copy.tensor.device != w.device
        ):
            copy = self._copies[w] = _Copy(
                torch.empty_like(w, dtype=dtype, memory_format=torch.contiguous_format)
            )
        copy.made_from = None  # being rewritten: not current until `mark_current`
        return copy.tensor

    def has_buffer(self, w: Tensor, dtype: torch.dtype) -> bool:
        copy = self._copies.get(w)
        return copy is not None and copy.tensor.dtype == dtype and copy.tensor.shape == w.shape

    def mark_current(self, w: Tensor) -> None:
        """The copy now holds w's values (call after the kernel that wrote both)."""
        self._copies[w].made_from = _stamp(w)

    def forget(self, w: Tensor) -> None:
        """Drop w's copy and request (tests; or to free the memory)."""
        self._wanted.pop(w, None)
        self._copies.pop(w, None)


def cast(copies: WeightCopies | None, w: Tensor, dtype: torch.dtype) -> Tensor:
    """`copies.cast(w, dtype)`, or a plain cast without copies."""
    return w.to(dtype) if copies is None else copies.cast(w, dtype)
