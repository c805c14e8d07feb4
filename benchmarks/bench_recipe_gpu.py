"""Side by side on real activations at d = 384: mmsae's defaults against sparsify and SAELens, same tokens.

Data: patch tokens of one block of the offline zoo's DINOv2-S/14 (`timm:vit_small_patch14_dinov2`, after
`mmsae zoo install`) over augmented crops (random resized crop, scale 0.1–1, horizontal flip) of the zoo's
foolbox and interior photos; every tenth photo is held out and only its crops are scored. Extracted once
into `--cache`.

Every recipe trains n_features=4096, k=32, batch 4096 at each token budget of `--budgets` (each budget a whole
run with its own schedule, so the table is final FVU against training tokens) and is scored on the held-out
tokens (FVU, L0, dead %: features that never fire there):
- `mmsae topk`, `mmsae batchtopk`, `mmsae matryoshka`: `mmsae.train(X, sae=..., n_features, k, tokens,
  batch_size)` and nothing else, as a new user runs it (bf16 autocast and CUDA graphs on a GPU). The batch
  variants' inference threshold θ is then set so that the k·N largest selection scores of N calibration tokens
  (training tokens, never held-out ones) pass it, so their held-out L0 ≈ k, as TopK's; their L0 with the θ
  learnt in training is reported beside it, and their FVU at the θ that gives held-out L0 = k exactly (the
  point of their FVU–L0 frontier at TopK's L0: held-out photos fire more features than training ones).
- `mmsae topk lr×m`: the same with lr = m × the default lr of that run (`mmsae.sae.default_lr`, times the
  variant's `default_lr_scale`): the tuning sweep. "Best tuned" is, at each budget, the best of the sweep and
  the default.
- `sparsify signum`: eai-sparsify's `SparseCoder` with its trainer's default recipe (SignSGD + schedule-free,
  lr 5e-3/√(n/2¹⁴), b_dec at the first batch's mean, unit-norm decoder, AuxK off), scored at the averaged
  weights. Its trainer itself needs a Hugging Face language model and data set, so the loop is its step.
- `sparsify adam`: the same `SparseCoder` with a plain Adam recipe: lr 2e-4/√(n/2¹⁴), 100 warm-up steps,
  linear decay to 0 over the last 20 %, AuxK at 1/32 (sparsify's 10M-token dead window), decoder renormalised
  each step.
- `saelens`: SAELens' TopK SAE through its own `SAETrainer` with its default config, where `sae_lens` imports.
- `mmsae abstopk`, `mmsae archetypal`, `mmsae batchtopk[score=activation]` (`--more-archs`): the other
  k-sparse variants at the top budget only, for their dead %, and BatchTopK ranking raw activations. Any
  variant with options fits there, e.g. `--more-archs "relu[target_l0=16]" "gated[target_l0=16]"`; with
  `--only-more-archs` only those rows are trained (no TopK, no sweep, no peers), and with
  `--more-archs-every-budget` at every budget of `--budgets` (short runs of "topk" "batchtopk[seed=1]" ...).
  A row with `target_l0` also reports its L0 on the calibration tokens: held-out photos fire more features
  than training ones.

Then "within 1.5× the tokens": for each budget b, the tokens the default TopK needs to reach the best tuned
FVU at b (log-linear interpolation between budgets), divided by b.

sparsify is imported without running its `__init__` (which imports its language-model trainer and with it
`datasets`): only `sparsify.config`, `sparsify.sparse_coder` and `sparsify.sign_sgd` load. Run from the
repository root with `python -P` so that the project's top-level `kernels/` and `datasets/` folders do not
shadow installed packages:

    PYTHONPATH=/path/to/sparsify/site python -P benchmarks/bench_recipe_gpu.py --json recipe_gpu.json
    python -P benchmarks/bench_recipe_gpu.py --tiny        # CPU smoke run, seconds
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import itertools
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import mmsae
from mmsae import metrics
from mmsae.fileio import atomic_write_bytes
from mmsae.sae import SAE, SparseCodes, as_dense, default_lr, get_sae_class

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling; `-P` leaves the script's folder out
from dino_tokens import ENCODER, tokens
from peers import PeerSAE, import_sparsify

TINY_ENCODER = "timm:test_vit"


# ----------------------------------------------------------------------------------------- mmsae
@torch.no_grad()
def calibrate_threshold(sae: SAE, calib_ND: Tensor, chunk: int = 4096) -> float:
    """Set a BatchTopK-family θ to the (k·N)-th largest selection score over N calibration tokens."""
    sae.eval()
    device, keep = sae.W_dec.device, sae.cfg.k * len(calib_ND)
    best = torch.empty(0, device=device)
    for x in calib_ND.split(chunk):
        x = x.to(device).float()
        acts = sae.pre_acts(x).relu()
        scores = sae.selection_score(x, acts).masked_fill(acts <= 0, 0).flatten()
        best = torch.cat([best, scores]).topk(min(keep, len(best) + len(scores)), sorted=False).values
    theta = float(best.min())
    sae.threshold.fill_(theta)
    return theta


def _value(text: str) -> Any:
    """A recipe option's value: a Python literal (numbers, True, None) or else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def run_mmsae(arch: str, train_ND: Tensor, budget: int, args: argparse.Namespace, lr: float | None) -> SAE:
    """`arch` may carry config options and a seed: 'batchtopk[score=activation]', 'topk[seed=1]'."""
    arch, _, options = arch.rstrip("]").partition("[")
    # Commas inside parentheses belong to a tuple value: 'matryoshka[prefix_fractions=(0.25,0.5,1.0)]'.
    pairs = (option.split("=", 1) for option in re.split(r",(?![^()]*\))", options) if option)
    kwargs = {k: _value(v) for k, v in pairs}
    kwargs.setdefault("seed", 0)
    return mmsae.train(
        train_ND[:budget],
        **kwargs,
        sae=arch,
        n_features=args.n_features,
        k=args.k,
        tokens=budget,
        batch_size=args.batch_size,
        lr=lr,
        devices=1,
    )


