"""Synthetic activations with known ground-truth features, for measuring dictionary recovery.

Each token is a sparse, non-negative (or, for bidirectional features, signed) combination of
`n_directions` unit directions in `d` dimensions (superposition when n_directions > d), plus
isotropic noise. Feature frequencies follow a power law. Optional hierarchical families: a child
fires only together with its parent (exactly one child of a firing parent), the setting where
feature absorption shows up. The stream is a pure function of (seed, token position).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

CHUNK_TOKENS = 4096
"""Tokens are generated in chunks with their own RNG stream, so `sample(n, offset)` is random-access."""


class SyntheticActivations:
    """Sparse features in superposition.

    Args:
        d: activation dimension.
        n_directions: number of ground-truth directions (rows of `.features`).
        mean_active: expected number of active features per token (before clipping probabilities at 1).
        zipf_exponent: feature of frequency rank r fires with probability ∝ r^(−zipf_exponent).
        hierarchical: fraction of features that are children in parent/child families.
        children_per_parent: children per family; a firing parent activates exactly one of them.
        signed: fraction of features that are bidirectional (coefficient sign is ±1 at random).
        noise: std of isotropic Gaussian noise added to every coordinate.
        magnitude: active coefficients are uniform in [1 − magnitude/2, 1 + magnitude/2] (in absolute value).
        seed: fixes features, frequencies and the whole token stream.
        batch_size / n_tokens: what `iter(ds)` yields; n_tokens=None streams forever.
    """

    def __init__(
        self,
        d: int = 256,
        n_directions: int = 4096,
        mean_active: float = 8.0,
        zipf_exponent: float = 0.5,
        hierarchical: float = 0.0,
        children_per_parent: int = 4,
        signed: float = 0.0,
        noise: float = 0.0,
        magnitude: float = 1.0,
        seed: int = 0,
        batch_size: int = 4096,
        n_tokens: int | None = None,
        **renamed: int,
    ):
        if renamed:
            n_directions = _renamed_directions(renamed)
        if d <= 0 or n_directions <= 0:
            raise ValueError(f"d and n_directions must be positive, got d={d}, n_directions={n_directions}.")
        if not 0 < mean_active <= n_directions:
            raise ValueError(f"mean_active={mean_active} must be in (0, n_directions={n_directions}].")
        if not (0.0 <= hierarchical < 1.0 and 0.0 <= signed <= 1.0):
            raise ValueError(f"hierarchical={hierarchical} must be in [0, 1) and signed={signed} in [0, 1].")
        if children_per_parent < 1 or not 0.0 <= magnitude < 2.0 or noise < 0:
            raise ValueError("children_per_parent must be ≥ 1, magnitude in [0, 2) and noise ≥ 0.")
        self.d, self.n_directions, self.seed = d, n_directions, seed
        self.noise, self.magnitude = noise, magnitude
        self.batch_size, self.n_tokens = batch_size, n_tokens
        self.children_per_parent = children_per_parent

        rng = np.random.default_rng([seed, 0])
        features_FD = rng.standard_normal((n_directions, d))
        features_FD /= np.linalg.norm(features_FD, axis=1, keepdims=True)
        self.features = torch.from_numpy(features_FD).float()

        # Layout: [roots (independent features, parents first) | children, grouped by parent].
        n_children = round(hierarchical * n_directions) // children_per_parent * children_per_parent
        self.n_parents = n_children // children_per_parent
        self.n_roots = n_directions - n_children
        if self.n_parents > self.n_roots:
            raise ValueError(
                f"hierarchical={hierarchical} leaves too few root features to parent "
                f"{n_children} children: lower it or raise children_per_parent."
            )
        self.parent = torch.full((n_directions,), -1, dtype=torch.long)
        self.parent[self.n_roots :] = torch.arange(self.n_parents).repeat_interleave(children_per_parent)

        # Power law over roots in a random rank order (so parents are not always the most frequent).
        rank = rng.permutation(self.n_roots) + 1
        weight = rank.astype(np.float64) ** -zipf_exponent
        # A firing parent brings one child along: parents count twice towards mean_active.
        load = weight.sum() + weight[: self.n_parents].sum()
        self.root_prob = torch.from_numpy(np.clip(weight * mean_active / load, 0.0, 1.0))
        self.is_signed = torch.from_numpy(rng.random(n_directions) < signed)
        self._last_chunk: tuple[int, Tensor] | None = None  # batches smaller than a chunk reuse it

    @property
    def frequencies(self) -> Tensor:
        """Marginal firing probability of every feature, [F] float64."""
        child = self.root_prob[self.parent[self.n_roots :]] / self.children_per_parent
        return torch.cat([self.root_prob, child])

    def _chunk(self, index: int) -> Tensor:
        if self._last_chunk is not None and self._last_chunk[0] == index:
            return self._last_chunk[1]
        rng = np.random.default_rng([self.seed, 1, index])
        C = CHUNK_TOKENS
        # Per feature: Binomial count, then that many distinct positions. Exactly Bernoulli(p) per
        # (token, feature) and O(active) work, where a dense [C, F] Bernoulli draw would dominate training.
        counts_R = rng.binomial(C, self.root_prob.numpy())
        feats = np.repeat(np.arange(self.n_roots), counts_R)
        tokens = distinct_positions(rng, feats, C)
        if self.n_parents:
            is_parent = feats < self.n_parents
            child = (
                self.n_roots
                + feats[is_parent] * self.children_per_parent
                + rng.integers(0, self.children_per_parent, size=int(is_parent.sum()))
            )
            tokens, feats = np.concatenate([tokens, tokens[is_parent]]), np.concatenate([feats, child])
        half = self.magnitude / 2
        coef = rng.uniform(1 - half, 1 + half, size=feats.size)
        sign = np.where(self.is_signed.numpy()[feats] & (rng.random(feats.size) < 0.5), -1.0, 1.0)
        coef_CF = torch.sparse_coo_tensor(
            torch.from_numpy(np.stack([tokens, feats])),
            torch.from_numpy(coef * sign).float(),
            (C, self.n_directions),
            check_invariants=False,
        )
        acts_CD = torch.sparse.mm(coef_CF.coalesce(), self.features)
        if self.noise > 0:
            acts_CD += self.noise * torch.from_numpy(rng.standard_normal((C, self.d), dtype=np.float32))
        self._last_chunk = (index, acts_CD)
        return acts_CD

    def sample(self, n: int, offset: int = 0) -> Tensor:
        """Tokens [offset, offset + n) of the stream, [n, d] float32; identical for identical seeds."""
        if n < 0 or offset < 0:
            raise ValueError(f"n={n} and offset={offset} must be non-negative.")
        first, last = offset // CHUNK_TOKENS, (offset + n - 1) // CHUNK_TOKENS
        if n == 0:
            return torch.zeros(0, self.d)
        acts_ND = torch.cat([self._chunk(i) for i in range(first, last + 1)])
        start = offset - first * CHUNK_TOKENS
        return acts_ND[start : start + n]

    def batches(self, batch_size: int, n_tokens: int, offset: int = 0) -> Iterator[Tensor]:
        """Consecutive [batch_size, d] batches covering n_tokens tokens (the last may be shorter)."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        for start in range(offset, offset + n_tokens, batch_size):
            yield self.sample(min(batch_size, offset + n_tokens - start), start)

    def __iter__(self) -> Iterator[Tensor]:
        if self.n_tokens is not None:
            yield from self.batches(self.batch_size, self.n_tokens)
            return
        start = 0
        while True:
            yield self.sample(self.batch_size, start)
            start += self.batch_size

    def __repr__(self) -> str:
        return (
            f"SyntheticActivations(d={self.d}, n_directions={self.n_directions}, seed={self.seed}, "
            f"parents={self.n_parents}, signed={int(self.is_signed.sum())})"
        )


