"""How fast a shuffled store read runs on the host, by the size of the pieces it reads.

A store is written once (random-noise images through `timm:test_vit`, random init: only the bytes matter),
then `ActivationStore.batches(shuffle=True, dtype=None)` is timed over three passes for each `--pieces`
size (a size of at least a shard reads whole shards, the former read).

    python benchmarks/bench_store_read.py --images 3000 --shard-tokens 32768 --pieces 1000000000 16384 1024
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmsae.datasets.images import ImageFolder
from mmsae.encoders import get_encoder
from mmsae.extract import extract
from mmsae.store import ActivationStore


def write_store(root: Path, n_images: int, shard_tokens: int) -> ActivationStore:
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n_images):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")).save(images / f"{i:06d}.png")
    torch.manual_seed(0)
    encoder = get_encoder("timm:test_vit")
    return extract(
        encoder, ImageFolder(images), ["norm"], root / "store", shard_tokens=shard_tokens, progress=False
    )


def read_rate(store: ActivationStore, batch_size: int, piece_tokens: int, seed: int) -> float:
    """Tokens/s of three shuffled passes."""
    start, n = time.perf_counter(), 0
    for batch in store.batches(
        batch_size, hook="norm", seed=seed, dtype=None, piece_tokens=piece_tokens, epochs=3
    ):
        n += len(batch)
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--shard-tokens", type=int, default=32768)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--pieces", type=int, nargs="+", default=[10**9, 16384, 1024])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        store = write_store(Path(tmp), args.images, args.shard_tokens)
        read_rate(store, args.batch_size, 10**9, seed=99)  # checksums verified, files in the page cache
        size = f"{store.n_tokens:,} tokens × {store.dim('norm') * 2} bytes in {store.n_shards} shards"
        print(f"{size}, batch {args.batch_size}\n")
        print("| pieces of | M tokens/s, best of " + str(args.repeats) + " |")
        print("|---:|---:|")
        for piece in args.pieces:
            rate = max(read_rate(store, args.batch_size, piece, seed) for seed in range(args.repeats))
            label = "whole shards" if piece >= args.shard_tokens else f"{piece:,} tokens"
            print(f"| {label} | {rate / 1e6:.2f} |", flush=True)


if __name__ == "__main__":
    main()
