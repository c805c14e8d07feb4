"""Quality on synthetic data: every registered SAE variant, plus sparsify and SAELens TopK, at equal tokens.

Data: `SyntheticActivations(d=256, n_directions=4096)` (`--d`, `--n-directions` for smaller problems); each
SAE sees the same `--tokens` training tokens and is scored on `--eval-tokens` held-out tokens (FVU, L0,
dead %, MMCS, fraction of the true directions recovered at cos > 0.9). Prints a Markdown table and writes
it (atomically) to `--out`.

    python benchmarks/bench_quality.py --tokens 2000000 --out quality.md
    python benchmarks/bench_quality.py --tokens 24000000 --n-features 4096 --k 8 \\
        --only topk batchtopk sparsify
    peers/bin/python benchmarks/bench_quality.py --only sparsify saelens   # peers, in their own venv

The peers are never project dependencies: install them in a separate venv that reuses this one's torch
(`eai-sparsify`, `sae-lens`). A peer that is not importable is reported in the table, not skipped silently.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import mmsae
from mmsae import metrics
from mmsae.datasets.synthetic import SyntheticActivations
from mmsae.fileio import atomic_write_bytes
from mmsae.sae import REGISTRY, SAE, SparseCodes

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling; `-P` leaves the script's folder out
from peers import PeerSAE, import_sparsify

HELD_OUT = 2**40  # evaluation tokens come from far beyond any training stream
COLUMNS = ["fvu", "l0", "dead_fraction", "mmcs", "fraction_recovered"]


@dataclass
class Setup:
    data: SyntheticActivations
    n_features: int
    k: int
    tokens: int
    batch_size: int
    eval_tokens: int
    device: str
    dead_tokens: int = 1_000_000
    """AuxK's dead window: the 10M-token default is meant for runs of billions of tokens."""
    lr: float | None = None
    """mmsae variants' lr; None = the library's default (`default_lr` of the run's size), what users get."""

    def __post_init__(self) -> None:
        # Generated once, on the device: every SAE trains on the same tokens. On a GPU the stream is drawn
        # there (seconds for 24M tokens); the CPU generator (~0.4M tokens/s) would take minutes.
        if self.device == "cpu":
            self.train_ND = torch.cat(list(self.data.batches(2**20, self.tokens)))
        else:
            self.train_ND = device_stream(self.data, self.tokens, self.device)

    def train_batches(self) -> Iterator[torch.Tensor]:
        return iter(self.train_ND.split(self.batch_size))

    def eval_batches(self) -> Iterator[torch.Tensor]:
        return self.data.batches(self.batch_size, self.eval_tokens, offset=HELD_OUT)


@torch.no_grad()
def device_stream(
    data: SyntheticActivations, n_tokens: int, device: str, chunk: int = 2**16, seed: int = 0
) -> torch.Tensor:
    """`n_tokens` fresh tokens [N, d] with the law of `data`'s stream, drawn on `device`.

    Same features, firing probabilities and coefficient law as `data.sample`, but not the same tokens
    (torch's generator, not numpy's): a dense [chunk, F] Bernoulli draw is nothing on a GPU. Held-out
    evaluation still uses `data.sample` far from offset 0.
    """
    if data.n_parents or bool(data.is_signed.any()) or data.noise > 0:
        raise ValueError(
            f"device_stream draws independent, unsigned, noise-free features only; {data} is "
            "not: generate it with data.batches(...) on the CPU instead."
        )
    gen = torch.Generator(device).manual_seed(seed)
    prob_F = data.root_prob.float().to(device)
    features_FD = data.features.to(device)
    low, width = 1 - data.magnitude / 2, data.magnitude
    out_ND = torch.empty(n_tokens, data.d, device=device)
    for start in range(0, n_tokens, chunk):
        rows = min(chunk, n_tokens - start)
        fire_CF = torch.rand(rows, data.n_directions, generator=gen, device=device) < prob_F
        coef_CF = low + width * torch.rand(rows, data.n_directions, generator=gen, device=device)
        torch.mm(coef_CF * fire_CF, features_FD, out=out_ND[start : start + rows])
    return out_ND


def parse_variant(name: str) -> tuple[str, dict[str, Any]]:
    """'relu[l1_coef=0.3,l1_warmup_steps=0]' → ('relu', {'l1_coef': 0.3, 'l1_warmup_steps': 0})."""
    arch, _, rest = name.partition("[")
    if not rest:
        return arch, {}
    if not rest.endswith("]"):
        raise ValueError(f"Variant {name!r}: write options as arch[key=value,...].")
    pairs = [item.split("=", 1) for item in rest[:-1].split(",")]
    if any(len(p) != 2 for p in pairs):
        raise ValueError(f"Variant {name!r}: every option needs key=value.")
    return arch, {key.strip(): ast.literal_eval(value.strip()) for key, value in pairs}


def run_mmsae(name: str, s: Setup) -> SAE:
    # Variants whose config has a default k are k-sparse and get the shared k; penalty-based ones
    # (relu, gated, jumprelu) keep their default sparsity unless options set it (e.g.
    # 'relu[l1_coef=0.5]', 'jumprelu[target_l0=4]'), so their L0 differs: read it in the table.
    arch, overrides = parse_variant(name)
    k_sparse = REGISTRY[arch].Config.__dataclass_fields__["k"].default is not None
    options = {"k": s.k, "dead_tokens": s.dead_tokens} if k_sparse else {"dead_tokens": s.dead_tokens}
    return mmsae.train(
        s.train_ND,
        sae=arch,
        n_features=s.n_features,
        tokens=s.tokens,
        batch_size=s.batch_size,
        lr=s.lr,
        devices=1,
        **options,
        **overrides,
    )


