"""DINOv2-S/14 features on real photos: an SAE on patch tokens, dashboards, and whether features localize.

Trains a TopK SAE on the patch tokens of one block of the zoo's DINOv2-S/14 over random augmented crops of
the real photos (scikit-image scenes, foolbox's ImageNet samples, interior photos); the activation store
and the SAE are cached under `--cache`, so a rerun only redoes the analysis. Then, on the photos with a
hand-drawn object box (`mmsae.analysis.objects.OBJECT_BOXES`), it scores the energy in the box of the
features with the most mass inside it, for the SAE and for as many random directions
(`mmsae.analysis.localization`), prints the Markdown table and writes under `--out`: `objects.png` (every
object's top features as heatmaps), `feature_<i>.png/.html` dashboards of the SAE features in the table
(top-activating crops with heatmaps, the top patch outlined), `summary.png/.html` and `index.html`.

    mmsae zoo install            # once; then
    python benchmarks/bench_dino_features.py --out /tmp/dino
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import time
from pathlib import Path

import torch

from mmsae.analysis.dashboard import feature_dashboard, localization_grid, summary_report
from mmsae.analysis.localization import (
    ObjectScore,
    format_table,
    localization_scores,
    mean_energy,
    sae_and_random,
)
from mmsae.analysis.naming import NameCandidate
from mmsae.analysis.objects import OBJECT_BOXES, PhotoList, real_photo_specs
from mmsae.analysis.stats import StatsConfig, feature_stats
from mmsae.checkpoint import load_sae, save_sae
from mmsae.datasets.images import RandomCrops
from mmsae.encoders import Encoder, get_encoder
from mmsae.extract import extract
from mmsae.fileio import atomic_write_bytes
from mmsae.sae import SAE
from mmsae.store import ActivationStore
from mmsae.trainer.api import train
from mmsae.zoo import install

DINO = "timm:vit_small_patch14_dinov2"
# Rows of the README figure: small and large objects, animal and man-made.
FIGURE_OBJECTS = ("rocket", "space shuttle model", "cup", "motorcycle", "dog", "car")


def cached_sae(store: ActivationStore, args: argparse.Namespace, cache: Path) -> SAE:
    """Train the SAE once per (store, settings); later runs load it from the cache."""
    key = json.dumps([str(store.path), args.hook, args.n_features, args.k, args.tokens, args.seed])
    path = cache / "sae" / hashlib.sha256(key.encode()).hexdigest()[:16]
    if (path / "cfg.json").is_file():
        return load_sae(path)
    sae = train(
        store, sae="topk", n_features=args.n_features, k=args.k, tokens=args.tokens, batch_size=2048,
        hook=args.hook, encoder=DINO, seed=args.seed, warmup_steps=50,
    )  # fmt: skip
    save_sae(sae, path)
    return sae


def token_mean(store: ActivationStore, hook: str) -> torch.Tensor:
    total, n = torch.zeros(store.dim(hook), dtype=torch.float64), 0
    for acts in store.token_acts(hook):
        total += acts.acts_ND.double().sum(0)
        n += acts.acts_ND.shape[0]
    return (total / n).float()


def write_dashboards(
    sae: SAE,
    encoder: Encoder,
    store: ActivationStore,
    crops: RandomCrops,
    scores: list[ObjectScore],
    args: argparse.Namespace,
    out: Path,
) -> list[int]:
    """Dashboards of the SAE features in the table, best-localized first (at most `--features`)."""
    best: dict[int, float] = {}
    for s in scores:
        for f, e in zip(s.bases["sae"].features, s.bases["sae"].energy):
            best[f] = max(best.get(f, 0.0), e)
    features = sorted(best, key=best.get, reverse=True)[: args.features]
    stats = feature_stats(sae, store.token_acts(args.hook), StatsConfig(top_k=8))
    summary_report({f"topk n={sae.n_features} k={args.k}": stats}, out)
    images = [crops[i].image for i in range(len(crops))]
    labels = {f: [s.obj.label for s in scores if f in s.bases["sae"].features] for f in features}
    for feature in features:
        names = [
            NameCandidate(f"energy in the {label} box", best[feature])
            for label in dict.fromkeys(labels[feature])
        ]
        feature_dashboard(feature, stats, images, out, names=names, sae=sae, encoder=encoder, hook=args.hook)
    return features


def index_page(table: str, features: list[int], out: Path) -> None:
    links = "".join(f"<li><a href='feature_{i}.html'>feature {i}</a></li>" for i in features)
    body = (
        "<!doctype html><html><head><meta charset='utf-8'><title>DINOv2-S features</title></head><body>"
        "<h1>DINOv2-S/14 SAE features on real photos</h1>"
        f"<pre>{html.escape(table)}</pre><img src='objects.png' alt='object heatmaps'>"
        f"<h2>Feature dashboards</h2><ul>{links}</ul>"
        "<p><a href='summary.html'>SAE summary</a></p></body></html>"
    )
    atomic_write_bytes(out / "index.html", body.encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="Folder for dashboards and figures.")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "mmsae" / "bench_dino")
    parser.add_argument("--hook", default="blocks.9", help="DINOv2 block whose patch tokens the SAE reads.")
    parser.add_argument("--crops", type=int, default=256, help="Random augmented crops of the photos.")
    parser.add_argument("--n-features", type=int, default=1536)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=400_000, help="Training tokens (repeats the store).")
    parser.add_argument("--top-k", type=int, default=3, help="Features scored per object and basis.")
    parser.add_argument("--features", type=int, default=12, help="Feature dashboards written.")
    parser.add_argument("--figure", type=Path, default=None, help="Also write the compact README figure.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    install(log=lambda s: None)  # a no-op when installed; otherwise the same install as `mmsae zoo install`
    start = time.perf_counter()
    encoder = get_encoder(DINO, pretrained=True)
    crops = RandomCrops(PhotoList(real_photo_specs()), args.crops, scale=(0.1, 1.0), seed=args.seed)
    store = extract(encoder, crops, args.hook, args.cache / "stores", tokens="patch", batch_size=32)
    sae = cached_sae(store, args, args.cache)
    bases = sae_and_random(sae, token_mean(store, args.hook), seed=args.seed)
    scores = localization_scores(encoder, args.hook, bases, OBJECT_BOXES, k=args.top_k)
    table = format_table(scores, args.top_k)
    args.out.mkdir(parents=True, exist_ok=True)
    localization_grid(scores, args.out / "objects.png")
    if args.figure is not None:
        rows = [s for label in FIGURE_OBJECTS for s in scores if s.obj.label == label][: len(FIGURE_OBJECTS)]
        localization_grid(rows, args.figure, dpi=60)
    features = write_dashboards(sae, encoder, store, crops, scores, args, args.out)
    index_page(table, features, args.out)
    gain = mean_energy(scores, "sae") - mean_energy(scores, "random")
    print(f"{DINO} {args.hook}, {args.crops} crops ({store.n_tokens} patch tokens), TopK n={args.n_features} "
          f"k={args.k}, {args.tokens} training tokens; {time.perf_counter() - start:.0f} s\n")  # fmt: skip
    print(table)
    print(f"\nSAE − random mean energy in box: {gain:+.2f}; dashboards in {args.out}/index.html")


if __name__ == "__main__":
    main()
