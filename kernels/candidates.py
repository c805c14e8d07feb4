"""Opt-in approximate encode for encode-only passes: candidate groups from an fp8 GEMM, re-scored exactly.

At (768, 32768, k = 32) a 16k-token chunk's exact encode is ~1.6 ms on an H200, nearly all of it the bf16
GEMM: an encode-only pass cannot reach 10 M tok/s with it. Inside `fp8_encode()`, `kernels.topk_encode` calls
that need no gradient and that `triton_group.group_topk_applies` accepts run the GEMM on e4m3 operands (each
token and each feature scaled to e4m3's range, scales applied in fp32 in the epilogue) and keep only its group
maxima; the `groups_per_k · k` groups of largest maxima per row are re-scored exactly in 16 bits and the top k
taken from them. A code's values are the exact encode's; what may differ is which features are found. On
DINOv2-S tokens, the default 1.5k groups missed 0.001 % (n = 4096) and 0.098 % (n = 16384) of the exact
encode's (token, feature) pairs, 2k groups 0 and 0.006 %: all less than the bf16 encode's own 0.31 and 0.51 %
against fp32 (`benchmarks/bench_fp8_candidates.py`; docs/benchmarks.md, "Feature statistics"). 1.5k rather
than 2k: the pass over (768, 32768, k = 32) runs 4 % faster, at 10 M tokens/s on an H200.

The weights are quantised once per context and weight tensor: do not change an SAE's weights inside it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field

from torch import Tensor

DEFAULT_GROUPS_PER_K = 1.5
ENCODES = ("exact", "fp8")
"""The encodes an encode-only pass offers (`StatsConfig.encode`, `IndexConfig.encode`)."""


@dataclass
class Fp8Encode:
    groups_per_k: float
    _weights: dict[tuple[object, ...], tuple[Tensor, Tensor]] = field(default_factory=dict)

    def kept(self, k: int, n_groups: int) -> int:
        """Groups re-scored per row: ⌈groups_per_k · k⌉, at most all of them."""
        return min(n_groups, math.ceil(self.groups_per_k * k))

    def weights(self, W_enc: Tensor, W_lp: Tensor) -> tuple[Tensor, Tensor]:
        """(W_lp, the GEMM's 16-bit cast of the parameter W_enc, as e4m3 rows; [n] float32 scales), made on
        first use per parameter: a cast may be a new tensor at each call, the parameter is not."""
        key = (W_enc.device, W_enc.data_ptr(), tuple(W_enc.shape), W_enc.dtype, W_lp.dtype)
        if key not in self._weights:
            from mmsae.kernels.triton_fp8 import e4m3_rows

            self._weights[key] = e4m3_rows(W_lp.contiguous())
        return self._weights[key]


_ACTIVE: ContextVar[Fp8Encode | None] = ContextVar("mmsae_fp8_encode", default=None)


@contextmanager
def fp8_encode(groups_per_k: float = DEFAULT_GROUPS_PER_K) -> Iterator[Fp8Encode]:
    """Encode-only TopK encodes inside run from fp8 candidates where the Triton path applies (Hopper);
    elsewhere, and wherever a gradient is needed, the exact encode runs as before."""
    if not (isinstance(groups_per_k, (int, float)) and groups_per_k >= 1):
        raise ValueError(
            f"fp8_encode(groups_per_k={groups_per_k!r}): keep at least k groups per row (>= 1; 1.5 is the "
            "measured default)."
        )
    state = Fp8Encode(float(groups_per_k))
    token = _ACTIVE.set(state)
    try:
        yield state
    finally:
        _ACTIVE.reset(token)


def check_encode(mode: str, field: str) -> None:
    """A config's encode setting, refused by `field` name unless one of ENCODES."""
    if mode not in ENCODES:
        raise ValueError(f"{field} must be one of {ENCODES}, got {mode!r}.")


def encoding(mode: str) -> AbstractContextManager:
    """The context an encode-only pass runs in: `fp8_encode()` for 'fp8', none for 'exact'. Enter it once per
    pass, so that the weights are quantised once."""
    check_encode(mode, "encode")
    return fp8_encode() if mode == "fp8" else nullcontext()


def active() -> Fp8Encode | None:
    """The innermost `fp8_encode` context's state, or None outside any."""
    return _ACTIVE.get()
