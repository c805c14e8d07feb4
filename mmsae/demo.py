"""`make demo`: the whole pipeline, end to end and offline, on real weights and real photos.

encoder → activation store over augmented crops of real photos → TopK SAE → metrics → named features
and their measured effect → FAISS concept index → feature statistics, a summary report and dashboards
of the most active features (PNG + HTML) → the command that opens the concept-search app.

The default encoder (`auto`) is CLIP ViT-B/32 when its weights are reachable (hub, local path or HF
cache), else the offline zoo's ImageNet MobileNetV2 (`mmsae zoo install`). On a classifier the features
are named by their effect on the logits (ImageNet classes), the demo measures how adding the features
named "espresso" changes p(espresso) on the other photos, and the concept index answers class names.
An encoder without reachable weights runs with random init, announced loudly, so every stage still runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

BANNER = "=" * 78
CLIP_SPEC = "clip:ViT-B-32/openai"
ZOO_CLASSIFIER = "timm:mobilenetv2_100"
HOOKS = {CLIP_SPEC: "visual.transformer.resblocks.8", ZOO_CLASSIFIER: "global_pool"}
STEER_TARGET = "espresso"


def load_encoder(spec: str, device: str):
    """The encoder with pretrained weights if they can be found, else random init (announced loudly).

    `auto`: CLIP ViT-B/32 if its weights are reachable, else the zoo's MobileNetV2."""
    from mmsae.encoders import get_encoder
    from mmsae.encoders.weights import WeightsUnavailableError

    if spec == "auto":
        try:
            return get_encoder(CLIP_SPEC, pretrained=True, device=device), True
        except WeightsUnavailableError:
            print(f"      no {CLIP_SPEC} weights reachable: using the offline zoo's {ZOO_CLASSIFIER}")
            spec = ZOO_CLASSIFIER
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


def demo_photos():
    """The real photos (foolbox ImageNet samples, labelled scikit-image, interior) when the zoo has them,
    else the scikit-image photos."""
    from mmsae.effects import Photo, real_photos
    from mmsae.zoo import ZooError

    try:
        return real_photos()
    except ZooError as e:
        from mmsae.datasets.images import SkimagePhotos

        print(f"      {e}\n      using the scikit-image photos only", file=sys.stderr)
        sk = SkimagePhotos()
        return [Photo(sk[i].image, (), name) for i, name in enumerate(sk.names)]


def save_photos(photos, out: Path) -> Path:
    """Write the photos as PNG files (labelled ones get their class in the name): the concept index maps
    hits back to files."""
    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for photo in photos:
        label = f"__{photo.labels[0].replace(' ', '_')}" if photo.labels else ""
        path = folder / f"{photo.name}{label}.png"
        if not path.exists():
            photo.image.save(path)
    return folder


def write_reports(encoder, sae, store, crops, index, out: Path, hook: str, n_dashboards: int = 4) -> Path:
    """Summary report (density histogram, FVU vs L0) and dashboards of the most frequent features."""
    from mmsae.analysis import feature_stats
    from mmsae.analysis.dashboard import feature_dashboard, summary_report

    stats = feature_stats(sae, store.token_acts(hook))
    summary_report({"topk": stats}, out)
    images = [crops[i].image for i in range(len(crops))]
    spatial = store.n_tokens > len(crops)  # pooled features (one token per image) have no heatmap
    for feature in stats.frequency.argsort(descending=True)[:n_dashboards].tolist():
        feature_dashboard(
            feature,
            stats,
            images,
            out,
            names=index.names[feature],
            sae=sae if spatial else None,
            encoder=encoder if spatial else None,
            hook=hook,
        )
    return out


