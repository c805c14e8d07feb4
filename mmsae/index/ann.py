"""The dense half of the concept index: a FAISS inner-product index over unit image embeddings.

Small collections get an exact `IndexFlatIP`; above `exact_below` vectors an IVF index (or HNSW)
trades a little recall for latency. Row i of the FAISS index is image i of the collection, so no
ID map is needed: images are only ever appended. Measured trade-off (1M clustered 512-d vectors,
2 CPU cores): see benchmarks/bench_index.py and docs/benchmarks.md for build time, latency and
recall@10 of exact search and of IVF (nlist = √N) at several nprobe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

AnnKind = Literal["auto", "flat", "ivf", "hnsw"]
TRAIN_POINTS_PER_LIST = 64
"""k-means sample per IVF list (FAISS needs ≥ 39): keeps the 1M-vector build under a minute on 2 cores."""


@dataclass
class AnnConfig:
    kind: AnnKind = "auto"
    """'auto': exact below `exact_below` vectors, IVF above; or force 'flat', 'ivf', 'hnsw'."""
    exact_below: int = 10_000
    """Exact search reads every vector: ~4 ms per 10k 512-d vectors on one core, so above this IVF wins."""
    nlist: int | None = None
    """IVF inverted lists; None = √N (cheap to train on 2 cores), at most N/39 (FAISS minimum)."""
    nprobe: int = 16
    """IVF lists visited per query: the recall/latency knob."""
    hnsw_m: int = 32
    ef_construction: int = 40
    ef_search: int = 64
    seed: int = 0


def _faiss():
    try:
        import faiss
    except ImportError as e:
        raise ImportError("The concept index needs FAISS: pip install 'mmsae[index]' (faiss-cpu).") from e
    return faiss


def resolve_kind(cfg: AnnConfig, n: int) -> str:
    if cfg.kind == "auto":
        return "flat" if n < cfg.exact_below else "ivf"
    if cfg.kind not in ("flat", "ivf", "hnsw"):
        raise ValueError(f"Unknown ANN kind {cfg.kind!r}; use 'auto', 'flat', 'ivf' or 'hnsw'.")
    return cfg.kind


def build_ann(vectors_NE: np.ndarray, cfg: AnnConfig):
    """A FAISS index over `vectors_NE` (unit-norm float32), chosen by `cfg` and the collection size."""
    faiss = _faiss()
    n, dim = vectors_NE.shape
    kind = resolve_kind(cfg, n)
    metric = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, metric)
        index.hnsw.efConstruction = cfg.ef_construction
    else:
        nlist = cfg.nlist or max(1, int(math.sqrt(n)))
        nlist = max(1, min(nlist, n // 39))  # FAISS warns (and clusters badly) below 39 points per list
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, metric)
        train = vectors_NE
        if n > TRAIN_POINTS_PER_LIST * nlist:
            rng = np.random.default_rng(cfg.seed)
            train = vectors_NE[np.sort(rng.choice(n, TRAIN_POINTS_PER_LIST * nlist, replace=False))]
        index.train(np.ascontiguousarray(train))
    set_search_params(index, cfg)
    index.add(np.ascontiguousarray(vectors_NE))
    return index


def set_search_params(index, cfg: AnnConfig) -> None:
    """Apply the query-time knobs (nprobe / efSearch); needed again after `faiss.read_index`."""
    faiss = _faiss()
    if isinstance(index, faiss.IndexIVF):
        index.nprobe = min(cfg.nprobe, index.nlist)
    elif isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = cfg.ef_search


def describe(index) -> str:
    faiss = _faiss()
    if isinstance(index, faiss.IndexIVF):
        return f"IVF{index.nlist},Flat (nprobe={index.nprobe})"
    if isinstance(index, faiss.IndexHNSW):
        return f"HNSW{index.hnsw.nb_neighbors(1)},Flat (efSearch={index.hnsw.efSearch})"
    return "Flat (exact)"
