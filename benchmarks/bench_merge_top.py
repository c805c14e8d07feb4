"""The feature-statistics pass's running top-k merge (`kernels.merge_sorted_top_`) on one chunk: the Triton
kernel and the torch reference, timed and checked equal, on plain batches (one example per token: no
duplicate checks) and on TokenActs batches (`--tokens-per-example` tokens per example: an example keeps its
best entry per feature, within the chunk and against the running top).

The chunk's (token, feature) pairs are those of a TopK encode at random (N tokens, k_sae features each out of
n, log-normal values), sorted by feature and value as `FeatureStats.update` sorts them (the sort is timed
too, for scale); the running top holds the previous chunk's merge.

    python benchmarks/bench_merge_top.py                       # n = 32768, top 16, 16384 tokens, k = 32
    TRITON_INTERPRET=1 python benchmarks/bench_merge_top.py --device cpu --n 200 --tokens 256 --reps 1
"""

from __future__ import annotations

import argparse
import math

import torch
from bench_encode_gemm import timer
from torch import Tensor

from mmsae.analysis.stats_ops import group_then_descending
from mmsae.kernels import reference, triton_stats


def chunk_pairs(tokens: int, n: int, k: int, tokens_per_example: int, seed: int, device: torch.device):
    """(grp, values, rows) sorted as the stats pass sorts them, and the [N, 3] metadata."""
    g = torch.Generator().manual_seed(seed)
    grp = torch.rand(tokens, n, generator=g).topk(k, dim=1).indices.reshape(-1)
    v = torch.randn(tokens * k, generator=g).exp()
    ids = torch.arange(tokens) + seed * tokens
    meta = torch.stack([ids // tokens_per_example, ids % tokens_per_example, torch.full_like(ids, -1)], 1)
    grp, v, meta = grp.to(device), v.to(device), meta.to(device)
    order = group_then_descending(grp, v, n + 1)
    return grp[order], v[order], order // k, meta


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--n", type=int, default=32768)
    p.add_argument("--top-k", type=int, default=16)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--k", type=int, default=32, help="features per token (the SAE's k)")
    p.add_argument("--tokens-per-example", type=int, default=257, help="TokenActs batches; 257: ViT-B/16")
    p.add_argument("--reps", type=int, default=50)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    ms = timer(device, args.reps)
    print(
        f"top-{args.top_k} merge of {args.tokens} tokens × k = {args.k} pairs into n = {args.n} features "
        f"on {device}\n"
    )
    print("| batches | step | ms | equal to torch |\n|---|---|---:|---|")
    for name, per_example, distinct in [("plain", 1, False), ("TokenActs", args.tokens_per_example, True)]:
        top_v = torch.full((args.top_k, args.n), -math.inf, device=device)
        top_meta = torch.full((args.top_k, args.n, 3), -1, dtype=torch.long, device=device)
        previous = chunk_pairs(args.tokens, args.n, args.k, per_example, 0, device)
        reference.merge_sorted_top_(top_v, top_meta, *previous, distinct)  # a full running top
        pairs = chunk_pairs(args.tokens, args.n, args.k, per_example, 1, device)
        grp = pairs[0]
        sort_ms = ms(lambda grp=grp, v=pairs[1]: group_then_descending(grp, v, args.n + 1))
        print(f"| {name} | sort of the pairs (for scale) | {sort_ms:.4f} | |")
        report(name, ms, top_v, top_meta, pairs, distinct)


def report(name: str, ms, top_v: Tensor, top_meta: Tensor, pairs: tuple, distinct: bool) -> None:
    want = _merged(reference.merge_sorted_top_, top_v, top_meta, pairs, distinct)
    for label, merge in [
        ("torch reference", reference.merge_sorted_top_),
        ("`kernels.merge_sorted_top_` (Triton)", triton_stats.merge_sorted_top_),
    ]:
        got = _merged(merge, top_v, top_meta, pairs, distinct)
        same = torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        t = ms(lambda merge=merge: _merged(merge, top_v, top_meta, pairs, distinct))
        print(f"| {name} | {label} | {t:.4f} | {'yes' if same else 'NO'} |", flush=True)


def _merged(merge, top_v: Tensor, top_meta: Tensor, pairs: tuple, distinct: bool) -> tuple[Tensor, Tensor]:
    """The merge on copies of the running top (it works in place), copies included in the time."""
    v, meta = top_v.clone(), top_meta.clone()
    merge(v, meta, *pairs, distinct)
    return v, meta


if __name__ == "__main__":
    main()
