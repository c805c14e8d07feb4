"""The backward's segment matmul (dW = codesᵀ·X from [B, k] codes) on uniform and skewed features, one GPU.

In training a few features fire on most rows (dense features) while most fire rarely. A segment matmul that
gives each feature to one program then waits on the few that loop over thousands of rows; mmsae's splits long
segments into chunks (`SEGMENT_CHUNK`) and adds their partial sums in a second pass. Compared side by side
with torch's `index_add_` of the B·k scaled rows (what a plain torch backward would do) at the four sizes of
`bench_sae_step`. "zipf": feature i drawn with probability ∝ 1 / (i + 1)^0.8 (the most frequent one fires on
every row of the batch at the first size). The sort column is timed eagerly, so it is the host's launch time
of its ~15 small ops; inside the graphed training step the sort and work list take ~0.06 ms at the first size.

    python benchmarks/bench_segment.py
"""

from __future__ import annotations

import argparse

import torch
from bench_sae_step import SIZES, Size, time_ms


def codes(s: Size, dist: str) -> torch.Tensor:
    if dist == "uniform":
        return torch.randint(0, s.n, (s.B, s.k), device="cuda")
    p = 1.0 / torch.arange(1, s.n + 1, device="cuda").float() ** 0.8
    idx = torch.multinomial(p, s.B * s.k, replacement=True).view(s.B, s.k)
    return torch.randperm(s.n, device="cuda")[idx].contiguous()  # the frequent features anywhere in 0..n


def bench_case(s: Size, dist: str, reps: int) -> dict[str, float]:
    from mmsae.kernels.triton_sparse import segment_matmul_into, sort_by_feature

    idx = codes(s, dist)
    w = torch.randn(s.B, s.k, device="cuda").bfloat16()
    x = torch.randn(s.B, s.d, device="cuda").bfloat16()
    out = torch.empty(s.n, s.d, device="cuda")
    by_feature = sort_by_feature(idx, s.n)

    def torch_ref() -> torch.Tensor:  # the B·k scaled rows, added into their features' rows
        rows = (w.float()[..., None] * x.float()[:, None, :]).reshape(-1, s.d)
        return torch.zeros(s.n, s.d, device="cuda").index_add_(0, idx.flatten(), rows)

    return {
        "longest": int(torch.bincount(idx.flatten(), minlength=s.n).max()),
        "mmsae_ms": time_ms(lambda: segment_matmul_into(w, idx, x, out, by_feature), 2, reps),
        "sort_ms": time_ms(lambda: sort_by_feature(idx, s.n), 2, reps),
        "torch_ms": time_ms(torch_ref, 2, reps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="*", default=list(range(len(SIZES))))
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_segment needs a CUDA GPU.")
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  ms per call, {args.reps} back to back")
    print(
        f"{'d':>5} {'n':>7} {'k':>3} {'B':>6} {'features':>8} | longest | mmsae (+ its sort, eager) | torch"
    )
    for i in args.sizes:
        s = SIZES[i]
        for dist in ("uniform", "zipf"):
            r = bench_case(s, dist, args.reps)
            print(
                f"{s.d:>5} {s.n:>7} {s.k:>3} {s.B:>6} {dist:>8} | {r['longest']:>7} | "
                f"{r['mmsae_ms']:6.3f} (+{r['sort_ms']:.3f})   | {r['torch_ms']:6.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
