"""DINOv2-S/14 patch tokens of augmented crops of the zoo's photos: the real activations the recipe and store
benchmarks train on (`bench_recipe_gpu.py`, `bench_store_order.py`, `bench_fp8_candidates.py`).

Crops (random resized crop, scale 0.1–1, horizontal flip) of the zoo's foolbox and interior photos, every
tenth photo held out; extracted once into a `--cache` file keyed by the configuration.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling; `-P` leaves the script's folder out
from bench_recipe import zoo_photos

ENCODER = "timm:vit_small_patch14_dinov2"


class Crops(torch.utils.data.Dataset):
    """Crop i of `photos`: photo and augmentation drawn from a generator seeded by (seed, i), so any worker
    count gives the same crops."""

    def __init__(self, photos: list[Path], n: int, seed: int, size: int, mean: Any, std: Any):
        from PIL import Image
        from torchvision import transforms as T

        self.images = [Image.open(f).convert("RGB") for f in photos]
        for image in self.images:  # crops are resized to `size`; full-size photos would be the bottleneck
            image.thumbnail((2 * size, 2 * size))
        self.n, self.seed = n, seed
        self.augment = T.Compose(
            [
                T.RandomResizedCrop(size, scale=(0.1, 1.0)),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(mean, std),
            ]
        )

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Tensor:
        return self.augment(self.images[crop_photo(self.seed, i, len(self.images))])


def crop_photo(seed: int, i: int, n_photos: int) -> int:
    """Which of `n_photos` photos crop i of `Crops(..., seed)` is cut from. Drawn from the global generator
    seeded by (seed, i), which the crop's augmentation then draws from: torchvision uses that generator."""
    torch.manual_seed(seed * 1_000_003 + i)
    return int(torch.randint(n_photos, ()))


def split_photos(photos: list[Path]) -> tuple[list[Path], list[Path]]:
    """(training, held-out) photos: every tenth is held out, so evaluation never sees a training photo."""
    held = photos[::10]
    return [f for f in photos if f not in held], held


@torch.no_grad()
def extract(args: argparse.Namespace, photos: list[Path], n_tokens: int, seed: int) -> Tensor:
    """Patch tokens [n_tokens, d] (fp16, on the host) at `args.hook` of augmented crops of `photos`."""
    from mmsae.encoders import get_encoder

    encoder = get_encoder(args.encoder, pretrained=not args.tiny, device=args.device)
    cfg = encoder.model.pretrained_cfg
    size = encoder.image_size[-1]
    tokens_per_crop = (size // encoder.model.patch_embed.patch_size[0]) ** 2
    crops = Crops(photos, -(-n_tokens // tokens_per_crop), seed, size, cfg["mean"], cfg["std"])
    loader = torch.utils.data.DataLoader(crops, batch_size=64, num_workers=args.workers)
    out = []
    for pixels in loader:
        with torch.autocast(args.device.split(":")[0], enabled=args.device.startswith("cuda")):
            acts = encoder.activations(pixels.to(args.device), [args.hook], tokens="patch")[args.hook]
        out.append(acts.acts_ND.half().cpu())
    return torch.cat(out)[:n_tokens]


def tokens(args: argparse.Namespace) -> tuple[Tensor, Tensor]:
    """(train, held-out) tokens, from `--cache` when it holds this configuration."""
    if args.tokens_file:  # [N, d] tokens already extracted: the last `--eval-tokens` rows are held out
        rows_ND = torch.load(args.tokens_file, weights_only=True)
        need = max(args.budgets) + args.calib_tokens + args.eval_tokens
        if not isinstance(rows_ND, Tensor) or rows_ND.ndim != 2 or len(rows_ND) < need:
            raise SystemExit(f"--tokens-file {args.tokens_file}: expected a [N ≥ {need:,}, d] tensor.")
        return rows_ND[: -args.eval_tokens], rows_ND[-args.eval_tokens :]
    key = f"{args.encoder}|{args.hook}|{max(args.budgets)}|{args.eval_tokens}|{args.calib_tokens}"
    if args.cache and args.cache.exists():
        saved = torch.load(args.cache, weights_only=True)
        if saved["key"] == key:
            return saved["train"], saved["eval"]
    train, held = split_photos(zoo_photos())
    train_ND = extract(args, train, max(args.budgets) + args.calib_tokens, 0)
    eval_ND = extract(args, held, args.eval_tokens, 1)
    if args.cache:
        args.cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.cache.with_suffix(".tmp")
        torch.save({"key": key, "train": train_ND, "eval": eval_ND}, tmp)
        tmp.replace(args.cache)
    return train_ND, eval_ND


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """Token options of the scripts that read `bench_recipe_gpu.py`'s cache (defaults: its CPU run's)."""
    ap.add_argument("--cache", type=Path, required=True, help="bench_recipe_gpu.py's token cache")
    ap.add_argument("--budgets", type=int, nargs="+", default=[196_608], help="as the cache was made")
    ap.add_argument("--eval-tokens", type=int, default=65_536)
    ap.add_argument("--calib-tokens", type=int, default=16_384)


def cached_tokens(args: argparse.Namespace) -> tuple[Tensor, Tensor]:
    """(train, held-out) `blocks.9` tokens for `add_arguments`' options, extracted if the cache lacks them."""
    spec = argparse.Namespace(
        encoder=ENCODER, hook="blocks.9", budgets=args.budgets, eval_tokens=args.eval_tokens,
        calib_tokens=args.calib_tokens, cache=args.cache, tokens_file=None, tiny=False, workers=2,
        device="cuda" if torch.cuda.is_available() else "cpu",
    )  # fmt: skip
    return tokens(spec)
