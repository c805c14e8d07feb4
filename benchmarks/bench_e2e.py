"""The user's path end to end, stage by stage: image folder → extract → train → feature stats → index.

Input: `--n-images` real JPEG files written once to a temp folder (random crops of the scikit-image photos
scaled to a 375 px shorter side (`--short-side`), quality 90: ~500 × 375, ImageNet-like sizes;
`bench_extract.write_jpegs`).
Stages, each timed with its throughput:
  inputs      the extraction input path alone (`mmsae.inputs.input_batches`: decode + transform in loader
              workers, uint8 hand-off, pixels on the device), per `--decode` mode;
  forward     the bare forward of the encoder (`--dtype`, bf16 on CUDA) on device-resident pixels: the
              yardstick; extraction / forward is the share of it that extraction reaches;
  extract     `mmsae.extract` from the files, per `--tokens` mode (cls, all);
  train       `mmsae.train` (TopK) on the store of the first token mode;
  stats       `mmsae.analysis.feature_stats` over that store (`store.token_acts`);
  index       `ConceptIndex.build` over the folder (encoder forward, SAE codes, CLIP embeddings, names),
              with extraction's batch size, loader workers and first decode mode.
Then the whole. `--profile` first splits one image's input cost: read, decode (full and draft), resize +
crop, to uint8 tensor, in the main process.

    python benchmarks/bench_e2e.py --device cuda                       # CLIP ViT-B/32, 8192 images, bf16
    python benchmarks/bench_e2e.py --device cuda --encoder timm:vit_base_patch16_224 --embedder clip:ViT-B-32
    python benchmarks/bench_e2e.py --small                             # CPU smoke run: tiny models
    python benchmarks/bench_e2e.py --small --encoder timm:test_vit --short-side 1500 --inputs-only
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timing import sync

sys.path.insert(0, str(Path(__file__).parent))
from bench_extract import JPEG_QUALITY, write_jpegs  # a sibling script

from mmsae.datasets.images import ExampleDataset, ImageFolder, open_image
from mmsae.datasets.pixels import draft_size_of, split_pipeline
from mmsae.encoders import Encoder, get_encoder
from mmsae.inputs import input_batches, probe_image

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def line(stage: str, seconds: float, amount: float, unit: str, extra: str = "") -> None:
    print(f"{stage:<26} {seconds:9.2f} s {amount / seconds:14,.1f} {unit}/s  {extra}", flush=True)


def profile_inputs(encoder: Encoder, dataset: ImageFolder, n: int) -> None:
    """Median ms per image of each step of the PIL input path, in this process (one core)."""
    handoff = split_pipeline(encoder.image_pipeline, probe_image())
    if handoff is None:
        print("profile: the encoder's pipeline has no uint8 hand-off; skipped")
        return
    steps, draft = handoff.host.steps, draft_size_of(encoder.image_pipeline)
    cost: dict[str, list[float]] = {}

    def step(name: str, fn: Callable[[], object]) -> object:
        start = time.perf_counter()
        out = fn()
        cost.setdefault(name, []).append(time.perf_counter() - start)
        return out

    for p in dataset.paths[:n]:
        step("read", p.read_bytes)
        image = step("decode", lambda p=p: open_image(p))
        small = step("resize+crop", lambda image=image: steps(image))
        pixels = step("to uint8", lambda small=small: torch.from_numpy(np.array(small)).permute(2, 0, 1))
        step("finish (float, normalise)", lambda pixels=pixels: handoff.finish(pixels[None]))
        if draft is not None:
            drafted = step("decode draft", lambda p=p: open_image(p, draft_size=draft))
            step("resize+crop after draft", lambda drafted=drafted: steps(drafted))
    w, h = Image.open(dataset.paths[0]).size
    print(f"profile, median ms per image ({n} files, first {w}×{h}; draft decodes to ≥ {draft} px):")
    print("  " + ", ".join(f"{k} {statistics.median(v) * 1e3:.2f}" for k, v in cost.items()))


def forward_rate(encoder: Encoder, batch: int, n_batches: int) -> float:
    shape = encoder.transform(Image.new("RGB", (224, 224))).shape
    dtype = next(encoder.model.parameters()).dtype
    pixels = torch.randn(batch, *shape, device=encoder.device, dtype=dtype)

    def bare() -> None:
        with torch.inference_mode():
            for _ in range(n_batches):
                encoder.run_model(pixels)

    bare()  # warm-up
    seconds, _ = timed(bare, encoder.device)
    line("forward (bare)", seconds, batch * n_batches, "img", f"batch {batch}, {dtype}")
    return batch * n_batches / seconds


def input_rate(encoder: Encoder, dataset: ExampleDataset, args: argparse.Namespace, decode: str) -> float:
    idx = [
        list(range(i, min(i + args.batch_size, len(dataset))))
        for i in range(0, len(dataset), args.batch_size)
    ]

    def load() -> None:
        for _ in input_batches(encoder, dataset, idx, "image", args.num_workers, decode):
            pass

    seconds, _ = timed(load, encoder.device)
    line(f"inputs ({decode})", seconds, len(dataset), "img", f"{args.num_workers} workers")
    return len(dataset) / seconds


def extract_stages(encoder: Encoder, dataset: ImageFolder, args: argparse.Namespace, out: Path, bare: float):
    """`mmsae.extract` per token mode: (total seconds, the stores by mode)."""
    import mmsae

    total, stores = 0.0, {}
    for tokens in args.tokens:
        seconds, store = timed(
            lambda tokens=tokens: mmsae.extract(
                encoder,
                dataset,
                encoder.default_hook,
                out,
                tokens=tokens,
                batch_size=args.batch_size,
                num_workers=args.num_workers,
                progress=False,
                decode=args.decode[0],
            ),
            encoder.device,
        )
        total, stores[tokens] = total + seconds, store
        extra = f"{store.n_tokens:,} tokens; extraction/forward {len(dataset) / seconds / bare:.2f}"
        line(f"extract (tokens={tokens})", seconds, len(dataset), "img", extra)
    return total, stores


def downstream_stages(encoder: Encoder, store: Any, folder: Path, args: argparse.Namespace) -> float:
    """train → feature stats → index build on `store`; their total seconds."""
    import mmsae
    from mmsae.analysis import feature_stats
    from mmsae.index import ConceptIndex, IndexConfig

    device, dtype = encoder.device, DTYPES[args.dtype]
    train_tokens = args.train_tokens or max(store.n_tokens, 8 * args.train_batch)
    seconds, sae = timed(
        lambda: mmsae.train(
            store,
            sae="topk",
            n_features=args.n_features,
            k=args.k,
            tokens=train_tokens,
            batch_size=args.train_batch,
            warmup_steps=10,
        ),
        device,
    )
    total = seconds
    line("train", seconds, train_tokens, "tok", f"n={args.n_features} k={args.k} batch {args.train_batch}")
    sae = sae.to(device, dtype).eval()
    hook = encoder.default_hook
    seconds, _ = timed(lambda: feature_stats(sae, store.token_acts(hook, batch_size=16384)), device)
    total += seconds
    line("feature stats", seconds, store.n_tokens, "tok", f"{store.n_tokens:,} tokens")
    embedder = (
        encoder
        if args.embedder is None
        else get_encoder(args.embedder, pretrained=False, device=device, dtype=dtype)
    )
    cfg = IndexConfig(batch_size=args.batch_size, num_workers=args.num_workers, decode=args.decode[0])
    seconds, index = timed(lambda: ConceptIndex.build(encoder, sae, folder, embedder, cfg), device)
    total += seconds
    line("index build", seconds, len(index), "img", f"decode={cfg.decode}, {cfg.num_workers} workers")
    return total


def run(args: argparse.Namespace) -> None:
    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)  # keep the stage table readable
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {name} ({os.cpu_count()} CPU cores, torch {torch.__version__})", flush=True)
    with tempfile.TemporaryDirectory(dir=args.out) as tmp_dir:
        tmp = Path(tmp_dir)
        seconds, dataset = timed(
            lambda: write_jpegs(tmp / "jpegs", args.n_images, args.short_side), torch.device("cpu")
        )
        kib = sum(p.stat().st_size for p in dataset.paths) / len(dataset) / 1024
        print(
            f"{len(dataset)} JPEG files (shorter side {args.short_side} px, quality {JPEG_QUALITY}, mean "
            f"{kib:.0f} KiB) written in {seconds:.1f} s; encoder {args.encoder} ({args.dtype}), batch "
            f"{args.batch_size}, {args.num_workers} loader workers",
            flush=True,
        )
        encoder = get_encoder(args.encoder, pretrained=False, device=device, dtype=dtype)
        if args.profile:
            profile_inputs(encoder, dataset, min(64, len(dataset)))
        print(f"{'stage':<26} {'time':>11} {'throughput':>19}", flush=True)
        bare = forward_rate(encoder, args.batch_size, args.forward_batches)
        for decode in args.decode:
            input_rate(encoder, dataset, args, decode)
        if args.inputs_only:
            return
        total, stores = extract_stages(encoder, dataset, args, tmp / "stores", bare)
        total += downstream_stages(encoder, stores[args.tokens[0]], tmp / "jpegs", args)
        print(f"{'whole (extract→index)':<26} {total:9.2f} s", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--encoder", default=None, help="default: clip:ViT-B-32 (clip:tiny with --small)")
    p.add_argument("--embedder", default=None, help="CLIP encoder for the index (default: the encoder)")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--n-images", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=min(16, os.cpu_count() or 1))
    p.add_argument("--decode", nargs="+", default=["pil", "draft", "device"], help="first: used by extract")
    p.add_argument("--tokens", nargs="+", default=["cls", "all"], help="first: trained on")
    p.add_argument("--n-features", type=int, default=32768)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--train-batch", type=int, default=4096)
    p.add_argument("--train-tokens", type=int, default=None, help="default: the store's tokens (≥ 8 batches)")
    p.add_argument("--forward-batches", type=int, default=20)
    p.add_argument("--short-side", type=int, default=375, help="of the JPEG files (375: ~500 × 375)")
    p.add_argument("--inputs-only", action="store_true", help="stop after the input path and the forward")
    p.add_argument("--profile", action="store_true", help="split one image's input cost first")
    p.add_argument("--out", default=None, help="where the temp folder goes")
    p.add_argument("--small", action="store_true", help="CPU smoke run: tiny CLIP, 64 images, 2 workers")
    args = p.parse_args(argv)
    if args.small:
        args.device, args.encoder = "cpu", args.encoder or "clip:tiny"
        args.dtype, args.n_images = "fp32", 64 if args.n_images == 8192 else args.n_images
        args.batch_size, args.num_workers, args.decode = 16, 2, ["pil", "draft"]
        args.n_features, args.k, args.train_batch, args.forward_batches = 256, 8, 64, 2
        args.profile = True
    args.encoder = args.encoder or "clip:ViT-B-32"
    run(args)


if __name__ == "__main__":
    main()
