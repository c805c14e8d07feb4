"""Tokens/s of the whole trainer (`mmsae.train`: Lightning loop, data, step) with and without CUDA graphs.

Each row trains a TopK SAE (AuxK on, as users run it) on random fp16 activations held in host memory, either
staged (the default: copied to the GPU once and gathered there) or not (`stage=False`: the loader gathers,
pins and copies each batch), or already on the GPU (the trainer alone), next to the loader's own rate with no
training. Rates are steady state: the difference of two runs of `--steps` (200 and 1200) steps, which
cancels the fixed cost of a run (Lightning setup, init batches, the captures: ~0.7 s and noisy). The peer
column is sparsify's SparseCoder step in a bare loop (no trainer, no data), at the same size, from
bench_sae_step; the last table sets the trainer (CUDA graphs, data on the GPU) against mmsae's bare graphed
step and the trainer's own graphed step timed alone (`mmsae_graph`, `mmsae_trainer_step` there).

    python benchmarks/bench_train.py            # on a CUDA machine
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from bench_sae_step import Size, bench_impl
from timing import sync

import mmsae
from mmsae.staging import RowScreen, stage_budget
from mmsae.trainer.data import TokenBudget, as_source

SIZES = [Size(768, 16384, 32, 4096), Size(768, 16384, 32, 16384)]
STEP_IMPLS = ("mmsae_graph", "mmsae_trainer_step")
"""Steps timed alone (bench_sae_step): the bare graphed step and the trainer's graphed step."""


def train_rate(
    data: object, s: Size, steps: Sequence[int], cuda_graphs: bool | None, stage: bool | None, **options: Any
) -> float:
    """Steady-state tokens/s of mmsae.train on `data` (anything it trains on): the extra tokens of the longer
    of two runs over its extra time (after a short run that pays CUDA init and Triton JIT). `options` go to
    the SAE (e.g. aux_k=0).

    Both runs count a feature dead after the same tokens (the longer run's default window, unless `options`
    set `dead_tokens`), so that their steps do the same AuxK work: by default the window is a 64th of each
    run, the shorter run's features die sooner, and on real tokens its steps were slower than the longer
    run's (a negative difference)."""
    options.setdefault("dead_tokens", max(1, steps[-1] * s.B // 64))
    kwargs = dict(
        **options,
        sae="topk",
        n_features=s.n,
        k=s.k,
        batch_size=s.B,
        warmup_steps=10,
        devices=1,
        cuda_graphs=cuda_graphs,
        stage=stage,
    )
    mmsae.train(data, tokens=10 * s.B, **kwargs)
    seconds = []
    for n_steps in steps:
        sync()
        start = time.perf_counter()
        mmsae.train(data, tokens=n_steps * s.B, **kwargs)
        sync()
        seconds.append(time.perf_counter() - start)
    return (steps[1] - steps[0]) * s.B / (seconds[1] - seconds[0])


def staging_seconds(data: torch.Tensor) -> float:
    """The one-off cost of staging (`Source.stage`: copy to the GPU and NaN/Inf screen), inside each
    staged run's time."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    as_source(data).stage(torch.device("cuda", 0), float("inf"), RowScreen())
    torch.cuda.synchronize()
    return time.perf_counter() - start


def loader_rate(data: torch.Tensor, s: Size, tokens: int, stage: bool | None) -> float:
    """Tokens/s of the training loader alone (gather, screen, pin, copy to the GPU): the ceiling data sets."""
    source = as_source(data)
    if stage is not False:
        source = source.stage(
            torch.device("cuda", 0), stage_budget(torch.device("cuda", 0), stage), RowScreen()
        )
    torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in TokenBudget(source, s.B, tokens // s.B, seed=0):
        batch.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    return tokens / (time.perf_counter() - start)


def main() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--steps",
        type=int,
        nargs=2,
        default=[200, 1200],
        help="steps of the two runs whose difference is timed",
    )
    parser.add_argument(
        "--gpu-data-only", action="store_true", help="only the 'GPU memory' rows (the trainer/step ratios)"
    )
    parser.add_argument("--data-tokens", type=int, default=2_000_000, help="rows of the activation array")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_train needs a CUDA GPU.")
    rows = []
    steps_alone: dict[Size, dict[str, float]] = {}
    for s in SIZES:
        host = torch.randn(args.data_tokens, s.d, dtype=torch.float16)
        sources = {
            "host memory, staged": (host, None),
            "host memory, stage=False": (host, False),
            "GPU memory": (host.cuda(), None),
        }
        x = torch.randn(s.B, s.d, device="cuda", dtype=torch.bfloat16)
        try:
            peer = bench_impl("sparsify", s, x, 10)
        except ImportError as err:  # a missing peer must not hide mmsae's numbers
            print(f"sparsify unavailable ({err}): its column stays empty", flush=True)
            peer = {"mtok_s": float("nan")}
        steps_alone[s] = {name: bench_impl(name, s, x, 20)["mtok_s"] * 1e6 for name in STEP_IMPLS}
        for where, (data, stage) in sources.items():
            if args.gpu_data_only and where != "GPU memory":
                continue
            loader = loader_rate(data, s, args.steps[1] * s.B, stage)
            eager = train_rate(data, s, args.steps, cuda_graphs=False, stage=stage)
            graphs = train_rate(data, s, args.steps, cuda_graphs=True, stage=stage)
            staging = staging_seconds(data) if stage is None else 0.0
            rows.append((s, where, staging, loader, eager, graphs, peer["mtok_s"] * 1e6))
            print(rows[-1], flush=True)
        del sources
        torch.cuda.empty_cache()
    print(
        f"\n{torch.cuda.get_device_name()}  torch {torch.__version__}  bf16-mixed, TopK + AuxK, "
        f"steady state from runs of {args.steps[0]} and {args.steps[1]} steps\n"
    )
    print(
        "| d | n | k | batch | data in | staging s (in each run) | loader alone tok/s | eager tok/s | "
        "CUDA graphs tok/s | graphs / eager | sparsify step loop tok/s |"
    )
    print("|---|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    for s, where, staging, loader, eager, graphs, peer in rows:
        print(
            f"| {s.d} | {s.n} | {s.k} | {s.B} | {where} | {staging:.2f} | {loader:,.0f} | {eager:,.0f} | "
            f"{graphs:,.0f} | {graphs / eager:.2f} | {peer:,.0f} |"
        )
    print(
        "\n| batch | trainer tok/s (graphs, GPU data) | bare graphed step tok/s | "
        "trainer's step alone tok/s | trainer / bare step | trainer / its step |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for s, where, _, _, _, graphs, _ in rows:
        if where == "GPU memory":
            bare, own = (steps_alone[s][name] for name in STEP_IMPLS)
            ratios = f"{graphs / bare:.2f} | {graphs / own:.2f}"
            print(f"| {s.B} | {graphs:,.0f} | {bare:,.0f} | {own:,.0f} | {ratios} |")


if __name__ == "__main__":
    main()
