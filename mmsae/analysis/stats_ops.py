"""Fixed-size tensor steps of `FeatureStats.update`: (token, feature) pairs and their sort by feature.

Every step has an output size known before the device runs it (no boolean indexing, `unique`,
`nonzero` on sparse codes or `bincount`), so a pass over many chunks never waits for the device.
Pairs whose feature is silent, or that cannot be an example's best, are sent to an extra group `n`
(one past the last feature) instead of being removed: buffers have one spare row or column that
collects them and is never read.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from mmsae import kernels
from mmsae.sae import Codes, SparseCodes


class Pairs(NamedTuple):
    """Flat (token, feature, value) entries of one chunk's codes."""

    lat: Tensor
    """[M] int64 feature of each pair."""
    raw: Tensor
    """[M] float32 value (0 where the feature is silent)."""
    raw16: Tensor | None
    """The same values as bfloat16 (exactly) where the codes are bf16: they sort with 32-bit keys."""
    rows: Tensor | None
    """[M] token row of each pair; None for sparse codes, whose pair i belongs to row i // per_row."""
    per_row: int

    def row_of(self, pair: Tensor) -> Tensor:
        """Token rows of the pairs at positions `pair`."""
        return pair.div(self.per_row, rounding_mode="floor") if self.rows is None else self.rows[pair]

    def per_pair(self, t_N: Tensor) -> Tensor:
        """[N] per-token values spread to the [M] pairs."""
        if self.rows is None:
            return t_N[:, None].expand(-1, self.per_row).reshape(-1)
        return t_N[self.rows]


def pairs_of(codes: Codes) -> Pairs:
    """All N·k pairs of sparse codes, without a device wait; the nonzero entries of dense [N, n] codes
    (one wait, which spares N·n-sized buffers)."""
    if isinstance(codes, SparseCodes):
        k = codes.values.shape[1]
        v = codes.values.reshape(-1)
        return Pairs(codes.indices.reshape(-1), v.float(), v if v.dtype == torch.bfloat16 else None, None, k)
    rows, lat = codes.nonzero(as_tuple=True)
    v = codes[rows, lat]
    return Pairs(lat, v.float(), v if v.dtype == torch.bfloat16 else None, rows, 1)


def group_then_descending(group: Tensor, val: Tensor, n_groups: int, val16: Tensor | None = None) -> Tensor:
    """The permutation sorting pairs by `group` (int, < n_groups), then by `val`, largest first; stable.

    One sort of a 32-bit key (`kernels.pair_keys`) where `val16` (the values as bf16) is given and the groups
    fit in 16 bits (a radix sort's cost grows with the key's bits); else an int64 key (group, then the
    float32 value's bits mapped to a descending integer) where the groups fit in 31 bits; else two stable
    sorts. A NaN ranks above every number, whatever its sign bit (as torch's CPU sorts place it; the
    two-sort fallback follows the device's sort, and CUDA's places NaNs elsewhere)."""
    if val16 is not None and n_groups <= 2**16:
        return kernels.pair_keys(group, val16).argsort(stable=True)
    if n_groups < 2**31:
        bits = val.float().view(torch.int32).long()
        ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # increases with the float value
        ordered.masked_fill_(val.isnan(), 2**31 - 1)
        return (group * 2**32 + (2**31 - 1 - ordered)).argsort(stable=True)
    by_val = val.argsort(descending=True, stable=True)
    return by_val[group[by_val].argsort(stable=True)]


def sorted_pairs(pairs: Pairs, grp: Tensor, n_groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """(group, float32 value, token row) of the pairs sorted by `grp`, then value descending (stable): the
    top-k merge's input. Sparse bf16 codes take one pass for the keys and one for the gathers."""
    order = group_then_descending(grp, pairs.raw, n_groups, pairs.raw16)
    if pairs.rows is None and pairs.raw16 is not None:
        return kernels.gather_pairs(order, grp, pairs.raw16, pairs.per_row)
    return grp[order], pairs.raw[order], pairs.row_of(order)
