"""M tokens/s of the feature-statistics pass (`mmsae.analysis.feature_stats`) against the bare encode.

Activations already on the device (so the pass itself is timed, not a store), TopK SAE at random init.
For each chunk size: one untimed warm-up pass (kernel compilation, allocator), then a timed pass over
`--tokens` tokens. The encode-only floor is `SAE.encode` (`mmsae.kernels.topk_encode`) over the same
chunks under inference_mode; the ratio column is stats / encode.

    python benchmarks/bench_stats.py --device cuda                    # d=768, n=32768, k=32, bf16
    python benchmarks/bench_stats.py --device cuda --dtype fp32 --chunks 2048 16384
    python benchmarks/bench_stats.py --device cuda --plain            # bare [N, D] tensors, no metadata
    python benchmarks/bench_stats.py --small                          # CPU smoke run, tiny sizes

`--torch-steps` also times the pass with the torch reference of the per-chunk steps (`STATS_STEPS`) in place
of their kernels. `--profile` then profiles one pass at the last chunk size: its wall time against the sum of
its GPU kernels (a wall time well above it: the pass waits on the host's launches) and the top kernels.
`--limits` times what bounds any exact encode of one chunk of the last size on this machine: the encoder GEMM
alone (cuBLAS in the SAE's dtype, with and without the bias; fp8 e4m3 where the device has it), torch.topk on
its output, the exact fused encode, and where fp8 runs an encode from fp8 candidates re-scored exactly
(`fp8_candidate_encode`).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from timing import sync
from torch import Tensor

from mmsae import kernels
from mmsae.analysis import StatsConfig, feature_stats
from mmsae.encoders.base import TokenActs
from mmsae.kernels.candidates import ENCODES
from mmsae.sae import build_sae

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call, the device drained before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def kernel_ms(events: Any) -> float:
    """Milliseconds of device kernels among profiler events: an op's own "self" device time also counts the
    Triton kernels it launches, so summing every event would count those twice."""
    from torch.autograd import DeviceType

    return sum(e.self_device_time_total for e in events if e.device_type != DeviceType.CPU) / 1e3


def profile_pass(fn: Callable[[], object], device: torch.device, tokens: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    wall = timed(fn, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        timed(fn, device)
    events = prof.key_averages()
    table = events.table(sort_by="self_device_time_total", row_limit=24, max_name_column_width=60)
    return (
        f"one pass: wall {1e3 * wall:.0f} ms ({tokens / wall / 1e6:.2f} M tok/s), GPU kernels "
        f"{kernel_ms(events):.0f} ms (profiled pass)\n{table}"
    )


def encode_limits(args: argparse.Namespace, device: torch.device) -> None:
    """ms per chunk of the encoder GEMM alone and of torch.topk on its output: an exact encode's floor."""
    dtype, chunk = DTYPES[args.dtype], args.chunks[-1]
    x = torch.randn(chunk, args.d, device=device, dtype=dtype)
    w, b = (
        torch.randn(args.n, args.d, device=device, dtype=dtype),
        torch.randn(args.n, device=device, dtype=dtype),
    )
    flop = 2 * chunk * args.d * args.n

    def report(name: str, fn: Callable[[], object], gemm: bool = True) -> None:
        fn()
        seconds = min(timed(fn, device) for _ in range(5))
        rate = f"  {flop / seconds / 1e12:6.0f} TFLOP/s" if gemm else ""
        print(f"{name:<34} {seconds * 1e3:8.3f} ms{rate}", flush=True)

    print(f"\nencode limits, chunk {chunk}, d={args.d}, n={args.n}, {args.dtype}:")
    report("GEMM x·Wᵀ", lambda: x @ w.T)
    report("GEMM x·Wᵀ + b (F.linear)", lambda: torch.nn.functional.linear(x, w, b))
    fp8 = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
    if fp8:
        x8, w8 = x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
        one = torch.ones((), device=device)
        report(
            "GEMM fp8 e4m3 (_scaled_mm)",
            lambda: torch._scaled_mm(x8, w8.T, scale_a=one, scale_b=one, out_dtype=dtype),
        )
    else:
        print("GEMM fp8 e4m3: not on this device")
    pre = x @ w.T
    report("torch.topk of the GEMM output", lambda: torch.topk(pre, args.k, dim=-1), gemm=False)
    report("exact encode (kernels.topk_encode)", lambda: kernels.topk_encode(x, w, b.float(), args.k))
    if fp8:  # the candidate encode whose exactness bench_fp8_candidates.py measures, at k' = 2k and 3k
        w8_scaled, w_scale_N1 = to_e4m3_rows(w)
        for k_cand in (2 * args.k, 3 * args.k):
            report(
                f"fp8 candidates, k' = {k_cand}",
                lambda k_cand=k_cand: fp8_candidate_encode(x, w8_scaled, w_scale_N1.T, w, b, args.k, k_cand),
            )