# ----------------------------------------------------------------------------------------- peers
def run_sparsify(recipe: str, train_ND: Tensor, budget: int, args: argparse.Namespace) -> SAE:
    """sparsify's `SparseCoder` under its default recipe ('signum') or the plain Adam one ('adam')."""
    if args.device == "cpu":  # sparsify picks its Triton decoder whenever triton imports, even on a CPU
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    sc = import_sparsify()
    from schedulefree import ScheduleFreeWrapper
    from sparsify.config import SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    torch.manual_seed(0)
    d, n, bs = train_ND.shape[1], args.n_features, args.batch_size
    sae = sc.SparseCoder(
        d, SparseCoderConfig(num_latents=n, k=args.k), device=args.device, dtype=torch.float32
    )
    steps = budget // bs
    if recipe == "signum":
        opt = ScheduleFreeWrapper(
            SignSGD([{"params": sae.parameters(), "lr": 5e-3 / (n / 2**14) ** 0.5}]), 0.95
        )
        opt.train()
        schedule = None
    else:
        opt = torch.optim.Adam(sae.parameters(), lr=2e-4 / (n / 2**14) ** 0.5)
        warmup, decay = 100, max(1, int(0.2 * steps))
        factor = lambda s: max(0.0, min(1.0, (s + 1) / warmup, (steps - s) / decay))
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    since_fired = torch.zeros(n, device=args.device)
    for step in range(steps):
        x = train_ND[step * bs : (step + 1) * bs].to(args.device).float()
        if step == 0:
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        dead = since_fired >= args.dead_tokens if recipe == "adam" else None
        out = sae(x, dead_mask=dead)
        (out.fvu + (out.auxk_loss / 32 if recipe == "adam" else 0)).backward()
        since_fired += len(x)
        since_fired[out.latent_indices.flatten()] = 0
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        if schedule is not None:
            schedule.step()
    if recipe == "signum":
        opt.eval()  # schedule-free: score the averaged weights
    sae.set_decoder_norm_to_unit_norm()

    def encode(x: Tensor) -> SparseCodes:
        top = sae.encode(x.float())
        return SparseCodes(top.top_acts, top.top_indices, n)

    decode = lambda c: sae.decode(c.values, c.indices)
    return PeerSAE(d, n, encode, decode, sae.W_dec.detach()).to(args.device)


