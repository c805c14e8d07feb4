"""The feature-statistics pass's running top-k merge (`kernels.merge_top`): the product's kernel, a variant
whose tiles put neighbouring features on neighbouring threads, and the torch reference, timed and checked
equal on one chunk's tables.

The product's kernel holds [features, entries] tiles, so the threads of a warp read entries of one feature,
n apart in memory; the variant holds [entries, features] tiles (contiguous features, coalesced reads and
writes), sorts their transpose, and takes the values back from the sorted keys instead of reloading them.
Tables as `FeatureStats` keeps them: values [k, n] float32 (the running top sorted, the chunk's best not),
metadata [k, n, 3] int64, some entries empty (−∞).

    python benchmarks/bench_merge_top.py                       # n = 32768, k = 16
    TRITON_INTERPRET=1 python benchmarks/bench_merge_top.py --device cpu --n 200 --reps 1
"""

from __future__ import annotations

import argparse
import math

import torch
import triton
import triton.language as tl
from bench_encode_gemm import timer
from torch import Tensor

from mmsae.kernels import reference, triton_stats
from mmsae.kernels.triton_stats import _merge_keys, _store_merged_meta


@triton.jit
def _merge_top_by_rows_kernel(
    top_v_ptr, top_meta_ptr, best_v_ptr, best_meta_ptr, out_v_ptr, out_meta_ptr, n,
    K: tl.constexpr, K2: tl.constexpr, BF: tl.constexpr,
):  # fmt: skip
    """`triton_stats._merge_top_kernel` on [entries, features] tiles."""
    f = tl.program_id(0) * BF + tl.arange(0, BF)
    j = tl.arange(0, K2)[:, None]
    f_ok = (f < n)[None, :]
    from_top = j < K
    real = f_ok & (j < 2 * K)
    off = tl.where(from_top, j, j - K).to(tl.int64) * n + f[None, :]
    v = tl.where(
        from_top,
        tl.load(top_v_ptr + off, mask=real & from_top, other=float("-inf")),
        tl.load(best_v_ptr + off, mask=real & ~from_top, other=float("-inf")),
    )
    packed = tl.trans(tl.sort(tl.trans(_merge_keys(v, j, real, K)), dim=1, descending=True))
    key = (packed >> 32).to(tl.int32)
    value = tl.where(key < 0, key ^ 0x7FFFFFFF, key).to(tl.float32, bitcast=True)  # −0.0 comes back +0.0
    entry = 2 * K - 1 - (packed & 0xFFFFFFFF)
    keep = f_ok & (j < K)
    out = j.to(tl.int64) * n + f[None, :]
    tl.store(out_v_ptr + out, value, mask=keep)
    src_top = entry < K
    src = tl.where(src_top, entry, entry - K) * n + f[None, :]
    _store_merged_meta(top_meta_ptr, best_meta_ptr, out_meta_ptr, src, src_top, out, keep, value)


def merge_top_by_rows(
    top_v: Tensor, top_meta: Tensor, best_v: Tensor, best_meta: Tensor, features: int = 64
) -> tuple[Tensor, Tensor]:
    k, n = top_v.shape
    out_v, out_meta = torch.empty_like(top_v), torch.empty_like(top_meta)
    _merge_top_by_rows_kernel[(triton.cdiv(n, features),)](
        top_v, top_meta, best_v, best_meta, out_v, out_meta, n,
        K=k, K2=triton.next_power_of_2(2 * k), BF=features, num_warps=4,
    )  # fmt: skip
    return out_v, out_meta


def tables(k: int, n: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A running top (sorted, a tenth of its last rows empty) and a chunk's best (unsorted, some empty)."""
    g = torch.Generator().manual_seed(0)
    top_v = torch.randn(k, n, generator=g).sort(0, descending=True).values
    top_v[-1, ::10] = -math.inf
    best_v = torch.randn(k, n, generator=g)
    best_v[:, ::7] = -math.inf
    top_meta = torch.randint(0, 1 << 20, (k, n, 3), generator=g)
    best_meta = torch.randint(0, 1 << 20, (k, n, 3), generator=g)
    return tuple(t.to(device) for t in (top_v, top_meta, best_v, best_meta))  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--n", type=int, default=32768)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--reps", type=int, default=50)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    args_t = tables(args.k, args.n, device)
    want = reference.merge_top(*args_t)
    ms = timer(device, args.reps)
    print(f"merge of two [{args.k}, {args.n}] tables on {device}\n")
    print("| merge | ms | equal to torch |\n|---|---:|---|")
    for name, fn in [
        ("torch (cat, sort along the first axis, gather)", reference.merge_top),
        ("`kernels.merge_top` ([features, entries] tiles, the product's)", triton_stats.merge_top),
        ("[entries, features] tiles", merge_top_by_rows),
    ]:
        got = fn(*args_t)
        same = torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        print(f"| {name} | {ms(lambda fn=fn: fn(*args_t)):.4f} | {'yes' if same else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
