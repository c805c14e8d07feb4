"""`mmsae.kernels.topk_indices` (the Triton select where it applies) against `torch.topk`, per row of [B, n].

Scores are random with half the columns −∞, as AuxK's masked pre-activations (dead features only); each row
of the table is one (n, dtype, k): the median time of each call (`triton.testing.do_bench` on CUDA, wall clock
on the CPU) and their ratio. `INDICES_MAX_K` in `mmsae.kernels` is set from this table.

    python benchmarks/bench_select.py --device cuda        # B = 4096, n = 4096 and 16384, k = 32 … 512
    python benchmarks/bench_select.py --device cpu --small # smoke run: torch.topk on both sides
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from mmsae import kernels


def median_ms(fn: Callable[[], object], device: torch.device, reps: int = 20) -> float:
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--n", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--k", type=int, nargs="+", default=[32, 64, 128, 192, 256, 384, 512])
    ap.add_argument("--small", action="store_true", help="B = 64, n = 512, k = 8 and 32")
    args = ap.parse_args(argv)
    if args.small:
        args.rows, args.n, args.k = 64, [512], [8, 32]
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"{args.rows} rows, half of each row −∞, ms (median); {device}")
    print("| n | dtype | k | torch.topk | topk_indices | ratio |\n|---:|---|---:|---:|---:|---:|")
    for n in args.n:
        dead_N = torch.rand(n, device=device) < 0.5
        for dtype in (torch.bfloat16, torch.float32):
            scores_BN = torch.randn(args.rows, n, device=device, dtype=dtype).masked_fill(
                ~dead_N, float("-inf")
            )
            for k in args.k:
                base = median_ms(lambda s=scores_BN, k=k: s.topk(k, dim=-1, sorted=False), device)
                ours = median_ms(lambda s=scores_BN, k=k: kernels.topk_indices(s, k), device)
                name = str(dtype).removeprefix("torch.")
                print(f"| {n} | {name} | {k} | {base:.3f} | {ours:.3f} | {ours / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