def run_sparsify(s: Setup) -> SAE:
    """sparsify's default recipe (its Trainer's step, minus the LM plumbing): SignSGD + schedule-free,
    lr 5e-3/√(n/2¹⁴), b_dec = mean of the first batch, unit-norm decoder, AuxK off (auxk_alpha=0)."""
    if s.device == "cpu":  # sparsify picks its Triton decoder whenever triton imports, even for CPU tensors
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    from schedulefree import ScheduleFreeWrapper

    sparse_coder = import_sparsify()  # without its trainer's `datasets`/`transformers` imports
    from sparsify.sign_sgd import SignSGD

    config = sparse_coder.SparseCoderConfig(num_latents=s.n_features, k=s.k)
    sae = sparse_coder.SparseCoder(s.data.d, config, device=s.device)
    opt = ScheduleFreeWrapper(
        SignSGD([{"params": sae.parameters(), "lr": 5e-3 / (s.n_features / 2**14) ** 0.5}]), momentum=0.95
    )
    opt.train()
    for step, x in enumerate(s.train_batches()):
        if step == 0:
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
    opt.eval()  # schedule-free: evaluate at the averaged weights
    sae.set_decoder_norm_to_unit_norm()

    def encode(x):
        top = sae.encode(x)
        return SparseCodes(top.top_acts, top.top_indices, s.n_features)

    return PeerSAE(
        s.data.d, s.n_features, encode, lambda c: sae.decode(c.values, c.indices), sae.W_dec.detach()
    ).to(s.device)


def run_saelens(s: Setup) -> SAE:
    """SAELens' TopK training SAE through its own SAETrainer with default SAETrainerConfig values."""
    from sae_lens.config import LoggingConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer, SAETrainerConfig

    cfg = TopKTrainingSAEConfig(d_in=s.data.d, d_sae=s.n_features, k=s.k, device=s.device)
    sae = TopKTrainingSAE(cfg)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=s.tokens,
        train_batch_size_samples=s.batch_size,
        device=s.device,
        logger=LoggingConfig(log_to_wandb=False),
        n_batches_for_norm_estimate=10,
        lr_end=SAETrainerConfig.lr / 10,
    )  # what SAELens' runner config sets
    SAETrainer(trainer_cfg, sae, iter(s.train_batches())).fit()
    sae.eval()
    W_dec = sae.W_dec.detach()
    return PeerSAE(s.data.d, s.n_features, sae.encode, sae.decode, W_dec).to(s.device)


PEERS: dict[str, Callable[[Setup], SAE]] = {"sparsify": run_sparsify, "saelens": run_saelens}


def benchmark(name: str, s: Setup) -> dict[str, float | str]:
    start = time.perf_counter()
    try:
        sae = PEERS[name](s) if name in PEERS else run_mmsae(name, s)
    except ImportError as e:
        return {"name": name, "note": f"not installed: {e}"}
    except Exception as e:  # one broken variant must not hide the others' numbers; it shows in the table
        return {"name": name, "note": f"failed: {type(e).__name__}: {e}"}
    seconds = time.perf_counter() - start
    result = metrics.evaluate(sae, s.eval_batches(), features=s.data.features)
    return {"name": name, **result, "seconds": seconds}


def table(rows: list[dict], s: Setup) -> str:
    lines = [
        f"d={s.data.d}, {s.data.n_directions} directions, n_features={s.n_features}, k={s.k}, "
        f"{s.tokens:,} training tokens, batch {s.batch_size}, {s.eval_tokens:,} held-out tokens, "
        f"mmsae lr {s.lr if s.lr is not None else 'default'}, device {s.device}.",
        "",
        "| SAE | FVU | L0 | dead % | MMCS | recovered % (cos > 0.9) | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "note" in r:
            lines.append(f"| {r['name']} | {r['note']} | | | | | |")
            continue
        lines.append(
            f"| {r['name']} | {r['fvu']:.4f} | {r['l0']:.1f} | {100 * r['dead_fraction']:.1f} | "
            f"{r['mmcs']:.3f} | {100 * r['fraction_recovered']:.1f} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2_000_000)
    p.add_argument("--eval-tokens", type=int, default=262_144)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--n-features", type=int, default=8192)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--mean-active", type=float, default=8.0)
    p.add_argument("--d", type=int, default=256, help="activation width of the synthetic data")
    p.add_argument("--n-directions", type=int, default=4096, help="true directions of the synthetic data")
    p.add_argument("--dead-tokens", type=int, default=1_000_000, help="AuxK dead window of mmsae variants")
    p.add_argument("--lr", type=float, default=None, help="mmsae variants' lr (default: the library's)")
    p.add_argument(
        "--only",
        nargs="*",
        help="SAE names to run (registered variants, 'sparsify', 'saelens'); "
        "config options as arch[key=value,...], e.g. 'relu[l1_coef=0.5]'",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, help="write the Markdown table here")
    args = p.parse_args(argv)
    data = SyntheticActivations(
        d=args.d, n_directions=args.n_directions, mean_active=args.mean_active, seed=0
    )
    s = Setup(
        data,
        args.n_features,
        args.k,
        args.tokens,
        args.batch_size,
        args.eval_tokens,
        args.device,
        args.dead_tokens,
        args.lr,
    )
    names = args.only or [*sorted(REGISTRY), *PEERS]
    rows = []
    for name in names:
        rows.append(benchmark(name, s))
        print(table(rows, s), flush=True)
        if args.out:  # after every SAE: a run cut short keeps the rows it finished
            atomic_write_bytes(args.out, table(rows, s).encode())


if __name__ == "__main__":
    main()
