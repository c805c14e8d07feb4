"""Tokens/s of the whole trainer (`mmsae.train`: Lightning loop, data, step) with and without CUDA graphs.

Each row trains a TopK SAE (AuxK on, as users run it) on random fp16 activations held in host memory, either
staged (the default: copied to the GPU once and gathered there) or not (`stage=False`: the loader gathers,
pins and copies each batch), or already on the GPU (the trainer alone), next to the loader's own rate with no
training. The peer column is sparsify's SparseCoder step in a bare loop (no trainer, no data), at the same
size, from bench_sae_step.

    python benchmarks/bench_train.py            # on a CUDA machine
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from bench_sae_step import Size, bench_impl

import mmsae
from mmsae.staging import RowScreen, stage_budget
from mmsae.trainer.data import TokenBudget, as_source

SIZES = [Size(768, 16384, 32, 4096), Size(768, 16384, 32, 16384)]


def train_rate(data: torch.Tensor, s: Size, tokens: int, cuda_graphs: bool, stage: bool | None) -> float:
    """Tokens/s of mmsae.train after a short run that pays CUDA init, Triton JIT and the capture."""
    kwargs = dict(
        sae="topk",
        n_latents=s.n,
        k=s.k,
        batch_size=s.B,
        warmup_steps=10,
        devices=1,
        cuda_graphs=cuda_graphs,
        stage=stage,
    )
    mmsae.train(data, tokens=10 * s.B, **kwargs)
    torch.cuda.synchronize()
    start = time.perf_counter()
    mmsae.train(data, tokens=tokens, **kwargs)
    torch.cuda.synchronize()
    return tokens / (time.perf_counter() - start)


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
    parser.add_argument("--tokens", type=int, default=3_000_000, help="timed tokens per run")
    parser.add_argument("--data-tokens", type=int, default=2_000_000, help="rows of the activation array")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_train needs a CUDA GPU.")
    rows = []
    for s in SIZES:
        host = torch.randn(args.data_tokens, s.d, dtype=torch.float16)
        sources = {
            "host memory, staged": (host, None),
            "host memory, stage=False": (host, False),
            "GPU memory": (host.cuda(), None),
        }
        peer = bench_impl("sparsify", s, torch.randn(s.B, s.d, device="cuda", dtype=torch.bfloat16), 10)
        for where, (data, stage) in sources.items():
            loader = loader_rate(data, s, args.tokens, stage)
            eager = train_rate(data, s, args.tokens, cuda_graphs=False, stage=stage)
            graphs = train_rate(data, s, args.tokens, cuda_graphs=True, stage=stage)
            staging = staging_seconds(data) if stage is None else 0.0
            rows.append((s, where, staging, loader, eager, graphs, peer["mtok_s"] * 1e6))
            print(rows[-1], flush=True)
        del sources
        torch.cuda.empty_cache()
    print(
        f"\n{torch.cuda.get_device_name()}  torch {torch.__version__}  bf16-mixed, TopK + AuxK, "
        f"{args.tokens:,} timed tokens per run\n"
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


if __name__ == "__main__":
    main()