def run_saelens(train_ND: Tensor, budget: int, args: argparse.Namespace) -> SAE:
    """SAELens' TopK training SAE through its own `SAETrainer`, default `SAETrainerConfig` values."""
    from sae_lens.config import LoggingConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer, SAETrainerConfig

    d, bs = train_ND.shape[1], args.batch_size
    cfg = TopKTrainingSAEConfig(d_in=d, d_sae=args.n_features, k=args.k, device=args.device)
    sae = TopKTrainingSAE(cfg)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=budget,
        train_batch_size_samples=bs,
        device=args.device,
        logger=LoggingConfig(log_to_wandb=False),
        n_batches_for_norm_estimate=10,
        lr_end=SAETrainerConfig.lr / 10,
    )  # what SAELens' runner config sets
    batches = (train_ND[i : i + bs].to(args.device).float() for i in range(0, budget - bs + 1, bs))
    SAETrainer(trainer_cfg, sae, batches).fit()
    sae.eval()
    return PeerSAE(d, args.n_features, sae.encode, sae.decode, sae.W_dec.detach()).to(args.device)


# ----------------------------------------------------------------------------------------- runs and report
def score(sae: SAE, eval_ND: Tensor, args: argparse.Namespace) -> dict[str, float]:
    sae = sae.to(args.device)
    r = metrics.evaluate(sae, (x.float() for x in eval_ND.split(8192)))
    return {"fvu": r["fvu"], "l0": r["l0"], "dead": r["dead_fraction"]}


@torch.no_grad()
def prefix_fvus(sae: SAE, eval_ND: Tensor, args: argparse.Namespace) -> list[float]:
    """A Matryoshka SAE's held-out FVU of each dictionary prefix alone (features past it zeroed)."""
    widths = sae.cfg.prefix_widths()
    err, total, sq = torch.zeros(len(widths), dtype=torch.float64), None, 0.0
    for x in eval_ND.split(8192):
        x = x.to(args.device).float()
        codes = as_dense(sae.encode(x)).float()
        for i, w in enumerate(widths):
            x_hat = sae.decode(torch.cat([codes[:, :w], codes.new_zeros(len(x), codes.shape[1] - w)], 1))
            err[i] += (x - x_hat.float()).pow(2).sum().item()
        total = x.sum(0).double().cpu() + (0 if total is None else total)
        sq += x.double().pow(2).sum().item()
    var = sq - total.pow(2).sum().item() / len(eval_ND)
    return (err / var).tolist()


def run_one(name: str, budget: int, data: tuple[Tensor, Tensor, Tensor], args: argparse.Namespace) -> dict:
    """Train and score recipe `name` at `budget` tokens: a row of the table."""
    train_ND, calib_ND, eval_ND = data
    start, extra = time.perf_counter(), {}
    library, _, variant = name.partition(" ")
    try:
        if library == "mmsae":
            arch, _, mult = variant.partition(" lr×")
            steps = budget // args.batch_size
            base = get_sae_class(arch.partition("[")[0]).default_lr_scale(
                steps, args.batch_size
            ) * default_lr(args.n_features, steps, args.batch_size)
            lr = float(mult) * base if mult else None
            sae = run_mmsae(arch, train_ND, budget, args, lr)
            if hasattr(sae, "selection_score"):  # the BatchTopK family: L0 as trained, then θ calibrated
                extra["l0_learnt_theta"] = score(sae, eval_ND, args)["l0"]
                calibrate_threshold(sae, eval_ND)  # the frontier point: held-out L0 = k exactly
                extra["fvu_at_k"] = score(sae, eval_ND, args)["fvu"]
                if hasattr(sae, "prefix_reconstructions"):
                    extra["prefix_fvu"] = prefix_fvus(sae, eval_ND, args)
                extra["theta"] = calibrate_threshold(sae, calib_ND)
            elif getattr(sae.cfg, "target_l0", None) is not None:  # the target is met on training photos
                extra["l0_calib"] = score(sae, calib_ND, args)["l0"]
        elif library == "sparsify":
            sae = run_sparsify(variant, train_ND, budget, args)
        else:
            sae = run_saelens(train_ND, budget, args)
    except ImportError as e:  # a peer that is not installed is reported, not silently dropped
        return {"recipe": name, "tokens": budget, "note": f"not importable here: {e}"}
    seconds = time.perf_counter() - start
    return {"recipe": name, "tokens": budget, **score(sae, eval_ND, args), "seconds": seconds, **extra}


