"""Dead features against the recipe: several SAEs trained side by side on bench_dead.py's DINOv2-S tokens.

One `SAEModule` sweep (one `SAESpec` per recipe, the same batches for all), scored on the same held-out rows
as `bench_dead.py` (FVU, L0, dead % = features that never fire on the held-out tokens). A recipe is a JSON
object: `name`, `arch` (default topk), `lr_mult` (× Gao et al.'s 2e-4/√(n/2¹⁴); default mmsae's `default_lr`)
and `options` (SAE config fields: aux_coef, dead_tokens, ...). `--run-tokens` trains longer than one pass over
the training rows (they are reshuffled each pass).

    python benchmarks/bench_dead.py --cache dino.pt --archs topk        # makes the cache once
    python benchmarks/bench_dead_sweep.py --cache dino.pt --recipes \\
        '[{"name": "lr 5x", "lr_mult": 5}, {"name": "aux 1/32", "options": {"aux_coef": 0.03125}}]'
    python benchmarks/bench_dead_sweep.py --cache dino.pt --n-features 4096 --k 32 --run-tokens 614400 \\
        --recipes '[{"name": "archetypal", "arch": "archetypal"}, {"name": "topk"}]'
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning as L
import torch

from mmsae import metrics
from mmsae.trainer import SAEDataModule, SAEModule, SAESpec


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cache", type=Path, required=True, help="activations written by bench_dead.py")
    parser.add_argument("--recipes", required=True, help="JSON list of recipes (see above)")
    parser.add_argument("--eval-tokens", type=int, default=65_536)
    parser.add_argument("--tokens", type=int, default=262_144, help="training rows")
    parser.add_argument(
        "--run-tokens",
        type=int,
        default=None,
        help="tokens trained on (default: the rows once; more repeats them)",
    )
    parser.add_argument("--n-features", type=int, default=2048)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--warmup-steps", type=int, default=50)
    args = parser.parse_args()
    recipes = json.loads(args.recipes)
    acts_ND = torch.load(args.cache, weights_only=True)
    train_ND, eval_ND = acts_ND[: -args.eval_tokens][: args.tokens], acts_ND[-args.eval_tokens :]
    gao_lr = 2e-4 / (args.n_features / 2**14) ** 0.5
    specs = [
        SAESpec(
            r.get("arch", "topk"),
            n_features=args.n_features,
            k=args.k,
            lr=r["lr_mult"] * gao_lr if "lr_mult" in r else None,
            name=r["name"],
            options=r.get("options", {}),
        )
        for r in recipes
    ]
    L.seed_everything(0, verbose=False)
    run_tokens = args.run_tokens or len(train_ND)
    data = SAEDataModule(train_ND, tokens=run_tokens, batch_size=args.batch_size, seed=0)
    module = SAEModule(specs, d_in=data.d_in, warmup_steps=args.warmup_steps)
    start = time.perf_counter()
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        precision="32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=data)
    print(
        f"{len(train_ND)} train rows, {run_tokens} tokens trained on, {len(eval_ND)} held-out tokens, "
        f"{time.perf_counter() - start:.0f} s\n"
    )
    print("| recipe | arch | FVU | L0 | dead % |\n|---|---|---:|---:|---:|")
    for i, r in enumerate(recipes):
        result = metrics.evaluate(module.folded_sae(i), eval_ND.float().split(4096))
        dead = 100 * result["dead_fraction"]
        print(f"| {r['name']} | {specs[i].arch} | {result['fvu']:.4f} | {result['l0']:.1f} | {dead:.2f} |")


if __name__ == "__main__":
    main()
