"""`make demo`: the whole pipeline, end to end and offline.

encoder (CLIP ViT-B/32) → activation store over augmented crops of the scikit-image photos →
TopK SAE → metrics → FAISS concept index → feature statistics, a summary report and dashboards of the
most active features (PNG + HTML) → the command that opens the concept-search app.
With pretrained weights reachable (hub, local path or HF cache) they are used; without, the demo
says so loudly and runs the same architecture with random weights, so every stage still runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

BANNER = "=" * 78


def load_encoder(spec: str, device: str):
    """The encoder with pretrained weights if they can be found, else random init (announced loudly)."""
    from mmsae.encoders import get_encoder
    from mmsae.encoders.weights import WeightsUnavailableError

    try:
        return get_encoder(spec, pretrained=True, device=device), True
    except WeightsUnavailableError as e:
        print(
            f"{BANNER}\nNO PRETRAINED WEIGHTS for {spec}: running with RANDOM INIT.\n"
            "Every stage runs, but features and names will be meaningless.\n"
            f"{e}\n{BANNER}",
            file=sys.stderr,
        )
        return get_encoder(spec, pretrained=False, device=device), False


def save_photos(out: Path) -> Path:
    """Write the bundled photos as PNG files: the concept index maps hits back to files."""
    from mmsae.datasets.images import SkimagePhotos

    photos, folder = SkimagePhotos(), out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(photos.names):
        path = folder / f"{name}.png"
        if not path.exists():
            photos[i].image.save(path)
    return folder


def write_reports(encoder, sae, store, crops, index, out: Path, hook: str, n_dashboards: int = 4) -> Path:
    """Summary report (density histogram, FVU vs L0) and dashboards of the most frequent latents."""
    from mmsae.analysis import feature_stats
    from mmsae.analysis.dashboard import feature_dashboard, summary_report

    stats = feature_stats(sae, store.token_acts(hook))
    summary_report({"topk": stats}, out)
    images = [crops[i].image for i in range(len(crops))]
    for latent in stats.frequency.argsort(descending=True)[:n_dashboards].tolist():
        feature_dashboard(
            latent, stats, images, out, names=index.names[latent], sae=sae, encoder=encoder, hook=hook
        )
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="mmsae demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--encoder", default="clip:ViT-B-32/openai", help="encoder spec (family:name)")
    p.add_argument("--hook", default="visual.transformer.resblocks.8", help="hook point to train on")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--crops", type=int, default=192, help="augmented crops of the photos to extract")
    p.add_argument("--n-latents", type=int, default=2048)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--tokens", type=int, default=120_000, help="training tokens (the store is cycled)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mmsae import train
    from mmsae.datasets.images import RandomCrops, SkimagePhotos
    from mmsae.extract import extract
    from mmsae.index import ConceptIndex
    from mmsae.metrics import evaluate

    out: Path = args.out
    print(f"[1/6] encoder {args.encoder} on {args.device}")
    encoder, pretrained = load_encoder(args.encoder, args.device)

    print(f"[2/6] extracting {args.hook} over {args.crops} crops of the scikit-image photos")
    crops = RandomCrops(SkimagePhotos(), n=args.crops)
    store = extract(encoder, crops, hooks=[args.hook], out_dir=out / "store", tokens="all")
    print(f"      store: {store.path} ({store.n_tokens:,} tokens, d={store.d_in})")

    print(f"[3/6] training a TopK SAE (n={args.n_latents}, k={args.k}) on {args.tokens:,} tokens")
    sae = train(
        store,
        sae="topk",
        n_latents=args.n_latents,
        k=args.k,
        tokens=args.tokens,
        batch_size=args.batch_size,
        hook=args.hook,
        encoder=encoder.id,
        out_dir=str(out / "sae"),
        warmup_steps=20,
        checkpoint_every=50,
    )
    sae_dir = out / "sae" / args.hook

    print("[4/6] metrics on the store")
    metrics = evaluate(sae.to(args.device), store.batches(4096, shuffle=False))
    for name in ("fvu", "explained_variance", "cosine", "l0", "dead_fraction", "n_tokens"):
        print(f"      {name:<20} {metrics[name]:.4g}")

    print("[5/6] building the concept index over the photos")
    index = ConceptIndex.build(encoder, sae, save_photos(out))
    index_dir = index.save(out / "index")
    print(f"      {index}")

    print("[6/6] feature statistics and dashboards")
    report_dir = write_reports(encoder, sae, store, crops, index, out / "report", args.hook)
    print(f"      {report_dir}/summary.html and latent_*.html")

    weights = "pretrained" if pretrained else "RANDOM-INIT (no weights reachable)"
    print(f"\nDone ({weights} encoder). SAE: {sae_dir}  index: {index_dir}")
    print(
        "Open the concept-search app with:\n"
        f"  .venv/bin/mmsae app search --sae {sae_dir} --index {index_dir} --model {encoder.id}"
        + ("" if pretrained else " --random-init")
    )
    return 0


cli_main = main  # `mmsae demo` dispatches here


if __name__ == "__main__":
    raise SystemExit(main())