def tokens_to_reach(target: float, points: list[tuple[int, float]], rtol: float = 1e-3) -> float:
    """Tokens at which the FVU-vs-budget curve `points` reaches `target` (log-linear between budgets);
    inf past the last budget, the first budget if it is already below. Within `rtol` counts as reached:
    runs differ by more than that (the last budget's default and tuned runs can tie to 5 digits)."""
    points = sorted(points)
    if points[0][1] <= target:
        return float(points[0][0])
    for (t0, f0), (t1, f1) in itertools.pairwise(points):
        if f1 <= target:
            frac = (f0 - target) / (f0 - f1)
            return math.exp(math.log(t0) + frac * (math.log(t1) - math.log(t0)))
    return float(points[-1][0]) if points[-1][1] <= target * (1 + rtol) else math.inf


def efficiency(rows: list[dict]) -> list[dict]:
    """Per budget: the best tuned FVU (the sweep and the default), and tokens the default needs for it / b."""
    by_name: dict[str, dict[int, float]] = {}
    for r in rows:
        if "fvu" in r and (r["recipe"] == "mmsae topk" or r["recipe"].startswith("mmsae topk lr×")):
            by_name.setdefault(r["recipe"], {})[r["tokens"]] = r["fvu"]
    default = by_name.get("mmsae topk", {})
    out = []
    for budget in sorted(default):
        best_name, best = min(((n, f[budget]) for n, f in by_name.items() if budget in f), key=lambda x: x[1])
        needed = tokens_to_reach(best, list(default.items()))
        out.append({"tokens": budget, "best": best_name, "best_fvu": best, "ratio": needed / budget})
    return out


