"""Multi-GPU extraction throughput: images/s of `mmsae.extract` with 1 process vs N processes (one per GPU).

Each world size extracts the same data set into a fresh store with `extract(..., rank, world_size)` in
spawned processes (what `mmsae extract --devices N` runs). Timing starts when every process has built its
model (a barrier) and ends when the last one returns the finished store, so it covers the layout probe,
the disjoint shards and the merge of the shard records, but not process start-up or model loading (also
reported). The stores of all world sizes are compared byte for byte. For scale, the bare forward of one
GPU on device-resident pixels is measured first, in the parent process.

ViT-L/16 by default: its forward (~3k images/s on an H100) is slower than the loader workers of one
process, so the GPUs, not the host, set the rate. With all tokens a ViT-L/16 store takes 0.4 MB per
image, more than a disk writes at that rate: put it in RAM (`--out /dev/shm`) to see the GPUs.

    python benchmarks/bench_extract_multi.py --devices 2 --tokens cls
    python benchmarks/bench_extract_multi.py --devices 2 --tokens all --out /dev/shm
    python benchmarks/bench_extract_multi.py --device cpu --devices 2     # CPU processes, tiny preset
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as mp
from PIL import Image

from mmsae.datasets.images import Example, ExampleDataset
from mmsae.encoders import get_encoder
from mmsae.extract import extract, rank_device, resolve_ranks


@dataclass(frozen=True)
class Setup:
    encoder: str
    n_images: int
    batch_size: int
    model_dtype: torch.dtype


SETUPS = {
    "cuda": Setup("timm:vit_large_patch16_224", 16384, 256, torch.bfloat16),
    "cpu": Setup("timm:test_vit", 192, 16, torch.float32),
}


@dataclass(frozen=True)
class Job:
    setup: Setup
    device: str
    world_size: int
    num_workers: int
    out_dir: str
    tokens: str


class NoiseImages(ExampleDataset):
    """Deterministic random RGB images at a typical input size (decoding is not what is measured here)."""

    def __init__(self, n: int, size: int = 224):
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Example:
        pixels = np.random.default_rng(index).integers(0, 255, (self.size, self.size, 3), np.uint8)
        return Example(index, image=Image.fromarray(pixels))

    def fingerprint(self) -> str:
        return hashlib.sha256(f"noise{self.n}x{self.size}".encode()).hexdigest()


def _rank(rank: int, job: Job, barrier: Any, results: Any) -> None:
    """One process: build the model on its device, wait for the others, extract its shards."""
    started = time.monotonic()
    if job.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // job.world_size))
    device = rank_device(job.device, resolve_ranks(rank, job.world_size))
    encoder = get_encoder(job.setup.encoder, pretrained=False, device=device, dtype=job.setup.model_dtype)
    barrier.wait()
    t0 = time.monotonic()
    store = extract(
        encoder,
        NoiseImages(job.setup.n_images),
        encoder.default_hook,
        job.out_dir,
        tokens=job.tokens,
        batch_size=job.setup.batch_size,
        num_workers=job.num_workers,
        progress=False,
        rank=rank,
        world_size=job.world_size,
    )
    results.put((rank, started, t0, time.monotonic(), str(store.path)))


def run(job: Job) -> tuple[float, float, str]:
    """(images/s from the barrier to the last finished process, start-up seconds, store path)."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(job.world_size), ctx.SimpleQueue()
    launched = time.monotonic()
    mp.start_processes(_rank, args=(job, barrier, results), nprocs=job.world_size, start_method="spawn")
    rows = [results.get() for _ in range(job.world_size)]
    t0, t1 = min(r[2] for r in rows), max(r[3] for r in rows)
    return job.setup.n_images / (t1 - t0), t0 - launched, rows[0][4]


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            digest.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return digest.hexdigest()


def bare_rate(setup: Setup, device: str) -> float:
    """images/s of one device's bare forward on device-resident pixels (batches of `setup.batch_size`)."""
    encoder = get_encoder(setup.encoder, pretrained=False, device=device, dtype=setup.model_dtype)
    pixels = torch.randn(setup.batch_size, 3, *encoder.image_size, device=device, dtype=setup.model_dtype)
    n_batches = max(2, setup.n_images // setup.batch_size // 4)
    with torch.inference_mode():
        encoder.run_model(pixels)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.monotonic()
        for _ in range(n_batches):
            encoder.run_model(pixels)
        if device == "cuda":
            torch.cuda.synchronize()
    rate = n_batches * setup.batch_size / (time.monotonic() - start)
    del encoder, pixels
    if device == "cuda":
        torch.cuda.empty_cache()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--devices", type=int, default=2, help="processes of the multi-process run")
    parser.add_argument("--encoder", help="get_encoder spec (default: per device)")
    parser.add_argument("--n-images", type=int)
    parser.add_argument("--tokens", nargs="+", default=["cls"], help="token modes, a table block each")
    parser.add_argument("--out", default=None, help="parent of the temporary store directories")
    args = parser.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < args.devices:
        parser.error(f"--devices {args.devices} needs that many GPUs; {torch.cuda.device_count()} visible.")
    base = SETUPS[args.device]
    setup = Setup(
        args.encoder or base.encoder, args.n_images or base.n_images, base.batch_size, base.model_dtype
    )
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"{os.cpu_count()} CPU cores"
    bare = bare_rate(setup, args.device)
    print(
        f"{setup.encoder} (random init, {setup.model_dtype}), {setup.n_images} noise images of 224², batch "
        f"{setup.batch_size}, default hook, fp16 store in {args.out or tempfile.gettempdir()}; device: "
        f"{name}; bare forward on one device {bare:,.0f} images/s"
    )
    print(
        f"{'tokens':>6} {'processes':>9} {'images/s':>10} {'speedup':>8} {'/ bare fwd':>10} "
        f"{'start-up s':>11} {'loader workers':>15}"
    )
    identical = True
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        for tokens in args.tokens:
            rates, digests = {}, {}
            for world_size in sorted({1, args.devices}):
                # Decoding runs in loader workers: split the host's cores between the processes.
                cores = (os.cpu_count() or 1) // world_size
                workers = min(12, max(0, cores - 2)) if args.device == "cuda" else 0
                out = Path(tmp) / f"{tokens}-world{world_size}"
                rate, startup, path = run(Job(setup, args.device, world_size, workers, str(out), tokens))
                rates[world_size], digests[world_size] = rate, tree_digest(Path(path))
                shutil.rmtree(out)
                print(
                    f"{tokens:>6} {world_size:9d} {rate:10,.0f} {rate / rates[1]:8.2f} {rate / bare:10.2f} "
                    f"{startup:11.1f} {workers:15d}",
                    flush=True,
                )
            identical &= len(set(digests.values())) == 1
    print(f"stores byte-identical across process counts: {identical}")


if __name__ == "__main__":
    main()
