"""Training-recipe study: held-out FVU against training tokens for mmsae recipes and a plain reference loop.

Every recipe trains on the same tokens and is scored on the same held-out tokens at `--points` token counts
during the run (the curve) and at the end (FVU, L0, dead %, and for synthetic data the fraction of the true
directions recovered at cos > 0.9). Prints a Markdown table; `--json` keeps the curves, `--plot` draws them
(`--plot-from a.json b.json --plot curves.png` draws saved runs side by side).

Recipes (`--recipes`, each `name[key=value,...]`):
- `mmsae[...]`: `SAEModule` as `mmsae.train` runs it; keys: arch, lr (absolute), lr_mult (× Gao et al.'s
  2e-4/√(n/2¹⁴), the long-run rule), warmup (steps), decay (fraction), clip, norm (0/1: input scaling),
  bdec ('median' | 'mean'), enc ('fit': the encoder rescaled so that the first batch's reconstruction has
  the least-squares scale), and any SAE option (aux_k, dead_tokens, ...). Unset keys keep mmsae's defaults.
- `plain[...]`: a plain Adam TopK loop modelled on sparsify's trainer (unit-norm decoder, parallel-gradient
  removal, b_dec = mean of the first batch, raw inputs); keys: lr (default sparsify's 2e-4/√(n/2¹⁴)),
  warmup, decay, enc_init ('transpose' | 'linear': nn.Linear's init, as sparsify's SparseCoder), aux (0/1:
  AuxK, k_aux = d/2, coef 1/32), dead_tokens.

Data (`--data`): `synthetic` (`SyntheticActivations`, `--d`, `--n-directions`), or real activations of
augmented crops of the zoo's photos (`mmsae zoo install`): `dinov2:blocks.9`, `mobilenet:blocks.5`,
`efficientnet:blocks.4`, ... — extracted once into `--cache`. Held-out tokens come from photos the
training crops never use.

    python benchmarks/bench_recipe.py --data synthetic --d 64 --n-directions 512 --n-features 1024 --k 8 \\
        --tokens 800000 --batch-size 1024 --recipes mmsae 'plain[lr=8e-3]'
    python benchmarks/bench_recipe.py --data dinov2:blocks.9 --n-features 1024 --k 16 --tokens 500000 \\
        --batch-size 1024 --recipes mmsae 'plain[lr=1e-3,warmup=100]' --plot curves.png
"""

from __future__ import annotations

import argparse
import ast
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from mmsae import metrics
from mmsae.datasets.synthetic import SyntheticActivations
from mmsae.fileio import atomic_write_bytes
from mmsae.sae import default_lr
from mmsae.trainer.data import SAEDataModule
from mmsae.trainer.module import SAEModule, SAESpec

HELD_OUT = 2**40
ZOO_MODELS = {
    "dinov2": "timm:vit_small_patch14_dinov2",
    "mobilenet": "timm:mobilenetv2_100",
    "efficientnet": "timm:tf_efficientnet_lite0",
}


@dataclass
class Problem:
    train_ND: Tensor
    eval_ND: Tensor
    n_features: int
    k: int
    batch_size: int
    features: Tensor | None
    label: str

    @property
    def tokens(self) -> int:
        return len(self.train_ND)


def parse_recipe(spec: str) -> tuple[str, dict[str, Any]]:
    """'plain[lr=4e-3,warmup=100]' → ('plain', {'lr': 0.004, 'warmup': 100})."""
    name, _, rest = spec.partition("[")
    if not rest:
        return name, {}
    if not rest.endswith("]"):
        raise ValueError(f"Recipe {spec!r}: write options as name[key=value,...].")
    pairs = [item.split("=", 1) for item in rest[:-1].split(",")]
    if any(len(p) != 2 for p in pairs):
        raise ValueError(f"Recipe {spec!r}: every option needs key=value.")
    out = {}
    for key, value in pairs:
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except ValueError:
            out[key.strip()] = value.strip()
    return name, out


@torch.no_grad()
def heldout_fvu(encode_decode, eval_ND: Tensor, chunk: int = 8192) -> float:
    """Σ‖x − x̂‖² / Σ‖x − x̄‖² over the held-out tokens, float64 sums."""
    err, x64 = 0.0, eval_ND.double()
    for x in eval_ND.split(chunk):
        err += float((encode_decode(x).double() - x.double()).pow(2).sum())
    return err / float((x64 - x64.mean(0)).pow(2).sum())


def checkpoints(total_steps: int, points: int) -> list[int]:
    """Steps (1-based) after which the curve is sampled: geometric, ending at the last step."""
    raw = {max(1, round(total_steps ** ((i + 1) / points))) for i in range(points)}
    return sorted(raw | {total_steps})


