"""Real effects of SAE features on MobileNetV2 (the offline zoo's ImageNet weights).

For each hook (the pooled features before the head, one spatial block): a TopK SAE on augmented crops of
the real photos (foolbox ImageNet samples, labelled scikit-image photos, interior photos), its FVU / L0 /
dead fraction, how often a feature's logit name agrees with the labels of its top-activating crops;
concept search by class name (precision@1 on the labelled photos, by the features with the class as
first logit name and as any of the first five); steering (mean Δp(X) from adding the
features named X on photos that are not X, and from ablating them on held-out crops of X); SAeUron
unlearning of one and of two classes (top-1 drop on held-out crops, kept top-1 on the other photos).
Prints a Markdown report and writes it (atomically) to `--out`.

    mmsae zoo install            # once; then
    python benchmarks/bench_effects.py --out /tmp/effects.md
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from itertools import product
from pathlib import Path

import torch

from mmsae.analysis.logit_naming import features_named
from mmsae.effects import (
    EffectsConfig,
    crops_of,
    precision_at_k,
    real_photos,
    sae_metrics,
    steering_effect,
    train_sae,
    unlearning_effect,
)
from mmsae.encoders import get_encoder
from mmsae.fileio import atomic_write_bytes

HOOKS = {  # hook → (n_features, k, training tokens, batch size)
    "global_pool": (256, 16, 40_000, 256),
    "blocks.5": (512, 16, 200_000, 1024),
}


def run_hook(encoder, hook: str, args: argparse.Namespace, photos, labelled, held_out) -> list[str]:
    n, k, tokens, batch = HOOKS[hook]
    cfg = EffectsConfig(hook=hook, n_crops=args.crops, n_features=n, k=k, tokens=tokens, batch_size=batch)
    start = time.perf_counter()
    t = train_sae(encoder, cfg, photos)
    m = sae_metrics(t)
    rows = [
        f"### `{hook}` ({n} features, k={k}, {args.crops} crops; trained and named in "
        f"{time.perf_counter() - start:.0f} s)\n",
        "| FVU | L0 | dead | logit name = majority label of top-5 crops (top-1 name / any of top-5) "
        "| features with labelled top crops |",
        "|---|---|---|---|---|",
        f"| {m['fvu']:.3f} | {m['l0']:.1f} | {m['dead_fraction']:.1%} | {m['name_agreement_top1']:.1%} / "
        f"{m['name_agreement_top5']:.1%} | {m['features_with_labelled_images']} |\n",
        "| target | features named it (first name / any of first five) "
        "| precision@1 (first name / any of first five) | Δp(X) adding (not-X photos) "
        "| Δp(X) ablating (X crops) |",
        "|---|---|---|---|---|",
    ]
    for target in cfg.targets:
        s = steering_effect(t, encoder, target, [*labelled, *held_out], cfg)
        p1 = [precision_at_k(t, encoder, labelled, target, k=1, rank=r) for r in (1, 5)]
        named = [len(features_named(t.names, target, r)) for r in (1, 5)]
        rows.append(
            f"| {target} | {named[0]} / {named[1]} | {p1[0]:.2f} / {p1[1]:.2f} | {s['add_delta']:+.3f} "
            f"(from {s.get('p_neg_before', float('nan')):.3f}) | {s['ablate_delta']:+.3f} "
            f"(from {s.get('p_pos_before', float('nan')):.3f}) |"
        )
    rows += [
        "",
        f"| unlearned (percentile {cfg.percentile}) | multiplier | features blocked "
        "| top-1 on its crops before → after (drop) | top-1 on other labelled photos before → after (kept) |",
        "|---|---|---|---|---|",
    ]
    others = [p for p in labelled if not set(p.labels[:1]) & set(cfg.targets)]
    for concepts, multiplier in product([(c,) for c in cfg.targets] + [cfg.targets], (-1.0, -5.0)):
        u = unlearning_effect(t, encoder, concepts, held_out, others, replace(cfg, multiplier=multiplier))
        mine = f"{u['top1_before']:.2f} → {u['top1_after']:.2f} ({u['drop']:.0%})"
        rest = f"{u['other_before']:.2f} → {u['other_after']:.2f} ({u['other_kept']:.0%})"
        rows.append(f"| {' + '.join(concepts)} | {multiplier:g} | {len(u['features'])} | {mine} | {rest} |")
    return [*rows, ""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--crops", type=int, default=256)
    p.add_argument("--hooks", nargs="+", default=list(HOOKS), choices=list(HOOKS))
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.manual_seed(0)
    encoder = get_encoder("timm:mobilenetv2_100", pretrained=True)
    photos = real_photos()
    labelled = [ph for ph in photos if ph.labels]
    targets = EffectsConfig().targets
    held_out = crops_of([ph for ph in labelled if ph.labels[0] in targets], 16, seed=1)
    lines = ["## Real effects on MobileNetV2\n"]
    print(lines[0], flush=True)
    for hook in args.hooks:
        section = run_hook(encoder, hook, args, photos, labelled, held_out)
        print("\n".join(section), flush=True)  # each hook's table as soon as it is measured
        lines += section
    report = "\n".join(lines)
    if args.out is not None:
        atomic_write_bytes(args.out, report.encode())


if __name__ == "__main__":
    main()
