"""Training speed on a store's real tokens against random tokens of the same shape: where slow training from
a store comes from (the store, the process's history, or the tokens themselves).

Rows (steady-state tokens/s of `mmsae.train`, TopK, the difference of two runs of `--steps` steps, after a
short warm-up run): random fp16 tokens before any extraction; the same after extracting a store with
`mmsae.extract` in this process; the store's tokens in memory; the store itself; random tokens with the
store's per-dimension mean and standard deviation; and the store's batches alone, as the trainer gets them
with no step (the most it could feed). `--profile` then prints the top GPU kernels of a short
eager run on the store's tokens in memory, on the store itself and on random tokens.

    python benchmarks/bench_store_train.py --device cuda --profile   # ViT-B/16 at random init, 2048 images
    python benchmarks/bench_store_train.py --device cuda --encoder timm:vit_small_patch14_dinov2 --pretrained
    python benchmarks/bench_store_train.py --device cpu              # timm test_vit, 32 images: a smoke run

A random-init ViT's tokens leave most features dead, so AuxK's cost and with it the rate follow the data
order, which differs between a store and an array: `--no-auxk` trains every row without AuxK (aux_k=0), so
that the rows differ only in how the tokens reach the trainer. `--pretrained` takes the encoder's real weights
(e.g. the offline zoo's DINOv2-S after `mmsae zoo install`).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import tempfile
import time
from pathlib import Path

import torch
from bench_extract import write_jpegs
from bench_sae_step import Size
from bench_stats import kernel_ms
from bench_train import train_rate
from timing import sync

import mmsae
from mmsae.encoders import get_encoder
from mmsae.staging import RowScreen, stage_budget
from mmsae.trainer.sources import as_source


def profile_table(data: object, args: argparse.Namespace) -> str:
    """The top GPU kernels of a short eager run (60 steps), after the run's wall time and its GPU kernels'
    total: a wall time well above the kernels' says the run waits on the host (e.g. reading a store)."""
    from torch.profiler import ProfilerActivity, profile

    kwargs = dict(
        sae="topk", n_features=args.n_features, k=args.k, batch_size=args.batch_size, warmup_steps=10
    )
    mmsae.train(data, tokens=20 * args.batch_size, cuda_graphs=False, **kwargs)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        mmsae.train(data, tokens=60 * args.batch_size, cuda_graphs=False, **kwargs)
    wall_ms = 1e3 * (time.perf_counter() - start)
    events = prof.key_averages()
    kernels_ms = kernel_ms(events)
    table = events.table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60)
    return f"wall {wall_ms:.0f} ms (profiled), GPU kernels {kernels_ms:.0f} ms\n{table}"


def loader_rate(store: object, args: argparse.Namespace) -> float:
    """Tokens/s of the store's training batches alone, as the trainer gets them (staged on the GPU when it
    fits: whole, as an array), no step: the most the store could feed. The difference of two run lengths,
    after a first pass."""
    device = torch.device(args.device)
    source = as_source(store)
    source = (
        source.stage(device, stage_budget(device, None), RowScreen()) if device.type == "cuda" else source
    )

    def seconds(n_batches: int) -> float:
        batches = source.global_batches(args.batch_size, seed=0, n_tokens=n_batches * args.batch_size)
        sync()
        start = time.perf_counter()
        for _ in itertools.islice(batches, n_batches):
            pass
        sync()
        return time.perf_counter() - start

    short, long = args.steps
    seconds(short)
    return (long - short) * args.batch_size / (seconds(long) - seconds(short))


def main() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--n-images", type=int, default=None, help="default: 2048 (32 on CPU)")
    ap.add_argument("--steps", type=int, nargs=2, default=None, help="default: 200 1200 (5 15 on CPU)")
    ap.add_argument("--profile", action="store_true", help="GPU kernels of the store's tokens vs random ones")
    ap.add_argument("--out", type=Path, default=None, help="where the temp folder goes")
    ap.add_argument("--encoder", default=None, help="a timm spec (default: ViT-B/16; timm:test_vit on CPU)")
    ap.add_argument("--pretrained", action="store_true", help="real weights (default: random init)")
    ap.add_argument("--no-auxk", action="store_true", help="train without AuxK (aux_k=0) in every row")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    spec = args.encoder or ("timm:vit_base_patch16_224" if cuda else "timm:test_vit")
    args.n_images = args.n_images or (2048 if cuda else 32)
    args.steps = args.steps or ([200, 1200] if cuda else [5, 15])
    args.n_features, args.k, args.batch_size = (16384, 32, 4096) if cuda else (256, 32, 256)
    dtype = torch.bfloat16 if cuda else None
    encoder = get_encoder(spec, pretrained=args.pretrained, device=args.device, dtype=dtype)
    d = encoder.model.num_features  # timm's width of every block's output
    size = Size(d, args.n_features, args.k, args.batch_size)
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        dataset = write_jpegs(Path(tmp) / "jpegs", args.n_images)

        def row(label: str, data: object) -> None:
            options = {"aux_k": 0} if args.no_auxk else {}
            rate = train_rate(data, size, args.steps, cuda_graphs=None, stage=None, **options)
            print(f"| {label} | {rate / 1e6:.2f} |", flush=True)

        weights = "pretrained" if args.pretrained else "at random init"
        sae = f"TopK n={args.n_features}, k={args.k}" + (", no AuxK" if args.no_auxk else "")
        head = f"{spec} {weights}, {args.n_images} images, tokens=all; {sae}"
        print(f"{head}, batch {args.batch_size}; steady-state M tokens/s\n\n| data | M tok/s |\n|---|---:|")
        before = torch.randn(args.n_images * 197 if cuda else 4096, d, dtype=torch.float16)
        row("random, before any extraction", before)
        store = mmsae.extract(
            encoder, dataset, None, Path(tmp) / "store", tokens="all", batch_size=256 if cuda else 16,
            num_workers=12 if cuda else 0, decode="device" if cuda else "pil", progress=False,
        )  # fmt: skip
        real = torch.cat(list(store.batches(1 << 16, shuffle=False, dtype=None)))
        row("random, after the extraction", torch.randn_like(real, dtype=torch.float32).half())
        row("the store's tokens, in memory", real)
        row("the store", store)
        print(
            f"| the store's batches alone, no training | {loader_rate(store, args) / 1e6:.2f} |", flush=True
        )
        mean, std = real.float().mean(0), real.float().std(0)
        row(
            "random with the store's per-dimension mean and std",
            (mean + std * torch.randn_like(real.float())).half(),
        )
        if args.profile and cuda:
            for label, data in (
                ("the store's tokens", real),
                ("the store", store),
                ("random tokens", torch.randn_like(real.float()).half()),
            ):
                print(f"\nGPU kernels, 60 eager steps on {label}:\n{profile_table(data, args)}", flush=True)


if __name__ == "__main__":
    main()