# ----------------------------------------------------------------------------------------- mmsae recipes
class Curve(L.Callback):
    def __init__(self, eval_ND: Tensor, steps: list[int], batch_size: int):
        self.eval_ND, self.steps, self.batch_size = eval_ND, set(steps), batch_size
        self.points: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step not in self.steps:
            return
        sae, scale = module.saes[0], float(module.input_scale)
        sae.eval()
        self.points.append(
            (step * self.batch_size, heldout_fvu(lambda x: sae(x * scale).x_hat / scale, self.eval_ND))
        )
        sae.train()


def run_mmsae(p: Problem, opts: dict[str, Any], points: int) -> tuple[Any, list[tuple[int, float]]]:
    opts = dict(opts)
    arch = opts.pop("arch", "topk")
    lr = opts.pop("lr", None)
    if "lr_mult" in opts:
        lr = opts.pop("lr_mult") * default_lr(p.n_features)
    module_kw = {}
    for key, field in (("warmup", "warmup_steps"), ("decay", "decay_fraction"), ("clip", "grad_clip")):
        if key in opts:
            module_kw[field] = opts.pop(key)
    if "norm" in opts:
        module_kw["normalize_inputs"] = bool(opts.pop("norm"))
    bdec, enc = opts.pop("bdec", "median"), opts.pop("enc", "transpose")
    L.seed_everything(0, verbose=False)
    datamodule = SAEDataModule(p.train_ND, tokens=p.tokens, batch_size=p.batch_size, seed=0)
    spec = SAESpec(arch=arch, n_features=p.n_features, k=p.k, lr=lr, options=opts)
    module = SAEModule([spec], d_in=p.train_ND.shape[1], **module_kw)
    sae = module.saes[0]
    if bdec == "mean":
        sae.init_from_data = lambda x: sae.b_dec.data.copy_(x.float().mean(0))
    if enc == "fit":  # then scale the encoder so that the first batch's reconstruction has the best scale
        median_init = sae.init_from_data

        @torch.no_grad()
        def fitted(x: Tensor) -> None:
            median_init(x)
            e_ND = sae.decode(sae.encode(x)) - sae.b_dec
            c = float(((x - sae.b_dec) * e_ND).sum() / e_ND.pow(2).sum().clamp_min(1e-12))
            sae.W_enc.mul_(c)

        sae.init_from_data = fitted
    curve = Curve(p.eval_ND, checkpoints(p.tokens // p.batch_size, points), p.batch_size)
    trainer = L.Trainer(
        max_epochs=1,
        devices=1,
        accelerator="cpu",
        precision="32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[curve],
    )
    trainer.fit(module, datamodule=datamodule)
    return module.folded_sae(0), curve.points


# ----------------------------------------------------------------------------------------- plain reference
class PlainTopK(torch.nn.Module):
    def __init__(self, d: int, n: int, k: int, enc_init: str):
        super().__init__()
        W_dec = torch.randn(n, d)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        if enc_init == "linear":  # sparsify: nn.Linear's init for the encoder, W_dec its normalised copy
            lin = torch.nn.Linear(d, n)
            W_dec = lin.weight.detach().clone()
            W_enc = lin.weight.detach().clone()
            W_dec /= W_dec.norm(dim=1, keepdim=True)
        else:
            W_enc = W_dec.clone()
        self.W_enc, self.W_dec = torch.nn.Parameter(W_enc), torch.nn.Parameter(W_dec)
        self.b_enc, self.b_dec = torch.nn.Parameter(torch.zeros(n)), torch.nn.Parameter(torch.zeros(d))
        self.k = k

    def pre(self, x: Tensor) -> Tensor:
        return (x - self.b_dec) @ self.W_enc.T + self.b_enc

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        pre = self.pre(x)
        values, indices = pre.topk(self.k, dim=-1)
        values = values.relu()
        codes = torch.zeros_like(pre).scatter(-1, indices, values)
        return codes @ self.W_dec + self.b_dec, indices, pre


def run_plain(p: Problem, opts: dict[str, Any], points: int) -> tuple[Any, list[tuple[int, float]]]:
    torch.manual_seed(0)
    d = p.train_ND.shape[1]
    lr = opts.get("lr", default_lr(p.n_features))  # sparsify's rule, 2e-4/√(n/2¹⁴)
    warmup, decay = opts.get("warmup", 0), opts.get("decay", 0.0)
    model = PlainTopK(d, p.n_features, p.k, opts.get("enc_init", "transpose"))
    with torch.no_grad():
        model.b_dec.copy_(p.train_ND[: p.batch_size].mean(0))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    total = p.tokens // p.batch_size
    sample = set(checkpoints(total, points))
    since_fired = torch.zeros(p.n_features)
    dead_after, k_aux = opts.get("dead_tokens", 10_000_000), d // 2
    curve = []
    for step, x in enumerate(p.train_ND.split(p.batch_size)[:total]):
        factor = min(
            1.0, (step + 1) / warmup if warmup else 1.0, (total - step) / (decay * total) if decay else 1.0
        )
        for group in opt.param_groups:
            group["lr"] = lr * factor
        x_hat, indices, pre = model(x)
        var = (x - x.mean(0)).pow(2).sum(-1).mean()
        loss = (x_hat - x).pow(2).sum(-1).mean() / var
        fired = torch.zeros(p.n_features, dtype=torch.bool)
        fired[indices.flatten()] = True
        since_fired += len(x)
        since_fired[fired] = 0
        dead = since_fired >= dead_after
        if opts.get("aux", 0) and dead.any():
            n_aux = min(k_aux, int(dead.sum()))
            values, idx = pre.masked_fill(~dead, float("-inf")).topk(n_aux, dim=-1)
            codes = torch.zeros_like(pre).scatter(-1, idx, values.relu())
            e_hat = codes @ model.W_dec
            aux = (e_hat - (x - x_hat).detach()).pow(2).sum(-1).mean() / var
            loss = loss + aux / 32 * min(1.0, n_aux / k_aux)
        opt.zero_grad()
        loss.backward()
        with torch.no_grad():
            g, W = model.W_dec.grad, model.W_dec
            g -= (g * W).sum(1, keepdim=True) * W
        opt.step()
        with torch.no_grad():
            model.W_dec /= model.W_dec.norm(dim=1, keepdim=True)
        if step + 1 in sample:
            curve.append(((step + 1) * p.batch_size, heldout_fvu(lambda x: model(x)[0], p.eval_ND)))
    return model, curve


@torch.no_grad()
def final_metrics(sae: Any, p: Problem) -> dict[str, float]:
    if isinstance(sae, PlainTopK):
        fires = torch.zeros(p.n_features, dtype=torch.bool)
        for x in p.eval_ND.split(8192):
            fires[sae(x)[1].flatten()] = True
        out = {"fvu": heldout_fvu(lambda x: sae(x)[0], p.eval_ND), "l0": float(p.k)}
        out["dead_fraction"] = 1 - float(fires.float().mean())
        if p.features is not None:
            best = metrics.max_cosine(p.features, sae.W_dec)
            out["fraction_recovered"] = float((best > 0.9).float().mean())
        return out
    return metrics.evaluate(sae, p.eval_ND.split(8192), features=p.features)


# ----------------------------------------------------------------------------------------- data
def synthetic_problem(args: argparse.Namespace) -> tuple[Tensor, Tensor, Tensor]:
    data = SyntheticActivations(
        d=args.d, n_directions=args.n_directions, mean_active=args.mean_active, seed=0
    )
    train_ND = torch.cat(list(data.batches(2**16, args.tokens)))
    eval_ND = torch.cat(list(data.batches(2**14, args.eval_tokens, offset=HELD_OUT)))
    return train_ND, eval_ND, data.features


def zoo_photos() -> list[Path]:
    from mmsae.zoo import photo_dir

    files = [f for name in ("foolbox", "interior") for f in sorted(photo_dir(name).iterdir())]
    return [f for f in files if f.suffix.lower() in (".png", ".jpg", ".jpeg")]


@torch.no_grad()
def zoo_activations(model_hook: str, n_tokens: int, seed: int, photos: list[Path]) -> Tensor:
    """Patch tokens [N, d] at `hook` of augmented crops (random resized crop, flip) of `photos`."""
    from PIL import Image
    from torchvision import transforms as T

    from mmsae.encoders import get_encoder

    model_name, hook = model_hook.split(":")
    encoder = get_encoder(ZOO_MODELS[model_name], pretrained=True)
    cfg = encoder.model.pretrained_cfg
    size = cfg["input_size"][-1]
    augment = T.Compose(
        [
            T.RandomResizedCrop(size, scale=(0.1, 1.0)),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(cfg["mean"], cfg["std"]),
        ]
    )
    images = [Image.open(f).convert("RGB") for f in photos]
    for (
        image
    ) in images:  # crops are resized to `size` anyway; full-size photos would make that the bottleneck
        image.thumbnail((2 * size, 2 * size))
    torch.manual_seed(seed)
    out, got = [], 0
    while got < n_tokens:
        pixels = torch.stack([augment(images[int(i)]) for i in torch.randint(len(images), (16,))])
        tokens_ND = encoder.activations(pixels, [hook], tokens="patch")[hook].acts_ND.float()
        out.append(tokens_ND)
        got += len(tokens_ND)
    return torch.cat(out)[:n_tokens]


def real_problem(args: argparse.Namespace) -> tuple[Tensor, Tensor, None]:
    cache = Path(args.cache) / f"{args.data.replace(':', '_')}_{args.tokens}_{args.eval_tokens}.pt"
    if cache.exists():
        train_ND, eval_ND = torch.load(cache)
        return train_ND, eval_ND, None
    photos = zoo_photos()
    held = photos[::10]  # every tenth photo is held out: evaluation never sees a training photo
    train = [f for f in photos if f not in held]
    train_ND = zoo_activations(args.data, args.tokens, 0, train)
    eval_ND = zoo_activations(args.data, args.eval_tokens, 1, held)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save((train_ND, eval_ND), cache)
    return train_ND, eval_ND, None


# ----------------------------------------------------------------------------------------- report
def table(rows: list[dict], p: Problem) -> str:
    tokens = [t for t, _ in rows[0]["curve"]] if rows else []
    head = " | ".join(f"{t / 1000:.0f}k" for t in tokens)
    lines = [
        f"{p.label}: n_features={p.n_features}, k={p.k}, {p.tokens:,} tokens, batch {p.batch_size}, "
        f"{len(p.eval_ND):,} held-out tokens. Held-out FVU after the given training tokens.",
        "",
        f"| recipe | {head} | final FVU | L0 | dead % | recovered % | s |",
        "|---|" + "---|" * (len(tokens) + 5),
    ]
    for r in rows:
        curve = " | ".join(f"{f:.4f}" for _, f in r["curve"])
        rec = r.get("fraction_recovered")
        rec = f"{100 * rec:.1f}" if rec is not None else "–"
        lines.append(
            f"| `{r['recipe']}` | {curve} | {r['fvu']:.4f} | {r['l0']:.1f} | "
            f"{100 * r['dead_fraction']:.2f} | {rec} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(panels: list[dict], path: Path) -> None:
    """One panel per run (`{"label", "rows"}`, as `--json` writes): held-out FVU against tokens, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for r in panel["rows"]:
            t, f = zip(*r["curve"])
            ax.plot(t, f, marker="o", ms=3, label=r["recipe"])
        ax.set(
            xscale="log", yscale="log", xlabel="training tokens", ylabel="held-out FVU", title=panel["label"]
        )
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--data", default="synthetic", help="'synthetic' or '<dinov2|mobilenet|efficientnet>:<hook>'"
    )
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--n-directions", type=int, default=512)
    ap.add_argument("--mean-active", type=float, default=8.0)
    ap.add_argument("--n-features", type=int, default=1024)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=800_000)
    ap.add_argument("--eval-tokens", type=int, default=65_536)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--points", type=int, default=6)
    ap.add_argument("--recipes", nargs="+", default=["mmsae", "plain"])
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "mmsae" / "bench_recipe"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, help="write the Markdown table here")
    ap.add_argument("--json", type=Path, help="write the rows (curves included) here")
    ap.add_argument("--plot", type=Path, help="draw the curves into this PNG")
    ap.add_argument("--plot-from", type=Path, nargs="+", help="only draw these --json files (one panel each)")
    args = ap.parse_args(argv)
    if args.plot_from:
        plot([json.loads(f.read_text()) for f in args.plot_from], args.plot or Path("recipe_curves.png"))
        return
    torch.set_num_threads(args.threads)
    train_ND, eval_ND, features = synthetic_problem(args) if args.data == "synthetic" else real_problem(args)
    label = f"synthetic d={args.d}, {args.n_directions} directions" if args.data == "synthetic" else args.data
    p = Problem(train_ND, eval_ND, args.n_features, args.k, args.batch_size, features, label)
    rows = []
    for spec in args.recipes:
        name, opts = parse_recipe(spec)
        runner = {"mmsae": run_mmsae, "plain": run_plain}.get(name)
        if runner is None:
            raise SystemExit(f"Unknown recipe {name!r}: use mmsae[...] or plain[...].")
        start = time.perf_counter()
        sae, curve = runner(p, opts, args.points)
        rows.append(
            {"recipe": spec, "curve": curve, "seconds": time.perf_counter() - start, **final_metrics(sae, p)}
        )
        print(table(rows, p), flush=True)
        if args.out:
            atomic_write_bytes(args.out, table(rows, p).encode())
        if args.json:
            atomic_write_bytes(args.json, json.dumps({"label": label, "rows": rows}, indent=1).encode())
    if args.plot:
        plot([{"label": label, "rows": rows}], args.plot)


if __name__ == "__main__":
    main()
