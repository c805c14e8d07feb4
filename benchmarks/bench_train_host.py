"""Where the trainer's host time goes: what `bench_train.py` times, taken apart.

One `mmsae.train` run per batch size (TopK with AuxK, random fp16 activations already on the device, after a
short run that pays CUDA init and Triton JIT), counting what makes the GPU wait for the host or the host for
the GPU: graph captures, eager steps and replays (`GraphedStep`), host reads of device values (CUDA's sync
debug mode, split into those inside `training_step` and the rest of the run), and the host's time per loop
iteration inside `training_step` and outside it (Lightning's loop: fetch, hooks, progress bar). A host that
waits inside `training_step` for as long as the GPU takes per iteration is being held by a sync; one that
runs ahead shows short, even times there.

    python benchmarks/bench_train_host.py                 # on a CUDA machine: d=768, n=16384, k=32
    python benchmarks/bench_train_host.py --device cpu --d 16 --n 64 --k 4 --batches 64 --steps 40
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from timing import sync

import mmsae
from mmsae.trainer import SAEModule


@contextmanager
def watched(counts: dict[str, Any]) -> Iterator[None]:
    """Count syncs and time each `training_step` call, and the gaps between calls, while the block runs."""
    real_step, real_setup = SAEModule.training_step, SAEModule._setup_graphs
    inside, outside, last = counts["inside_ms"], counts["outside_ms"], [None]

    def training_step(self: SAEModule, batch: Any, batch_idx: int) -> None:
        start = time.perf_counter()
        if last[0] is not None:
            outside.append((start - last[0]) * 1e3)
        before = len(caught)
        real_step(self, batch, batch_idx)
        counts["syncs_inside"] += len(caught) - before
        last[0] = time.perf_counter()
        inside.append((last[0] - start) * 1e3)

    def setup_graphs(self: SAEModule) -> None:
        real_setup(self)
        counts["module"] = self

    SAEModule.training_step, SAEModule._setup_graphs = training_step, setup_graphs
    cuda = torch.cuda.is_available()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            yield
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode(0)
        SAEModule.training_step, SAEModule._setup_graphs = real_step, real_setup
        counts["syncs_all"] = sum("synchroniz" in str(w.message) for w in caught)


def diagnose(data: torch.Tensor, n: int, k: int, batch: int, steps: int) -> dict[str, Any]:
    """One run of `steps` steps, watched; the counts and timings of `watched`."""
    kwargs = dict(sae="topk", n_features=n, k=k, batch_size=batch, warmup_steps=10, devices=1)
    mmsae.train(data, tokens=10 * batch, **kwargs)
    counts: dict[str, Any] = {"inside_ms": [], "outside_ms": [], "syncs_inside": 0}
    sync()
    start = time.perf_counter()
    with watched(counts):
        mmsae.train(data, tokens=steps * batch, **kwargs)
        sync()
    counts["wall_s"] = time.perf_counter() - start
    graphed = counts.pop("module")._graphed
    counts["captures"] = len(graphed.graphs) if graphed else 0
    counts["eager"] = sum(graphed.eager_runs.values()) if graphed else steps
    counts["replays"] = graphed.replays if graphed else 0
    return counts


def quantiles(values: list[float]) -> str:
    if len(values) < 2:
        return "-"
    deciles = statistics.quantiles(values, n=10)
    return f"{statistics.median(values):.3f} / {deciles[8]:.3f} / {max(values):.1f}"


def main(argv: list[str] | None = None) -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batches", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--data-tokens", type=int, default=2_000_000)
    args = p.parse_args(argv)
    data = torch.randn(args.data_tokens, args.d, dtype=torch.float16, device=args.device)
    if args.device == "cpu":
        data = data.float()  # CPU autocast is off: fp32 steps
    print(
        "| batch | steps | wall s | loop iterations | graph captures | eager steps | replays | syncs in "
        "training_step | syncs, whole run | host ms in training_step per iteration, median / p90 / max | "
        "host ms between iterations, median / p90 / max |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for batch in args.batches:
        c = diagnose(data, args.n, args.k, batch, args.steps)
        print(
            f"| {batch} | {args.steps} | {c['wall_s']:.3f} | {len(c['inside_ms'])} | {c['captures']} | "
            f"{c['eager']} | {c['replays']} | {c['syncs_inside']} | {c['syncs_all']} | "
            f"{quantiles(c['inside_ms'])} | {quantiles(c['outside_ms'])} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
