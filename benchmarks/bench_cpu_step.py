"""A TopK SAE's training step and encode-only pass on the CPU: the CPU paths of `mmsae.kernels` against the
torch reference (`MMSAE_KERNELS=torch`) in the same run.

The reference decoder multiplies a dense [B, n] code matrix by W_dec; the CPU path gathers the k rows
(`kernels.cpu`, `embedding_bag`). One step = forward, normalised-MSE loss, backward and Adam, fp32; the
encode-only pass = `feature_stats` over the same tokens. Each is timed `--reps` times per backend,
alternating, and the median reported (the machine may be shared).

    OMP_NUM_THREADS=2 python benchmarks/bench_cpu_step.py          # d=384, n=4096, k=32: a DINOv2-S SAE
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from mmsae import kernels
from mmsae.analysis import StatsConfig, feature_stats
from mmsae.sae import build_sae


def step_fn(d: int, n: int, k: int, batch: int) -> Callable[[], None]:
    sae = build_sae("topk", d, n, k=k)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    x = torch.randn(batch, d)

    def step() -> None:
        out = sae(x)
        sae.loss(x, out).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def stats_fn(d: int, n: int, k: int, tokens: int) -> Callable[[], None]:
    sae = build_sae("topk", d, n, k=k).eval()
    xs = list(torch.randn(tokens, d).split(4096))
    return lambda: feature_stats(sae, xs, StatsConfig(chunk_tokens=2048))


def seconds(fn: Callable[[], None], backend: str) -> float:
    kernels.set_backend(backend)
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=1024, help="tokens per training step")
    p.add_argument("--tokens", type=int, default=16384, help="tokens of the encode-only pass")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    print(f"CPU, {torch.get_num_threads()} threads, d={args.d} n={args.n} k={args.k}, fp32\n")
    print("| k tok/s | torch reference | mmsae CPU path | ratio |\n|---|---:|---:|---:|")
    rows = [
        ("training step", step_fn(args.d, args.n, args.k, args.batch), args.batch),
        ("feature_stats", stats_fn(args.d, args.n, args.k, args.tokens), args.tokens),
    ]
    for name, fn, tokens in rows:
        times: dict[str, list[float]] = {"torch": [], "auto": []}
        for backend in times:  # warm-up
            seconds(fn, backend)
        for _ in range(args.reps):
            for backend, ts in times.items():
                ts.append(seconds(fn, backend))
        ref, cpu = (tokens / statistics.median(times[b]) / 1e3 for b in ("torch", "auto"))
        print(f"| {name} | {ref:,.1f} | {cpu:,.1f} | {cpu / ref:.2f} |", flush=True)
    kernels.set_backend("auto")


if __name__ == "__main__":
    main()
