"""The fused encoder GEMM (`kernels.triton_gemm`: x·Wᵀ + b with the group maxima of the top-k select in its
epilogue) over tile configs, and an fp8 e4m3 twin, at one chunk of an encode-only pass.

Rows, per chunk of `--tokens` tokens at (d, n), CUDA events over `--reps` back-to-back calls:
- cuBLAS `F.linear` and the product's whole exact encode (`kernels.topk_encode`), the references;
- the fused bf16 GEMM with each tile config (block M × N × K, pipeline stages, warps; "ws": Triton's warp
  specialisation), its max error against cuBLAS, then the best without writing the [B, n] output (what the
  output's write costs);
- x quantised row-wise to e4m3 (one Triton pass), then the same GEMM on e4m3 operands with the token and
  feature scales applied in the epilogue, each config, and the best without its output;
- an encode from fp8 candidates: the group select of k' candidates from the fp8 maxima, their exact re-score
  (`kernels.encode_at`) and the top k of those, each part and whole, against the exact encode's codes.
The same kernel body serves every row; the product's kernel is the bf16 config marked "(product)".

    python benchmarks/bench_encode_gemm.py                      # d=768, n=32768, k=32, 16384 tokens
    TRITON_INTERPRET=1 python benchmarks/bench_encode_gemm.py --device cpu --tokens 256 --d 64 --n 1024 --k 8

Triton's CPU interpreter computes bf16 dot products wrongly (the bf16 rows' errors there are huge), so a CPU
run only shows that the script runs.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from bench_stats import E4M3_MAX, E4M3_SCALE_MIN, to_e4m3_rows
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from mmsae import kernels
from mmsae.kernels import triton_select as ts
from mmsae.kernels.triton_gemm import BLOCK_K, BLOCK_M, BLOCK_N, _stages, _tile_coords
from mmsae.kernels.triton_keys import _ordered_key

BF16_CONFIGS = [  # (BM, BN, BK, stages, warps, warp specialisation)
    (128, 256, 64, 3, 8, True),
    (128, 128, 64, 4, 4, False),
    (128, 128, 64, 5, 8, False),
    (256, 128, 64, 3, 8, False),
    (128, 256, 32, 5, 8, False),
    (64, 256, 64, 4, 4, False),
]
FP8_CONFIGS = [
    (128, 256, 128, 3, 8, False),
    (128, 256, 128, 3, 8, True),
    (128, 128, 128, 5, 4, False),
    (256, 128, 128, 3, 8, False),
    (128, 256, 64, 4, 8, False),
]


@triton.jit
def _gemm_group_max_kernel(
    x_desc, w_desc, out_desc, bias_ptr, xs_ptr, ws_ptr, gmax_ptr, M, N, K, G, NUM_PROGRAMS,
    GS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    SCALED: tl.constexpr, WRITE: tl.constexpr, WS: tl.constexpr,
):  # fmt: skip
    """`triton_gemm._linear_group_max_kernel` with switches: e4m3 operands scaled in the epilogue (SCALED),
    the [M, N] output written or not (WRITE), warp specialisation of the tile loop (WS)."""
    tiles_m = tl.cdiv(M, BM)
    tiles_per_band = GROUP_M * tl.cdiv(N, BN)
    n_tiles = tiles_m * tl.cdiv(N, BN)
    tile_out = tl.program_id(0) - NUM_PROGRAMS
    for tile in tl.range(tl.program_id(0), n_tiles, NUM_PROGRAMS, flatten=True, warp_specialize=WS):
        pid_m, pid_n = _tile_coords(tile, tiles_per_band, tiles_m, GROUP_M)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for ki in range(tl.cdiv(K, BK)):
            acc = tl.dot(x_desc.load([pid_m * BM, ki * BK]), w_desc.load([pid_n * BN, ki * BK]).T, acc)
        tile_out += NUM_PROGRAMS
        pid_m, pid_n = _tile_coords(tile_out, tiles_per_band, tiles_m, GROUP_M)
        rows = pid_m * BM + tl.arange(0, BM)
        cols = pid_n * BN + tl.arange(0, BN)
        bias = tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        if SCALED:
            xs = tl.load(xs_ptr + rows, mask=rows < M, other=0.0)
            ws = tl.load(ws_ptr + cols, mask=cols < N, other=0.0)
            pre = acc * xs[:, None] * ws[None, :] + bias[None, :]
        else:
            pre = acc + bias[None, :]
        if WRITE:
            left, right = tl.split(
                tl.permute(tl.reshape(pre.to(out_desc.dtype), (BM, 2, BN // 2)), (0, 2, 1))
            )
            out_desc.store([pid_m * BM, pid_n * BN], left)
            out_desc.store([pid_m * BM, pid_n * BN + BN // 2], right)
        pre = tl.where(cols[None, :] < N, pre, float("-inf"))
        gmax = _ordered_key(tl.max(tl.reshape(pre, (BM, BN // GS, GS)), axis=2).to(out_desc.dtype))
        groups = pid_n * (BN // GS) + tl.arange(0, BN // GS)
        ok = (rows[:, None] < M) & (groups[None, :] < G)
        tl.store(
            gmax_ptr + rows[:, None].to(tl.int64) * G + groups[None, :], (gmax - 32768).to(tl.int16), mask=ok
        )


@triton.jit
def _quantise_rows_kernel(
    x_ptr, q_ptr, s_ptr, M, D, SCALE_MIN: tl.constexpr, E4M3: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr
):  # fmt: skip
    """`bench_stats.to_e4m3_rows` of [M, D] rows in one pass: e4m3 values and float32 scales."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BD)
    ok = (rows[:, None] < M) & (cols[None, :] < D)
    x = tl.load(x_ptr + rows[:, None] * D + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    s = tl.maximum(tl.max(tl.abs(x), axis=1), SCALE_MIN) / E4M3
    tl.store(q_ptr + rows[:, None] * D + cols[None, :], (x / s[:, None]).to(tl.float8e4nv), mask=ok)
    tl.store(s_ptr + rows, s, mask=rows < M)


class Gemm:
    """The sweep's kernel on fixed operands; `run(config, write)` returns (pre, group maxima)."""

    def __init__(self, x: Tensor, w: Tensor, b: Tensor, group: int, scales: tuple[Tensor, Tensor] | None):
        self.x, self.w, self.b, self.group, self.scales = x, w, b, group, scales
        M, N = x.shape[0], w.shape[0]
        self.pre = torch.empty(M, N, dtype=torch.bfloat16, device=x.device)
        self.gmax = torch.empty(M, triton.cdiv(N, group), dtype=torch.int16, device=x.device)
        dev = x.device
        self.programs = (
            torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 4
        )

    def run(self, config: tuple, write: bool = True) -> tuple[Tensor, Tensor]:
        BM, BN, BK, stages, warps, ws = config
        (M, K), N = self.x.shape, self.w.shape[0]
        xs, wsc = self.scales or (self.b, self.b)
        programs = min(triton.cdiv(M, BM) * triton.cdiv(N, BN), self.programs)
        _gemm_group_max_kernel[(programs,)](
            TensorDescriptor.from_tensor(self.x, [BM, BK]), TensorDescriptor.from_tensor(self.w, [BN, BK]),
            TensorDescriptor.from_tensor(self.pre, [BM, BN // 2]), self.b, xs, wsc, self.gmax,
            M, N, K, self.gmax.shape[1], programs, GS=self.group, BM=BM, BN=BN, BK=BK, GROUP_M=8,
            SCALED=self.scales is not None, WRITE=write, WS=ws, num_stages=stages, num_warps=warps,
        )  # fmt: skip
        return self.pre, self.gmax


def fp8_gemm(x: Tensor, W: Tensor, b: Tensor, group: int) -> tuple[Gemm, Callable[[], None]]:
    """(the sweep's kernel on e4m3 operands, `quantise()`): W is scaled per feature once (fixed during a
    pass), x per token by each `quantise()` call (one Triton pass, as each chunk would be)."""
    M, D = x.shape
    W8, w_scale_N1 = to_e4m3_rows(W)
    x8 = torch.empty(M, D, dtype=torch.float8_e4m3fn, device=x.device)
    x_scale = torch.empty(M, device=x.device)

    def quantise() -> None:
        _quantise_rows_kernel[(triton.cdiv(M, 16),)](
            x, x8, x_scale, M, D, E4M3_SCALE_MIN, E4M3_MAX, BR=16, BD=triton.next_power_of_2(D)
        )

    quantise()
    return Gemm(x8, W8, b, group, (x_scale, w_scale_N1[:, 0])), quantise


def timer(device: torch.device, reps: int) -> Callable[[Callable[[], object]], float]:
    def ms(fn: Callable[[], object]) -> float:
        fn()
        if device.type != "cuda":  # the interpreter: one call shows that the row runs
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / reps

    return ms


def sweep(
    name: str, gemm: Gemm, configs: list[tuple], ref: Tensor, ms: Callable, flop: float
) -> tuple | None:
    """One row per config; returns the fastest config that ran."""
    best = None
    for config in configs:
        BM, BN, BK, stages, warps, ws = config
        label = f"{name} {BM}×{BN}×{BK}, {stages} stages, {warps} warps{', ws' if ws else ''}"
        label += " (product)" if config == product_config(gemm.group) else ""
        try:
            err = (gemm.run(config)[0].float() - ref).abs().max().item()
            t = ms(lambda config=config: gemm.run(config))
        except Exception as ex:  # a config that does not fit this device: say so and go on
            print(f"| {label} | failed: {str(ex).splitlines()[0][:100]} | | |", flush=True)
            continue
        print(f"| {label} | {t:.3f} | {flop / t / 1e9:,.0f} | {err:.3g} |", flush=True)
        if best is None or t < best[0]:
            best = (t, config)
    if best is not None:
        t = ms(lambda: gemm.run(best[1], write=False))
        print(
            f"| {name}, fastest, group maxima only (no output written) | {t:.3f} | {flop / t / 1e9:,.0f} | |"
        )
    return None if best is None else best[1]


def product_config(group: int) -> tuple:
    return (BLOCK_M, BLOCK_N, BLOCK_K, _stages(group), 8, False)


def arguments(description: str) -> argparse.ArgumentParser:
    """The size and timing arguments this script and `bench_group_encode.py` share."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--n", type=int, default=32768)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--reps", type=int, default=20)
    return p


def operands(args: argparse.Namespace) -> tuple[torch.device, Tensor, Tensor, Tensor]:
    """(device, x [tokens, d] bf16, W [n, d] bf16 with rows of norm ~1, b [n] fp32), seeded; Triton's
    allocator set for the TMA descriptors."""
    device = torch.device(args.device)
    if device.type == "cuda":
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=device))
    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.d, device=device, dtype=torch.bfloat16)
    W = (torch.randn(args.n, args.d, device=device) / args.d**0.5).bfloat16()
    return device, x, W, torch.randn(args.n, device=device) * 0.01


def main(argv: list[str] | None = None) -> None:
    p = arguments(__doc__)
    p.add_argument("--candidates", type=int, nargs="+", default=[48, 64], help="k' of the fp8 encode")
    args = p.parse_args(argv)
    device, x, W, b = operands(args)
    M, D, N, k = args.tokens, args.d, args.n, args.k
    cfg = ts.group_config(N, k)
    ms, flop = timer(device, args.reps), 2 * M * D * N
    ref = torch.nn.functional.linear(x, W, b.bfloat16()).float()
    print(
        f"(d, n, k) = ({D}, {N}, {k}), {M} tokens, groups of {cfg.group}; torch {torch.__version__}, ", end=""
    )
    print(f"triton {triton.__version__}\n\n| per chunk | ms | TFLOP/s | max error |\n|---|---:|---:|---:|")
    print(
        f"| cuBLAS bf16 `F.linear` | {ms(lambda: torch.nn.functional.linear(x, W, b.bfloat16())):.3f} | | |"
    )
    print(f"| exact encode (`kernels.topk_encode`) | {ms(lambda: kernels.topk_encode(x, W, b, k)):.3f} | | |")
    sweep("bf16", Gemm(x, W, b, cfg.group, None), [product_config(cfg.group), *BF16_CONFIGS], ref, ms, flop)

    fp8, quantise = fp8_gemm(x, W, b, cfg.group)
    print(f"| x to e4m3, row-wise scales (Triton) | {ms(quantise):.3f} | | |")
    best = sweep("fp8", fp8, FP8_CONFIGS, ref, ms, flop)
    if best is not None:
        candidate_encode(args, fp8, best, quantise, (x, W, b), ms)


def candidate_encode(
    args: argparse.Namespace, fp8: Gemm, config: tuple, quantise: Callable, xwb: tuple, ms: Callable
) -> None:
    x, W, b = xwb
    exact_v, _ = kernels.topk_encode(x, W, b, args.k)
    for kc in args.candidates:
        candidate_row(fp8, config, quantise, xwb, args.k, kc, exact_v, ms)


def candidate_row(
    fp8: Gemm, config: tuple, quantise: Callable, xwb: tuple, k: int, kc: int, exact_v: Tensor, ms: Callable
) -> None:
    """Encode from k' fp8 candidates: its parts, then the whole and its largest code error."""
    x, W, b = xwb
    cfg = ts.group_config(W.shape[0], k)
    cand_v = torch.empty(x.shape[0], kc, dtype=torch.bfloat16, device=x.device)
    cand_i = torch.empty(x.shape[0], kc, dtype=torch.int64, device=x.device)

    def select() -> None:
        ts.select_from_group_maxima(*fp8.run(config), kc, cfg, cand_v, cand_i)

    def whole() -> Tensor:
        quantise()
        select()
        return kernels.encode_at(x, W, b, cand_i).topk(k, dim=1).values.relu()

    select()
    pre_at = kernels.encode_at(x, W, b, cand_i)
    t_sel = ms(lambda: ts.select_from_group_maxima(fp8.pre, fp8.gmax, kc, cfg, cand_v, cand_i))
    t_at = ms(lambda: kernels.encode_at(x, W, b, cand_i))
    parts = f"select {t_sel:.3f}, re-score {t_at:.3f}, top {k} {ms(lambda: pre_at.topk(k, dim=1)):.3f}"
    err = (whole().float().sort(1).values - exact_v.float().sort(1).values).abs().max().item()
    print(f"| fp8 candidate encode, k' = {kc} ({parts}) | {ms(whole):.3f} | | {err:.3g} vs exact codes |")


if __name__ == "__main__":
    main()
