"""Order-preserving integer keys of floats, and the k-th largest key of a block (Triton device functions).

A 16-bit float maps to a 16-bit integer with the same order (an fp32 to a 32-bit one), so the k-th largest
of a block held in registers is found exactly by bisection on the key bits: "count the keys ≥ candidate",
one compare and one block sum per bit. The select kernels of `triton_select` and `triton_select_bound` share
these.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _ordered_key(x):
    """16-bit float -> int32 in [0, 2¹⁶) whose integer order is the float order."""
    bits = x.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return tl.where(bits >= 0x8000, bits ^ 0xFFFF, bits | 0x8000)


@triton.jit
def _ordered_key_any(x, WIDE: tl.constexpr):
    """`_ordered_key`, or for fp32 (WIDE) the int64 key in [0, 2³²) whose integer order is the float order."""
    if WIDE:
        bits = x.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
        return tl.where(bits >= 0x80000000, bits ^ 0xFFFFFFFF, bits | 0x80000000)
    else:
        return _ordered_key(x)


@triton.jit
def _kth_largest_key(key, want):
    """Largest t with #(key ≥ t) ≥ want, built bit by bit from the top: the want-th largest key."""
    threshold = tl.zeros([], dtype=tl.int32)
    for bit in tl.static_range(15, -1, -1):
        candidate = threshold | (1 << bit)
        count = tl.sum((key >= candidate).to(tl.int32), 0)
        threshold = tl.where(count >= want, candidate, threshold)
    return threshold
