"""A top-k encode that never writes the [B, n] pre-activations: group maxima first, then the chosen groups
re-scored exactly, grouped by feature group so that each group's weights are read once.

The product's exact encode (`kernels.topk_encode`) writes all of pre = x·Wᵀ + b from its GEMM (1 GiB per
16k-token chunk at n = 32768) and selects from it; its epilogue also writes the max of every run of 16
columns. The top k of a row lie in its k groups of largest maxima, so only those k·16 entries are needed:
1. GEMM with the group maxima only, nothing else written (bf16: exact maxima; e4m3 with row and feature
   scales: approximate, so k' > k groups are kept);
2. per row the k' groups of largest maxima;
3. the (row, group) pairs sorted by group, and each run of pairs of one group re-scored against that group's
   16 weight rows in one small GEMM (the rows of x gathered), as the product's bf16 encode rounds them;
4. the top k of each row's k'·16 re-scored entries.
Each step is timed, then the whole, against the product's encode; codes are compared with the product's.

    python benchmarks/bench_group_encode.py                 # d=768, n=32768, k=32, 16384 tokens
    TRITON_INTERPRET=1 python benchmarks/bench_group_encode.py --device cpu --tokens 256 --d 64 --n 1024 --k 8

Triton's CPU interpreter computes bf16 dot products wrongly, so a CPU run only shows that the script runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl
from bench_encode_gemm import FP8_CONFIGS, Gemm, arguments, fp8_gemm, operands, product_config, timer
from torch import Tensor

from mmsae import kernels
from mmsae.kernels import triton_select as ts

PAIRS_PER_PROGRAM = 64


@triton.jit
def _group_rescore_kernel(
    x_ptr, w_ptr, b_ptr, row_ptr, grp_ptr, out_ptr, P, D,
    GS: tl.constexpr, BP: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    """Pairs sorted by group, BP per program: for each distinct group among them, x[rows]·W[group]ᵀ + b over
    its GS features, stored for the pairs of that group ([P, GS] float32 of the bf16-rounded values, as the
    product's pre holds them)."""
    p = tl.program_id(0) * BP + tl.arange(0, BP)
    ok = p < P
    rows = tl.load(row_ptr + p, mask=ok, other=0).to(tl.int64)
    grp = tl.load(grp_ptr + p, mask=ok, other=2147483647)
    f = tl.arange(0, GS)
    g = tl.min(grp, 0)
    last = tl.max(tl.where(ok, grp, -1), 0)
    while g <= last:
        acc = tl.zeros((BP, GS), dtype=tl.float32)
        w_rows = (g * GS + f).to(tl.int64)
        for d0 in range(0, D, BD):
            dd = d0 + tl.arange(0, BD)
            x = tl.load(
                x_ptr + rows[:, None] * D + dd[None, :], mask=ok[:, None] & (dd < D)[None, :], other=0.0
            )
            w = tl.load(w_ptr + w_rows[:, None] * D + dd[None, :], mask=(dd < D)[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(w), acc)
        pre = (acc + tl.load(b_ptr + w_rows).to(tl.float32)[None, :]).to(tl.bfloat16).to(tl.float32)
        mine = ok & (grp == g)
        tl.store(out_ptr + p[:, None].to(tl.int64) * GS + f[None, :], pre, mask=mine[:, None])
        g = tl.min(tl.where(grp > g, grp, 2147483647), 0)


class GroupEncode:
    """Steps 2–4 from group maxima; `__call__(gmax)` returns (values, indices) of the top k."""

    def __init__(self, x: Tensor, W: Tensor, b: Tensor, k: int, groups_kept: int, group: int):
        self.x, self.W, self.b, self.k, self.kg, self.gs = x, W, b, k, groups_kept, group

    def choose(self, gmax: Tensor) -> Tensor:
        """[B, k'] groups of the largest int16 maxima keys, ties to the lowest group as the product's group
        select breaks them, in column order so that the top k's ties also go to the lowest column."""
        G = gmax.shape[1]
        unique = gmax.int() * 65536 + (G - 1 - torch.arange(G, device=gmax.device, dtype=torch.int32))
        return unique.topk(self.kg, dim=1, sorted=False).indices.sort(dim=1).values

    def rescore(self, groups: Tensor) -> Tensor:
        B = self.x.shape[0]
        rows = torch.arange(B, device=groups.device).repeat_interleave(self.kg)
        order = (groups.reshape(-1) * B + rows).int().argsort()  # G·B < 2³¹ at the benchmark's sizes
        grp_s, rows_s = groups.reshape(-1)[order].int(), rows[order]
        out = torch.empty(order.shape[0], self.gs, dtype=torch.float32, device=groups.device)
        P = order.shape[0]
        _group_rescore_kernel[(triton.cdiv(P, PAIRS_PER_PROGRAM),)](
            self.x, self.W, self.b, rows_s, grp_s, out, P, self.x.shape[1],
            GS=self.gs, BP=PAIRS_PER_PROGRAM, BD=64, num_warps=4,
        )  # fmt: skip
        return torch.empty_like(out).index_copy_(0, order, out).view(B, self.kg * self.gs)

    def top(self, groups: Tensor, pre_BC: Tensor) -> tuple[Tensor, Tensor]:
        slot = kernels.topk_indices(pre_BC, self.k)
        feature = groups.gather(1, slot // self.gs) * self.gs + slot % self.gs
        return pre_BC.gather(1, slot).float().relu(), feature

    def __call__(self, gmax: Tensor) -> tuple[Tensor, Tensor]:
        groups = self.choose(gmax)
        return self.top(groups, self.rescore(groups))


def differ(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> tuple[float, float]:
    """Shares of rows whose sorted code values differ, and whose (feature, value) sets differ (a tie at
    the k-th value may take another feature of the same value)."""
    (va, ia), (vb, ib) = a, b
    values = (va.float().sort(1).values != vb.float().sort(1).values).any(1)
    oa, ob = ia.sort(1), ib.sort(1)
    pairs = (oa.values != ob.values).any(1) | (
        va.float().gather(1, oa.indices) != vb.float().gather(1, ob.indices)
    ).any(1)
    return values.float().mean().item(), pairs.float().mean().item()


def main(argv: list[str] | None = None) -> None:
    p = arguments(__doc__)
    p.add_argument("--fp8-groups", type=int, nargs="+", default=[40, 48, 64], help="k' kept from fp8 maxima")
    args = p.parse_args(argv)
    device, x, W, b = operands(args)
    M, D, N, k = args.tokens, args.d, args.n, args.k
    gs = ts.group_config(N, k).group
    ms = timer(device, args.reps)
    exact = kernels.topk_encode(x, W, b, k)
    print(f"(d, n, k) = ({D}, {N}, {k}), {M} tokens, groups of {gs}\n")
    print(
        "| per chunk | ms | rows whose code values / codes differ from the exact encode's |\n|---|---:|---:|"
    )
    print(f"| exact encode (`kernels.topk_encode`) | {ms(lambda: kernels.topk_encode(x, W, b, k)):.3f} | |")

    bf16 = Gemm(x, W, b, gs, None)
    cfg = product_config(gs)

    def maxima() -> Tensor:
        return bf16.run(cfg, write=False)[1]

    report("bf16 maxima", maxima, GroupEncode(x, W, b, k, k, gs), exact, ms)

    fp8, quantise = fp8_gemm(x, W, b, gs)

    def maxima8() -> Tensor:
        quantise()
        return fp8.run(FP8_CONFIGS[0], write=False)[1]  # the fastest e4m3 tile in bench_encode_gemm's sweep

    for kg in args.fp8_groups:
        report(f"fp8 maxima, k' = {kg} groups", maxima8, GroupEncode(x, W, b, k, kg, gs), exact, ms)


Timer = Callable[[Callable[[], object]], float]


def report(
    name: str, maxima: Callable[[], Tensor], enc: GroupEncode, exact: tuple[Tensor, Tensor], ms: Timer
) -> None:
    gmax = maxima()
    groups = enc.choose(gmax)
    pre = enc.rescore(groups)
    parts = (
        f"maxima {ms(maxima):.3f}, choose {ms(lambda: enc.choose(gmax)):.3f}, "
        f"re-score {ms(lambda: enc.rescore(groups)):.3f}, top {ms(lambda: enc.top(groups, pre)):.3f}"
    )
    whole = ms(lambda: enc(maxima()))
    values, codes = differ(enc(maxima()), exact)
    print(f"| {name} ({parts}), whole | {whole:.3f} | {values:.3%} / {codes:.3%} |", flush=True)


if __name__ == "__main__":
    main()
