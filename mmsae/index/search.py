"""Nearest-image search over a concept index's arrays, optionally restricted by which features are on.

Unrestricted queries go to the ANN index; a selective filter (few images allowed) is answered exactly over
the allowed images' embeddings; a loose one over-fetches from the ANN index until k images survive it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mmsae.index.codes import SparseCodeStore


def allowed_images(
    codes: SparseCodeStore, n_images: int, with_features: Sequence[int], without_features: Sequence[int]
) -> np.ndarray | None:
    """Ids of the images where every `with_features` is on and no `without_features`; None = no filter."""
    if not with_features and not without_features:
        return None
    mask = np.ones(n_images, dtype=bool)
    for f in with_features:
        on = np.zeros(n_images, dtype=bool)
        on[codes.images_with(f)] = True
        mask &= on
    for f in without_features:
        mask[codes.images_with(f)] = False
    return np.flatnonzero(mask)


def nearest_images(
    ann: Any,
    embeddings_NE: np.ndarray,
    query_E: np.ndarray,
    k: int,
    allowed: np.ndarray | None,
    exact_below: int,
) -> list[tuple[int, float]]:
    """(image id, similarity) of the k allowed images nearest to `query_E`, nearest first."""
    n_images = len(embeddings_NE)
    q = query_E[None].astype(np.float32)
    if allowed is None:
        scores, ids = ann.search(q, min(k, n_images))
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]
    if len(allowed) <= max(exact_below, n_images // 2):
        # Selective filter: exact search over the few allowed images beats filtering ANN results.
        sims = embeddings_NE[allowed] @ query_E
        top = np.argsort(-sims, kind="stable")[:k]
        return [(int(i), float(s)) for i, s in zip(allowed[top], sims[top])]
    return filtered_ann(ann, q, k, allowed, n_images)


def filtered_ann(
    ann: Any, q: np.ndarray, k: int, allowed: np.ndarray, n_images: int
) -> list[tuple[int, float]]:
    """Most images pass the filter: over-fetch from the ANN index until k of them survive."""
    keep = np.zeros(n_images, dtype=bool)
    keep[allowed] = True
    fetch = 2 * k
    while True:
        scores, ids = ann.search(q, min(fetch, n_images))
        hits = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0 and keep[i]]
        if len(hits) >= k or fetch >= n_images:
            return hits[:k]
        fetch *= 4


__all__ = ["allowed_images", "filtered_ann", "nearest_images"]
