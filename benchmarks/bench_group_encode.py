"""The encode-only group encode (`kernels.triton_group.group_topk`) step by step against the exact encode, at
one chunk of an encode-only pass.

The exact encode (`kernels.topk_encode`) writes all of pre = x·Wᵀ + b from its GEMM (1 GiB per 16k-token
chunk at n = 32768) and selects from it. `group_topk` writes only the GEMM's group maxima, chooses each row's
`kept` groups of largest maxima, re-scores those exactly and takes their top k:
- 16-bit maxima, kept = k: exactly the exact encode's codes (checked here: share of rows equal);
- e4m3 maxima (`fp8_encode`: each token and feature scaled to e4m3's range), kept = ⌈g · k⌉ groups for each
  `--fp8-groups` g: the GEMM at twice the rate; here the share of the exact encode's (row, feature) pairs
  found and whether every value found is the exact one. Random operands have many near-ties at the k-th
  value; real activations miss far fewer (docs/benchmarks.md, `bench_fp8_candidates.py`).
Each step is timed, then the whole, per chunk, CUDA events over `--reps` back-to-back calls.

    python benchmarks/bench_group_encode.py                 # d=768, n=32768, k=32, 16384 tokens
    TRITON_INTERPRET=1 python benchmarks/bench_group_encode.py --device cpu --tokens 256 --d 64 --n 1024 --k 8

Triton's CPU interpreter computes bf16 dot products wrongly, so a CPU run only shows that the script runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from bench_encode_gemm import arguments, operands, timer
from torch import Tensor

from mmsae import kernels
from mmsae.kernels import triton_group as tg
from mmsae.kernels.candidates import Fp8Encode
from mmsae.kernels.triton_fp8 import e4m3_rows
from mmsae.kernels.triton_gemm import linear_group_maxima
from mmsae.kernels.triton_select import group_config

Codes = tuple[Tensor, Tensor]


def rows_equal(a: Codes, b: Codes) -> float:
    """Share of rows whose (feature, value) sets are equal."""
    (va, ia), (vb, ib) = a, b
    oa, ob = ia.sort(1), ib.sort(1)
    same = (oa.values == ob.values).all(1) & (va.gather(1, oa.indices) == vb.gather(1, ob.indices)).all(1)
    return same.float().mean().item()


def pairs_found(approx: Codes, exact: Codes) -> tuple[float, bool]:
    """(share of the exact codes' (row, feature) pairs in `approx`, whether their values agree)."""
    (va, ia), (vb, ib) = approx, exact
    match = ib[:, :, None] == ia[:, None, :]  # [B, exact, approx]
    found = match.any(2)
    at = torch.where(match, va[:, None, :].float(), 0.0).sum(2)
    return found.float().mean().item(), bool(torch.equal(at[found], vb.float()[found]))


def main(argv: list[str] | None = None) -> None:
    p = arguments(__doc__)
    p.add_argument("--fp8-groups", type=float, nargs="+", default=[1.5, 2.0, 3.0], help="kept = ⌈g·k⌉")
    args = p.parse_args(argv)
    device, x, W, b = operands(args)
    k, group = args.k, group_config(args.n, args.k).group
    ms = timer(device, args.reps)
    b16 = b.to(x.dtype)
    exact = kernels.topk_encode(x, W, b, k)
    print(f"(d, n, k) = ({args.d}, {args.n}, {k}), {args.tokens} tokens, groups of {group}\n")
    print("| per chunk | ms | against the exact encode |\n|---|---:|---|")
    row("exact encode (`kernels.topk_encode`)", ms(lambda: kernels.topk_encode(x, W, b, k)))

    def maxima() -> Tensor:
        return linear_group_maxima(x, W, b16, group, write_pre=False)[1]

    steps(ms, "16-bit", maxima, x, W, b16, k, k, group)
    got = tg.group_topk(x, W, b, k)
    row("group_topk, 16-bit, kept k, whole", ms(lambda: tg.group_topk(x, W, b, k)), rows_equal(got, exact))

    W8 = e4m3_rows(W)
    row("x to e4m3 rows (`e4m3_rows`)", ms(lambda: e4m3_rows(x)))

    def maxima8() -> Tensor:
        x8 = e4m3_rows(x)
        return linear_group_maxima(x8[0], W8[0], b16, group, write_pre=False, scales=(x8[1], W8[1]))[1]

    for g in args.fp8_groups:
        kept = Fp8Encode(g).kept(k, math.ceil(args.n / group))
        steps(ms, f"e4m3, kept {kept}", maxima8, x, W, b16, k, kept, group)
        got = tg.group_topk(x, W, b, k, kept=kept, fp8_weights=W8)
        found, exact_values = pairs_found(got, exact)
        t = ms(lambda kept=kept: tg.group_topk(x, W, b, k, kept=kept, fp8_weights=W8))
        row(f"group_topk, e4m3, kept {kept} = ⌈{g:g}k⌉, whole", t, found, exact_values)


def steps(
    ms: Callable, name: str, maxima: Callable[[], Tensor], x: Tensor, W: Tensor, b16: Tensor, k: int,
    kept: int, group: int,
) -> None:  # fmt: skip
    """One row per step of `group_topk` on these maxima."""
    gmax = maxima()
    groups = tg.choose_groups(gmax, kept)
    pre = tg.rescore_groups(x, W, b16, groups, group)
    parts = (
        f"maxima (GEMM, nothing else written) {ms(maxima):.3f}, "
        f"choose {ms(lambda: tg.choose_groups(gmax, kept)):.3f}, "
        f"re-score {ms(lambda: tg.rescore_groups(x, W, b16, groups, group)):.3f}, "
        f"top k {ms(lambda: tg._top_of_groups(*pre, groups, group, k)):.3f}"
    )
    print(f"| {name}: {parts} | | |", flush=True)


def row(name: str, t: float, share: float | None = None, exact_values: bool | None = None) -> None:
    note = ""
    if share is not None and exact_values is None:
        note = f"rows equal: {share:.4%}"
    elif share is not None:
        note = f"pairs found: {share:.4%}, values exact: {'yes' if exact_values else 'NO'}"
    print(f"| {name} | {t:.3f} | {note} |", flush=True)


if __name__ == "__main__":
    main()