def named_effects(sae, encoder, crops, hook: str, n_show: int = 8) -> None:
    """Logit names of the most frequent features, and the measured effect of steering with the
    features named `STEER_TARGET` (mean Δp over the photos that are not it, error term kept)."""
    from mmsae.analysis.logit_naming import name_features_by_logits, typical_activations
    from mmsae.effects import EffectsConfig, TrainedSAE, hook_activations, steering_effect

    acts_NTD = hook_activations(encoder, [c.image for c in crops[:64]], hook)

    trained = TrainedSAE(sae, list(crops[:64]), acts_NTD)
    scales_n = typical_activations(sae, acts_NTD.flatten(0, 1))
    trained.names = name_features_by_logits(sae, encoder, acts_NTD[:8], hook=hook, scales_n=scales_n)
    frequency = (trained.pooled_Nn > 0).float().mean(0)
    print("      feature  frequency  logit names (logit change)")
    for j in frequency.argsort(descending=True)[:n_show].tolist():
        names = ", ".join(f"{c.name} ({c.score:+.1f})" for c in trained.names[j][:3])
        print(f"      {j:>7}  {frequency[j]:>9.2f}  {names}")
    photos = [c for c in demo_photos() if c.labels]
    s = steering_effect(trained, encoder, STEER_TARGET, photos, EffectsConfig(hook=hook))
    if not s["features"]:
        print(f"      no feature is named {STEER_TARGET!r} in this SAE: nothing to steer")
        return
    print(
        f"      steering with the {len(s['features'])} feature(s) named {STEER_TARGET!r} "
        f"(error term kept): p({STEER_TARGET}) on the other photos {s['p_neg_before']:.3f} → "
        f"{s['p_neg_before'] + s['add_delta']:.3f}; ablating them on {STEER_TARGET} photos "
        f"{s['p_pos_before']:.3f} → {s['p_pos_before'] + s['ablate_delta']:.3f}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="mmsae demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--encoder",
        default="auto",
        help=f"encoder spec (family:name); auto = {CLIP_SPEC} or {ZOO_CLASSIFIER}",
    )
    p.add_argument("--hook", help=f"hook point to train on (default per encoder: {HOOKS})")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--crops", type=int, default=256, help="augmented crops of the photos to extract")
    p.add_argument("--n-features", type=int, default=256)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--tokens", type=int, default=40_000, help="training tokens (the store is cycled)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mmsae import train
    from mmsae.datasets.images import RandomCrops
    from mmsae.effects import PhotoList
    from mmsae.extract import extract
    from mmsae.index import ConceptIndex
    from mmsae.metrics import evaluate

    out: Path = args.out
    print(f"[1/7] encoder {args.encoder} on {args.device}")
    encoder, pretrained = load_encoder(args.encoder, args.device)
    hook = args.hook or HOOKS.get(encoder.id, encoder.default_hook)
    from mmsae.index.classifier import is_classifier_embedder

    classifier = is_classifier_embedder(encoder)

    photos = demo_photos()
    print(f"[2/7] extracting {hook} of {encoder.id} over {args.crops} crops of {len(photos)} real photos")
    crops = RandomCrops(PhotoList(photos), n=args.crops, scale=(0.35, 1.0))
    store = extract(encoder, crops, hooks=[hook], out_dir=out / "store", tokens="all")
    print(f"      store: {store.path} ({store.n_tokens:,} tokens, d={store.d_in})")

    print(f"[3/7] training a TopK SAE (n={args.n_features}, k={args.k}) on {args.tokens:,} tokens")
    sae = train(
        store,
        sae="topk",
        n_features=args.n_features,
        k=args.k,
        tokens=args.tokens,
        batch_size=args.batch_size,
        hook=hook,
        encoder=encoder.id,
        out_dir=str(out / "sae"),
        warmup_steps=20,
        checkpoint_every=50,
    ).to(args.device)
    sae_dir = out / "sae" / hook

    print("[4/7] metrics on the store")
    metrics = evaluate(sae, store.batches(4096, shuffle=False))
    for name in ("fvu", "explained_variance", "cosine", "l0", "dead_fraction", "n_tokens"):
        print(f"      {name:<20} {metrics[name]:.4g}")

    print("[5/7] named features" + (" (by their effect on the ImageNet logits)" if classifier else ""))
    if classifier:
        named_effects(sae, encoder, [crops[i] for i in range(len(crops))], hook)
    else:
        print("      CLIP text names: see the index and the dashboards below")

    print("[6/7] building the concept index over the photos")
    index = ConceptIndex.build(encoder, sae, save_photos(photos, out))
    index_dir = index.save(out / "index")
    print(f"      {index}")
    if classifier:
        hits = index.search_text(STEER_TARGET, k=3)
        print(f"      query {STEER_TARGET!r} → {[Path(h.path).name for h in hits]}")

    print("[7/7] feature statistics and dashboards")
    report_dir = write_reports(encoder, sae, store, crops, index, out / "report", hook)
    print(f"      {report_dir}/summary.html and feature_*.html")

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