E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max


E4M3_SCALE_MIN = torch.finfo(torch.float32).tiny
"""Smallest row scale: an all-zero row divides by it instead of by zero."""


def e4m3_row_scales(t_RD: Tensor) -> Tensor:
    """[R, 1] float32: one scale per row, mapping its largest magnitude to e4m3's largest value."""
    return t_RD.float().abs().amax(1, keepdim=True).clamp_min(E4M3_SCALE_MIN) / E4M3_MAX


def to_e4m3_rows(t_RD: Tensor) -> tuple[Tensor, Tensor]:
    """(`t_RD` / its row scales as e4m3, the [R, 1] scales): what `torch._scaled_mm` takes row-wise."""
    scale_R1 = e4m3_row_scales(t_RD)
    return (t_RD.float() / scale_R1).to(torch.float8_e4m3fn), scale_R1


def fp8_candidate_encode(
    x_BD: Tensor, w8_ND: Tensor, w_scale_1N: Tensor, w_ND: Tensor, b_N: Tensor, k: int, k_cand: int
) -> tuple[Tensor, Tensor]:
    """Top k of `k_cand` candidates per row: fp8 scores (row-wise scales of x, feature-wise of W, as
    `_scaled_mm` takes them), the candidates' pre-activations again exactly (`kernels.encode_at`)."""
    x8_BD, x_scale_B1 = to_e4m3_rows(x_BD)
    scores_BN = torch._scaled_mm(
        x8_BD, w8_ND.T, scale_a=x_scale_B1, scale_b=w_scale_1N, bias=b_N, out_dtype=x_BD.dtype
    )
    cand_BC = kernels.topk_indices(scores_BN, k_cand)
    best = kernels.encode_at(x_BD, w_ND, b_N.float(), cand_BC).topk(k, dim=1)
    return best.values, cand_BC.gather(1, best.indices)


