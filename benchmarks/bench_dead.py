"""Dead features on real activations: TopK, AbsTopK and archetypal (RA-SAE) SAEs on DINOv2-S/14 patch tokens.

Data: patch tokens of blocks 6–9 of the offline zoo's DINOv2-S/14 (d = 384) over `--images` random crops of
the zoo's real photos (scikit-image, foolbox ImageNet samples, interiors), pooled and shuffled. They are
extracted once and cached (`--cache`); the last `--eval-tokens` rows are held out. Each SAE trains with
`mmsae.train` on the same tokens and is scored on the held-out rows: FVU, L0, and dead % (features that never
fire on the held-out tokens). Prints a Markdown table and writes it (atomically) to `--out`.

    mmsae zoo install            # once; then
    python benchmarks/bench_dead.py --cache /tmp/dino_blocks6-9.pt --out dead.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import mmsae
from mmsae import metrics
from mmsae.datasets import FoolboxSamples, InteriorPhotos, RandomCrops, SkimagePhotos
from mmsae.datasets.images import Example, ExampleDataset
from mmsae.encoders import get_encoder
from mmsae.fileio import atomic_write_bytes

ENCODER = "timm:vit_small_patch14_dinov2"
HOOKS = ("blocks.6", "blocks.7", "blocks.8", "blocks.9")


class ConcatPhotos(ExampleDataset):
    """The zoo's real photos, one image data set (RandomCrops takes one base)."""

    kind = "image"

    def __init__(self) -> None:
        self.parts = [SkimagePhotos(), FoolboxSamples("imagenet"), InteriorPhotos()]
        self.index = [(p, i) for p in self.parts for i in range(len(p))]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> Example:
        part, i = self.index[index]
        return part[i]

    def source(self, index: int) -> str:
        part, i = self.index[index]
        return part.source(i)

    def fingerprint(self) -> str:
        return "+".join(p.fingerprint() for p in self.parts)

    def describe(self) -> str:
        return " + ".join(p.describe() for p in self.parts)


@torch.no_grad()
def extract(n_images: int, batch: int = 16) -> torch.Tensor:
    """Patch tokens of blocks 6–9 over `n_images` crops, [N, 384] fp16, rows shuffled (seed 0)."""
    enc = get_encoder(ENCODER, pretrained=True)
    crops = RandomCrops(ConcatPhotos(), n_images)
    chunks = []
    for start in range(0, n_images, batch):
        pixels = torch.stack(
            [enc.transform(crops[i].image) for i in range(start, min(start + batch, n_images))]
        )
        acts = enc.activations(pixels, list(HOOKS), tokens="patch")
        chunks += [acts[h].acts_ND.half() for h in HOOKS]
    acts_ND = torch.cat(chunks)
    return acts_ND[torch.randperm(len(acts_ND), generator=torch.Generator().manual_seed(0))]


def load_or_extract(cache: Path, n_images: int) -> torch.Tensor:
    if cache.exists():
        return torch.load(cache, weights_only=True)
    acts_ND = extract(n_images)
    tmp = cache.with_suffix(".tmp")
    torch.save(acts_ND, tmp)
    tmp.replace(cache)
    return acts_ND


def run(arch: str, train_ND: torch.Tensor, eval_ND: torch.Tensor, args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    sae = mmsae.train(
        train_ND,
        sae=arch,
        n_features=args.n_features,
        k=args.k,
        tokens=args.run_tokens or len(train_ND),
        batch_size=args.batch_size,
        warmup_steps=args.warmup_steps,
        precision="32-true",
        **({} if args.dead_tokens is None else {"dead_tokens": args.dead_tokens}),
    )
    seconds = time.perf_counter() - start
    result = metrics.evaluate(sae, eval_ND.float().split(4096))
    return {**result, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cache", type=Path, required=True, help="activations file (made if missing)")
    parser.add_argument("--images", type=int, default=320, help="crops to extract (1024 tokens each)")
    parser.add_argument("--eval-tokens", type=int, default=65_536)
    parser.add_argument("--archs", nargs="+", default=["topk", "abstopk", "archetypal"])
    parser.add_argument("--n-features", type=int, default=2048)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=None, help="training rows (default: all train rows)")
    parser.add_argument(
        "--run-tokens",
        type=int,
        default=None,
        help="tokens trained on (default: the rows once; more repeats them)",
    )
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument(
        "--dead-tokens",
        type=int,
        default=None,
        help="AuxK's dead window (default: mmsae's, scaled to the run)",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    acts_ND = load_or_extract(args.cache, args.images)
    train_ND, eval_ND = acts_ND[: -args.eval_tokens][: args.tokens], acts_ND[-args.eval_tokens :]
    lines = [
        f"DINOv2-S/14 blocks 6–9 patch tokens: {len(train_ND)} train / {len(eval_ND)} held-out, "
        f"{args.run_tokens or len(train_ND)} tokens trained on, "
        f"n_features {args.n_features}, k {args.k}, batch {args.batch_size}, "
        f"dead window {args.dead_tokens or 'default'} tokens",
        "",
        "| SAE | FVU | L0 | dead % (held-out) | train s |",
        "|---|---|---|---|---|",
    ]
    for arch in args.archs:
        r = run(arch, train_ND, eval_ND, args)
        dead = 100 * r["dead_fraction"]
        lines.append(f"| {arch} | {r['fvu']:.3f} | {r['l0']:.1f} | {dead:.1f} | {r['seconds']:.0f} |")
        print(lines[-1], flush=True)
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out is not None:
        atomic_write_bytes(args.out, report.encode())


if __name__ == "__main__":
    main()
