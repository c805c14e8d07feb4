"""What a store's shuffle buffer costs against a full reshuffle, on real tokens in extraction order.

A store holds tokens in the order they were extracted: image after image, in the folder's order. Read through
a shuffle buffer (`mmsae.store.shuffle_batches`) in whole shards, in a seeded random order, a pass's first
batches come from the shards read first. `ActivationStore.batches` now reads pieces of
`DEFAULT_PIECE_TOKENS` consecutive tokens in a random order over all shards, and the trainer loads a store
that fits on the GPU whole and reshuffles every token each pass (`StoreSource.stage`), as an array in memory.
This script trains the same TopK SAE on the same tokens in each of these orders and scores each on held-out
photos.

Tokens: DINOv2-S/14 patch tokens of augmented crops of the zoo's photos, from `bench_recipe_gpu.py`'s cache
(its `--cache`, same `--budgets`, `--eval-tokens` and `--calib-tokens`; it extracts them if the cache lacks
them), put back in folder order: each crop's photo is recomputed from its seed, as `Crops` draws it.

    python benchmarks/bench_store_order.py --cache dino_cpu --budgets 196608 --eval-tokens 65536 \\
        --calib-tokens 16384
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

import mmsae
from mmsae import metrics
from mmsae.store import shuffle_batches
from mmsae.store.format import DEFAULT_PIECE_TOKENS

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its siblings; `-P` leaves the script's folder out
import dino_tokens
from bench_recipe import zoo_photos


def folder_order(train_ND: Tensor, tokens_per_crop: int, seed: int = 0) -> Tensor:
    """`train_ND` with its crops grouped by photo, in the photos' folder order (a stable sort)."""
    n_photos = len(dino_tokens.split_photos(zoo_photos())[0])  # the photos `dino_tokens.tokens` trains on
    n_crops = len(train_ND) // tokens_per_crop
    photo_of = [dino_tokens.crop_photo(seed, i, n_photos) for i in range(n_crops)]
    order = np.argsort(np.array(photo_of), kind="stable")
    crops = train_ND[: n_crops * tokens_per_crop].view(n_crops, tokens_per_crop, -1)
    return crops[torch.from_numpy(order)].flatten(0, 1)


class StoreStream:
    """One pass over `rows_ND` as a store reads it: `n_shards` contiguous shards (or pieces of `chunk_rows`
    consecutive tokens) in a seeded random order through a shuffle buffer of `buffer_tokens`."""

    def __init__(
        self,
        rows_ND: Tensor,
        n_shards: int,
        buffer_tokens: int,
        batch_size: int,
        seed: int,
        chunk_rows: int = 0,
    ):
        self.shards = rows_ND.split(chunk_rows) if chunk_rows else rows_ND.tensor_split(n_shards)
        self.buffer_tokens, self.batch_size, self.seed = buffer_tokens, batch_size, seed

    def __iter__(self) -> Iterator[Tensor]:
        order = np.random.default_rng(self.seed).permutation(len(self.shards))
        chunks = ({"acts": self.shards[i]} for i in order)
        generator = torch.Generator().manual_seed(self.seed)
        for batch in shuffle_batches(chunks, self.batch_size, self.buffer_tokens, generator, drop_last=True):
            yield batch["acts"]


def run(name: str, data: object, eval_ND: Tensor, args: argparse.Namespace, seed: int) -> dict[str, object]:
    start = time.perf_counter()
    sae = mmsae.train(
        data, sae="topk", n_features=args.n_features, k=args.k, tokens=args.tokens,
        batch_size=args.batch_size, seed=seed,
    )  # fmt: skip
    result = metrics.evaluate(sae, eval_ND.float().split(8192))
    return {
        "name": name,
        "seed": seed,
        "fvu": result["fvu"],
        "dead": 100 * result["dead_fraction"],
        "s": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    dino_tokens.add_arguments(ap)
    ap.add_argument("--n-features", type=int, default=1024)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--shards", type=int, default=2, help="the store's shards")
    ap.add_argument("--buffer-fraction", type=float, default=0.5, help="shuffle buffer, share of the store")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument(
        "--piece-tokens", type=int, nargs="*", default=[DEFAULT_PIECE_TOKENS], help="arms reading such pieces"
    )
    args = ap.parse_args(argv)
    train_ND, eval_ND = dino_tokens.cached_tokens(args)
    store_ND = folder_order(train_ND, tokens_per_crop=256)
    args.tokens = len(store_ND) // args.batch_size * args.batch_size  # one pass
    buffer = int(args.buffer_fraction * len(store_ND))
    print(
        f"{len(store_ND):,} training tokens in folder order, {args.shards} shards, buffer {buffer:,} tokens; "
        f"TopK n={args.n_features}, k={args.k}, batch {args.batch_size}, one pass ({args.tokens:,} tokens)\n"
    )
    print("| data order | seed | held-out FVU | dead % | s |")
    print("|---|---:|---:|---:|---:|")
    for seed in args.seeds:
        arms: dict[str, object] = {
            "full reshuffle (a store staged whole: an array)": store_ND,
            "buffer fed whole shards": StoreStream(store_ND, args.shards, buffer, args.batch_size, seed),
        }
        for rows in args.piece_tokens:
            arms[f"buffer fed pieces of {rows} tokens"] = StoreStream(
                store_ND, args.shards, buffer, args.batch_size, seed, chunk_rows=rows
            )
        for name, data in arms.items():
            r = run(name, data, eval_ND, args, seed)
            print(f"| {name} | {seed} | {r['fvu']:.4f} | {r['dead']:.2f} | {r['s']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