def make_batches(args: argparse.Namespace, device: torch.device) -> list[TokenActs]:
    """`--tokens` tokens in batches of `--batch`, `--tokens-per-example` consecutive tokens per example."""
    g = torch.Generator(device=device).manual_seed(0)
    out = []
    for start in range(0, args.tokens, args.batch):
        n = min(args.batch, args.tokens - start)
        ids = torch.arange(start, start + n, device=device)
        out.append(
            TokenActs(
                torch.randn(n, args.d, device=device, generator=g, dtype=DTYPES[args.dtype]),
                {"example_id": ids // args.tokens_per_example, "token_index": ids % args.tokens_per_example},
            )
        )
    return out


STATS_STEPS = ("feature_sums_", "residual_sums_", "merge_sorted_top_")


@contextlib.contextmanager
def reference_steps() -> Iterator[None]:
    """The pass with the per-chunk steps of `mmsae.kernels.reference` (the torch ops) in place of their
    kernels, the encode unchanged: the kernels' gain within one run."""
    from mmsae.kernels import reference

    saved = {name: getattr(kernels, name) for name in STATS_STEPS}
    for name in STATS_STEPS:
        setattr(kernels, name, getattr(reference, name))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(kernels, name, fn)


def run(args: argparse.Namespace) -> list[dict[str, float]]:
    device = torch.device(args.device)
    sae = build_sae("topk", args.d, args.n, k=args.k).to(device, DTYPES[args.dtype]).eval()
    batches: list = make_batches(args, device)
    if args.plain:  # one example per token, known without looking at ids: the lighter top-k path
        batches = [b.acts_ND for b in batches]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"feature_stats on {device} ({name}): "
        f"d={args.d} n={args.n} k={args.k} {args.dtype}, {args.tokens:,} tokens in batches of {args.batch}, "
        f"{args.tokens_per_example} token(s) per example{' (plain tensors)' if args.plain else ''}, "
        f"top_k={args.top_k}"
    )
    print(f"{'chunk':>7} {'stats s':>9} {'stats Mtok/s':>13} {'encode Mtok/s':>14} {'stats/encode':>13}")
    rows = []
    fp8 = args.encode == "fp8"
    if fp8:
        missed = fp8_missed(sae, batches)
        print(f"encode: fp8 candidates; pairs the exact encode finds and fp8 misses: {missed:.4%}")
    for chunk in args.chunks:
        cfg = StatsConfig(top_k=args.top_k, chunk_tokens=chunk, encode=args.encode)

        def stats_pass(cfg: StatsConfig = cfg) -> object:
            return feature_stats(sae, batches, cfg)

        def encode_pass(chunk: int = chunk) -> None:
            with torch.inference_mode(), kernels.encoding(args.encode):
                for b in batches:
                    acts_ND = b if isinstance(b, torch.Tensor) else b.acts_ND
                    for s in range(0, acts_ND.shape[0], chunk):
                        sae.encode(acts_ND[s : s + chunk])

        timed(stats_pass, device)  # warm-up
        timed(encode_pass, device)
        t_stats, t_enc = timed(stats_pass, device), timed(encode_pass, device)
        row = {
            "chunk": chunk,
            "stats_s": t_stats,
            "stats_mtok_s": args.tokens / t_stats / 1e6,
            "encode_mtok_s": args.tokens / t_enc / 1e6,
        }
        if args.torch_steps:
            with reference_steps():
                timed(stats_pass, device)
                row["torch_steps_mtok_s"] = args.tokens / timed(stats_pass, device) / 1e6
        rows.append(row)
        print(
            f"{chunk:>7} {t_stats:>9.3f} {row['stats_mtok_s']:>13.3f} {row['encode_mtok_s']:>14.3f} "
            f"{t_enc / t_stats:>13.2f}"
            + (f"  (torch steps: {row['torch_steps_mtok_s']:.3f} Mtok/s)" if args.torch_steps else "")
        )
        if args.profile and chunk == args.chunks[-1]:
            print(profile_pass(stats_pass, device, args.tokens))
    return rows


def fp8_missed(sae: torch.nn.Module, batches: list) -> float:
    """Share of the exact encode's (token, feature) pairs of the first batch that the fp8 encode misses."""
    x = batches[0] if isinstance(batches[0], torch.Tensor) else batches[0].acts_ND
    with torch.inference_mode():
        exact = sae.encode(x)
        with kernels.fp8_encode():
            approx = sae.encode(x)
    found = (exact.indices[:, :, None] == approx.indices[:, None, :]).any(-1)
    return 1.0 - found.float().mean().item()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--n", type=int, default=32768)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--tokens", type=int, default=2**21, help="tokens per timed pass")
    p.add_argument("--batch", type=int, default=16384, help="tokens per batch handed to feature_stats")
    p.add_argument("--tokens-per-example", type=int, default=1, help="1: CLS tokens; 257: ViT-B/16 all")
    p.add_argument("--top-k", type=int, default=16, help="top examples kept per feature")
    p.add_argument("--chunks", type=int, nargs="+", default=[2048, 8192, 16384])
    p.add_argument("--plain", action="store_true", help="bare [N, D] tensors (needs --tokens-per-example 1)")
    p.add_argument("--small", action="store_true", help="CPU smoke run: d=64, n=1024, k=8, 16k tokens")
    p.add_argument("--profile", action="store_true", help="profile one pass at the last chunk size")
    p.add_argument(
        "--torch-steps", action="store_true", help="also time the pass with the torch per-chunk steps"
    )
    p.add_argument("--limits", action="store_true", help="also time the encoder GEMM and topk alone")
    p.add_argument("--encode", default="exact", choices=ENCODES, help="StatsConfig.encode")
    args = p.parse_args(argv)
    if args.plain and args.tokens_per_example != 1:
        p.error("--plain batches hold one example per token: drop --tokens-per-example.")
    if args.small:
        args.device, args.dtype, args.d, args.n, args.k = "cpu", "fp32", 64, 1024, 8
        args.tokens, args.batch, args.chunks = 16384, 4096, [512, 2048]
    run(args)
    if args.limits:
        encode_limits(args, torch.device(args.device))


if __name__ == "__main__":
    main()
