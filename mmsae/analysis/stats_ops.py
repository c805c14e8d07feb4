"""Fixed-size tensor steps of `FeatureStats.update`: (token, feature) pairs, sort keys, the top-k merge.

Every step has an output size known before the device runs it (no boolean indexing, `unique`,
`nonzero` on sparse codes or `bincount`), so a pass over many chunks never waits for the device.
Pairs whose feature is silent, or that cannot be an example's best, are sent to an extra group `n`
(one past the last feature) instead of being removed: buffers have one spare row or column that
collects them and is never read.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
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

    One sort of a 32-bit key where `val16` (the values as bf16) is given and the groups fit in 16 bits
    (a radix sort's cost grows with the key's bits); else an int64 key (group, then the float32 value's
    bits mapped to a descending integer) where the groups fit in 31 bits; else two stable sorts. A NaN
    ranks above every number, whatever its sign bit, as in torch's sorts."""
    if val16 is not None and n_groups <= 2**16:
        bits = val16.view(torch.int16)
        ordered = torch.where(bits < 0, bits ^ 0x7FFF, bits)  # increases with the bf16 value
        ordered.masked_fill_(val16.isnan(), 2**15 - 1)
        # group·2¹⁶ + (2¹⁵ − 1 − ordered) ∈ [0, 2³²), shifted by −2³¹ into int32.
        return (group * 2**16 - ordered).add_(2**15 - 1 - 2**31).int().argsort(stable=True)
    if n_groups < 2**31:
        bits = val.float().view(torch.int32).long()
        ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # increases with the float value
        ordered.masked_fill_(val.isnan(), 2**31 - 1)
        return (group * 2**32 + (2**31 - 1 - ordered)).argsort(stable=True)
    by_val = val.argsort(descending=True, stable=True)
    return by_val[group[by_val].argsort(stable=True)]


def example_rank(example_id: Tensor) -> Tensor:
    """[N] → each token's example as a rank 0..N−1 (equal ids, equal ranks): `unique`'s inverse without
    its data-dependent output size."""
    ids_s, order = example_id.sort(stable=True)
    new = F.pad(ids_s[1:] != ids_s[:-1], (1, 0), value=True).long()
    return torch.empty_like(new).scatter_(0, order, new.cumsum(0) - 1)


def best_per_example(pairs: Pairs, grp: Tensor, example_id: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Per (example, feature), the pair with the largest value: returns (perm, grp_p), pairs sorted by
    (feature, example, value descending) and their group, `n` for all but the first of each run (the
    example's maximum and its token) and for silent pairs."""
    N = example_id.shape[0]
    pair_key = pairs.lat * N + pairs.per_pair(example_rank(example_id))
    val = pairs.raw.masked_fill(grp == n, -math.inf)  # a silent pair is never an example's best
    perm = group_then_descending(pair_key, val, n * N)
    key_s = pair_key[perm]
    first = F.pad(key_s[1:] != key_s[:-1], (1, 0), value=True)
    return perm, grp[perm].masked_fill_(~first, n)


def chunk_top(
    grp_s: Tensor, v_s: Tensor, rows_s: Tensor, meta_N3: Tensor, k: int, n: int
) -> tuple[Tensor, Tensor]:
    """The chunk's best k per feature, from pairs sorted by (group, value descending): values [k, n]
    (−inf where fewer) and (example_id, token_index, timestep) [k, n, 3] (−1 where fewer)."""
    N = meta_N3.shape[0]
    start = torch.searchsorted(grp_s, grp_s)  # first position of each pair's group
    rank = torch.arange(grp_s.shape[0], device=grp_s.device).sub_(start)
    slot = rank.clamp_(max=k).mul_(n + 1).add_(grp_s)  # row k, column n: dropped
    size = ((k + 1) * (n + 1),)
    best_v = torch.full(size, -math.inf, device=v_s.device).scatter_(0, slot, v_s)
    best_r = torch.full(size, N, dtype=torch.long, device=v_s.device).scatter_(0, slot, rows_s)
    meta_ext = F.pad(meta_N3, (0, 0, 0, 1), value=-1)  # row N: no example
    return best_v.view(k + 1, n + 1)[:k, :n], meta_ext[best_r.view(k + 1, n + 1)[:k, :n]]


def cross_duplicates(old_v: Tensor, old_ids: Tensor, new_v: Tensor, new_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Bool masks [k, n] of the entries to drop where an example is both in the running top (old) and
    the chunk's best (new) of a feature, split across chunks: the smaller value; the new one on a tie
    (the first token seen keeps it). Each side holds an example at most once per feature."""
    k, n = old_v.shape
    if k * k * n > 2**26:  # [k, k, n] comparisons would take too much memory: sort instead
        dup = duplicates(torch.cat([old_v, new_v]), torch.cat([old_ids, new_ids]))
        return dup[:k], dup[k:]
    same = (new_ids[:, None] == old_ids[None]) & (new_ids >= 0)[:, None]  # [new, old, n]
    new_wins = new_v[:, None] > old_v[None]
    return (same & new_wins).any(0), (same & ~new_wins).any(1)


def duplicates(values_Mn: Tensor, ids_Mn: Tensor) -> Tensor:
    """Bool [M, n]: entries whose example id already appears in the same column with a larger value,
    or an equal one in an earlier row."""
    by_value = values_Mn.argsort(dim=0, descending=True, stable=True)
    ids_v = ids_Mn.gather(0, by_value)
    by_id = ids_v.argsort(dim=0, stable=True)  # stable: equal ids stay in descending-value order
    ids_s = ids_v.gather(0, by_id)
    dup_s = torch.zeros_like(ids_s, dtype=torch.bool)
    dup_s[1:] = (ids_s[1:] == ids_s[:-1]) & (ids_s[1:] >= 0)
    perm = by_value.gather(0, by_id)
    return torch.zeros_like(dup_s).scatter_(0, perm, dup_s)


def merge_top(
    top_v: Tensor, top_meta: Tensor, best_v: Tensor, best_meta: Tensor, split_examples: bool
) -> tuple[Tensor, Tensor]:
    """Running top k ([k, n] values, [k, n, 3] metadata) merged with a chunk's best k. With
    `split_examples`, an example in both keeps only its best entry. Equal values keep the order in
    which they were seen (running top first)."""
    if split_examples:  # a dropped duplicate becomes −∞, an empty entry
        drop_old, drop_new = cross_duplicates(top_v, top_meta[..., 0], best_v, best_meta[..., 0])
        top_v, best_v = top_v.masked_fill(drop_old, -math.inf), best_v.masked_fill(drop_new, -math.inf)
    return kernels.merge_top(top_v, top_meta, best_v, best_meta)