def _renamed_directions(renamed: dict[str, int]) -> int:
    """The direction count passed under its old keyword, which now means an SAE's dictionary size."""
    old = "n_features"
    if set(renamed) != {old}:
        raise TypeError(
            f"SyntheticActivations got unexpected keyword argument(s) {sorted(set(renamed) - {old})}."
        )
    warnings.warn(
        "SyntheticActivations: 'n_features' is deprecated, use 'n_directions' (the number of ground-truth "
        "directions; 'n_features' is an SAE's dictionary size); the old name goes in a later release.",
        DeprecationWarning,
        stacklevel=3,
    )
    return renamed[old]


def distinct_positions(rng: np.random.Generator, groups: np.ndarray, n_positions: int) -> np.ndarray:
    """A uniform position in [0, n_positions) per entry, distinct within each group (vectorised).

    Draw with replacement, then redraw the repeats until none is left. Every position is equally likely
    at every draw, so each group's set is a uniform random subset of its size, as with
    `rng.choice(n, c, replace=False)` per group, without a Python loop over the groups.
    """
    positions = rng.integers(0, n_positions, size=groups.size)
    while True:
        _, first = np.unique(groups * n_positions + positions, return_index=True)
        if first.size == positions.size:
            return positions
        repeat = np.ones(positions.size, dtype=bool)
        repeat[first] = False
        positions[repeat] = rng.integers(0, n_positions, size=int(repeat.sum()))


__all__ = ["SyntheticActivations"]
