"""Concept-index search benchmark: build time, top-10 latency and recall@10 against exact search.

Data: N random-but-clustered unit vectors (Gaussian blobs around `--clusters` random centres),
queries drawn from the same blobs. Ground truth is exact inner-product search (IndexFlatIP).
Each index is built with `mmsae.index.ann.build_ann`, the code path `ConceptIndex` uses.

    python benchmarks/bench_index.py --n 1000000 --dim 512

Prints a markdown table (paste into docs/benchmarks.md) and optionally writes JSON (`--json`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, dataclass

import numpy as np

from mmsae.index.ann import AnnConfig, build_ann, describe, set_search_params


@dataclass
class Row:
    index: str
    build_s: float
    p50_ms: float
    p99_ms: float
    recall_at_10: float


def clustered(
    n: int, dim: int, centres_CE: np.ndarray, spread: float, rng: np.random.Generator, chunk: int = 100_000
) -> np.ndarray:
    """Unit vectors c + spread·g/√d around random centres, generated in chunks to bound memory."""
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = centres_CE[rng.integers(0, len(centres_CE), m)]
        x += rng.standard_normal((m, dim), dtype=np.float32) * (spread / np.sqrt(dim))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[start : start + m] = x
    return out


def latencies_ms(index, queries_QE: np.ndarray, k: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """One query at a time (the interactive case): per-query wall time and the returned ids."""
    import faiss

    build_threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    times, ids = [], []
    for q in queries_QE:
        t0 = time.perf_counter()
        _, i = index.search(q[None], k)
        times.append((time.perf_counter() - t0) * 1e3)
        ids.append(i[0])
    faiss.omp_set_num_threads(build_threads)
    return np.asarray(times), np.stack(ids)


def recall(found_QK: np.ndarray, truth_QK: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found_QK, truth_QK)]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--clusters", type=int, default=2000)
    p.add_argument("--spread", type=float, default=1.0, help="noise norm relative to the unit centre norm")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--nprobe", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--hnsw", action="store_true", help="also build HNSW32 (slow to build on 2 cores)")
    p.add_argument("--exact-queries", type=int, default=100, help="queries timed on the exact index")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="FAISS OpenMP threads while timing single queries (1 avoids OMP spin on a busy box)",
    )
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import faiss

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((args.clusters, args.dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    base = clustered(args.n, args.dim, centres, args.spread, rng)
    queries = clustered(args.queries, args.dim, centres, args.spread, rng)
    k = 10

    rows: list[Row] = []
    t0 = time.perf_counter()
    exact = build_ann(base, AnnConfig(kind="flat"))
    build = time.perf_counter() - t0
    _, truth = exact.search(queries, k)  # batched: BLAS makes the ground truth cheap
    t_exact, _ = latencies_ms(exact, queries[: args.exact_queries], k, args.threads)
    rows.append(Row(describe(exact), build, *np.percentile(t_exact, [50, 99]), 1.0))
    del exact

    t0 = time.perf_counter()
    ivf = build_ann(base, AnnConfig(kind="ivf"))
    build = time.perf_counter() - t0
    for nprobe in args.nprobe:
        set_search_params(ivf, AnnConfig(nprobe=nprobe))
        t, found = latencies_ms(ivf, queries, k, args.threads)
        rows.append(Row(describe(ivf), build, *np.percentile(t, [50, 99]), recall(found, truth)))
    del ivf

    if args.hnsw:
        t0 = time.perf_counter()
        hnsw = build_ann(base, AnnConfig(kind="hnsw"))
        build = time.perf_counter() - t0
        for ef in (32, 64, 128):
            set_search_params(hnsw, AnnConfig(ef_search=ef))
            t, found = latencies_ms(hnsw, queries, k, args.threads)
            rows.append(Row(describe(hnsw), build, *np.percentile(t, [50, 99]), recall(found, truth)))

    print(
        f"N={args.n:,} dim={args.dim} clusters={args.clusters} spread={args.spread} queries={args.queries} "
        f"cpu={platform.processor() or platform.machine()} cores={os.cpu_count()} "
        f"faiss={faiss.__version__} build_threads={faiss.omp_get_max_threads()} query_threads={args.threads} "
        f"load_avg={os.getloadavg()[0]:.1f}"
    )
    print("| index | build (s) | p50 top-10 (ms) | p99 top-10 (ms) | recall@10 |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r.index} | {r.build_s:.1f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.recall_at_10:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": [asdict(r) for r in rows]}, f, indent=2)


if __name__ == "__main__":
    main()