def report(rows: list[dict], eff: list[dict], args: argparse.Namespace, n_eval: int) -> str:
    budgets = sorted({r["tokens"] for r in rows})
    names = list(dict.fromkeys(r["recipe"] for r in rows))
    cell = {(r["recipe"], r["tokens"]): r for r in rows}
    lines = [
        f"{args.encoder} `{args.hook}` patch tokens (d = {args.d_in}), n_features={args.n_features}, "
        f"k={args.k}, batch {args.batch_size}, {n_eval:,} held-out tokens, device {args.device}. "
        "Held-out FVU (L0, dead %) of a whole run at each token budget.",
        "",
        "| recipe | " + " | ".join(f"{b:,}" for b in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    for name in names:
        cells = []
        for b in budgets:
            r = cell.get((name, b))
            if r is None:
                cells.append("")
            elif "note" in r:
                cells.append(r["note"])
            else:
                learnt = (
                    f", θ learnt: L0 {r['l0_learnt_theta']:.1f}; at held-out L0 {args.k}: {r['fvu_at_k']:.4f}"
                    if "l0_learnt_theta" in r
                    else ""
                )
                if "l0_calib" in r:
                    learnt += f"; L0 {r['l0_calib']:.1f} on unseen tokens of training photos"
                if "prefix_fvu" in r:
                    learnt += "; prefixes alone: " + " / ".join(f"{f:.3f}" for f in r["prefix_fvu"])
                cells.append(f"{r['fvu']:.4f} (L0 {r['l0']:.1f}, {100 * r['dead']:.2f} %{learnt})")
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    if not eff:  # no TopK rows (`--only-more-archs`): nothing to compare the tuning sweep with
        return "\n".join(lines) + "\n"
    lines += [
        "",
        "| budget | best tuned | its FVU | tokens the default needs for it ÷ budget |",
        "|---|---|---|---|",
    ]
    for e in eff:
        lines.append(f"| {e['tokens']:,} | `{e['best']}` | {e['best_fvu']:.4f} | {e['ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def recipes(args: argparse.Namespace) -> list[tuple[str, int]]:
    top = max(args.budgets)
    more = args.budgets if args.more_archs_every_budget else [top]
    if args.only_more_archs:
        return [(f"mmsae {a}", b) for a in args.more_archs for b in more]
    plan = [("mmsae topk", b) for b in args.budgets]
    plan += [(f"mmsae topk lr×{m:g}", b) for m in args.lr_mults for b in args.budgets]
    plan += [(f"mmsae {a}", b) for a in ("batchtopk", "matryoshka") for b in args.budgets]
    plan += [(f"mmsae {a}", b) for a in args.more_archs for b in more]  # their dead % on these tokens
    plan += [(f"sparsify {r}", b) for r in ("signum", "adam") for b in args.budgets]
    plan += [("saelens", top)] if importlib.util.find_spec("sae_lens") else []
    return plan


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hook", default="blocks.9")
    ap.add_argument(
        "--budgets", type=int, nargs="+", default=[500_000, 1_000_000, 2_000_000, 4_000_000, 8_000_000]
    )
    ap.add_argument("--lr-mults", type=float, nargs="*", default=[0.5, 2.0], help="the tuning sweep")
    ap.add_argument("--eval-tokens", type=int, default=262_144)
    ap.add_argument("--calib-tokens", type=int, default=65_536, help="training tokens for θ (not trained on)")
    ap.add_argument(
        "--more-archs",
        nargs="*",
        default=["abstopk", "archetypal", "batchtopk[score=activation]"],
        help="at the top budget",
    )
    ap.add_argument(
        "--only-more-archs", action="store_true", help="train only the `--more-archs` rows (no TopK, peers)"
    )
    ap.add_argument(
        "--more-archs-every-budget",
        action="store_true",
        help="train the `--more-archs` rows at every budget, not only the top one",
    )
    ap.add_argument("--n-features", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--dead-tokens", type=int, default=10_000_000, help="sparsify adam's AuxK dead window")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int, default=8, help="crop loader processes")
    ap.add_argument("--cache", type=Path, default=None, help="keep the extracted tokens here")
    ap.add_argument(
        "--tokens-file", type=Path, default=None, help="a saved [N, d] tensor instead of extracting"
    )
    ap.add_argument("--tiny", action="store_true", help="random-init tiny ViT, 2 small budgets: a smoke run")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="write the Markdown tables here")
    args = ap.parse_args(argv)
    args.encoder = ENCODER
    if args.tiny:  # timm's test_vit: d = 64, 8×8 patches of 128 px, blocks.0 and .1
        args.encoder, args.hook, args.budgets, args.lr_mults = TINY_ENCODER, "blocks.1", [8192, 16384], [2.0]
        args.eval_tokens, args.calib_tokens, args.n_features, args.k = 4096, 2048, 256, 8
        args.batch_size, args.workers = 1024, 0
    torch.manual_seed(0)
    start = time.perf_counter()
    all_ND, eval_ND = tokens(args)
    if args.tokens_file:
        args.encoder, args.hook = str(args.tokens_file.name), "given"
    train_ND, calib_ND = all_ND[: max(args.budgets)], all_ND[max(args.budgets) :]
    args.d_in = train_ND.shape[1]
    if args.device != "cpu":  # one copy (fp16) for every run; mmsae.train takes data already on the GPU
        train_ND, calib_ND = train_ND.to(args.device), calib_ND.to(args.device)
    print(f"tokens: {len(train_ND):,} train, {len(eval_ND):,} held-out, {time.perf_counter() - start:.0f} s")
    rows: list[dict] = []
    for name, budget in recipes(args):
        rows.append(run_one(name, budget, (train_ND, calib_ND, eval_ND), args))
        print(json.dumps(rows[-1]), flush=True)
    eff = efficiency(rows)
    text = report(rows, eff, args, len(eval_ND))
    if not importlib.util.find_spec("sae_lens"):
        text += "\nSAELens is not importable here: not run.\n"
    text += f"\nTotal {time.perf_counter() - start:.0f} s.\n"
    print(text)
    if args.out:
        atomic_write_bytes(args.out, text.encode())
    if args.json:
        payload = {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "efficiency": eff}
        atomic_write_bytes(args.json, json.dumps(payload, indent=1).encode())


if __name__ == "__main__":
    main()
