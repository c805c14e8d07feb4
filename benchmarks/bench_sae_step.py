"""Mtok/s of one TopK SAE training step (bf16 autocast fwd + bwd + Adam) on one CUDA GPU.

Compares a plain dense torch TopK, sparsify's SparseCoder (EleutherAI, PyPI `eai-sparsify`,
installed only in the benchmark environment), mmsae's TopKSAE with the Triton kernels, and the
encoder-GEMM floor (x·W_encᵀ in bf16 alone). `mmsae_graph` is the same mmsae step replayed as one CUDA
graph (`mmsae.trainer.graphs.GraphedStep`, what the trainer does); `mmsae_trainer_step` is the trainer's own
graphed step (`SAEModule._step`, timed inside a Lightning fit: input scaling, AuxK, grad clipping, decoder
projection and renormalisation, dead-feature clocks, no metrics as on non-logging steps), so the cost of the
trainer's extras shows beside the bare step. The peers step torch's fused Adam; mmsae
steps the Adam its trainer uses (`mmsae.kernels.optim.Adam`: torch's Adam, same arithmetic and state, whose
CUDA step is one Triton pass per weight that also writes the 16-bit weight copies). Peak memory is torch's
max allocated during the step; the ratio column takes the faster mmsae row. Times are per call of calls issued
back to back, as in a training loop (`time_ms`).

    python benchmarks/bench_sae_step.py                 # the four benchmark sizes
    python benchmarks/bench_sae_step.py --sizes 0 --tune-select
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmsae.kernels.optim import Adam


@dataclass(frozen=True)
class Size:
    d: int
    n: int
    k: int
    B: int


SIZES = [
    Size(768, 16384, 32, 16384),
    Size(768, 65536, 32, 16384),
    Size(1024, 65536, 64, 8192),
    Size(4096, 131072, 64, 4096),
]


def time_ms(fn: Callable[[], object], warmup: int, reps: int, rounds: int = 3) -> float:
    """Milliseconds per call of `reps` calls issued back to back between two CUDA events, median of `rounds`.

    Back to back as a training loop issues its steps: the host runs ahead, so launch overhead only shows
    where it exceeds the GPU's work (an eager step at small sizes). Timing each call alone, synchronised,
    would add the host's latency before its first kernel to every step (60–130 µs of the graphed step)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


class DenseTopK(nn.Module):
    """The plain torch baseline: dense pre-activations, torch.topk, dense scatter + decoder GEMM."""

    def __init__(self, d: int, n: int, k: int):
        super().__init__()
        self.k = k
        self.W_enc = nn.Parameter(torch.randn(n, d) / d**0.5)
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.W_dec = nn.Parameter(self.W_enc.detach().clone())
        self.b_dec = nn.Parameter(torch.zeros(d))

    def loss(self, x: Tensor) -> Tensor:
        pre = F.linear(x - self.b_dec, self.W_enc, self.b_enc)
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        codes = torch.zeros_like(pre).scatter(-1, indices, values.relu())
        x_hat = codes @ self.W_dec + self.b_dec
        return (x_hat.float() - x.float()).pow(2).sum() / (x.float() - x.float().mean(0)).pow(2).sum()


def make_step(name: str, s: Size) -> tuple[nn.Module, Callable[[Tensor], Tensor]]:
    if name == "dense_torch":
        model = DenseTopK(s.d, s.n, s.k).cuda()
        return model, model.loss
    if name == "sparsify":
        sys.path.insert(0, str(Path(__file__).resolve().parent))  # `-P` leaves the script's folder out
        from peers import import_sparsify

        sparse_coder = import_sparsify()  # without its trainer's `datasets`/`transformers` imports
        config = sparse_coder.SparseCoderConfig(num_latents=s.n, k=s.k)
        model = sparse_coder.SparseCoder(s.d, config, device="cuda", dtype=torch.float32)
        return model, lambda x: model(x).fvu
    if name in ("mmsae", "mmsae_graph"):
        from mmsae import kernels
        from mmsae.sae.base import build_sae

        kernels.set_backend("triton")
        model = build_sae("topk", s.d, s.n, k=s.k, aux_k=0).cuda().train()

        def loss(x: Tensor) -> Tensor:
            # TopKSAE.loss without AuxK (aux_k=0), as sparsify's fvu (its AuxK check syncs the host every
            # step); in training mode the forward computes it with the decoder (`kernels.decode_with_mse`).
            return model.loss(x, model(x)).loss

        return model, loss
    raise ValueError(f"unknown implementation {name!r}")


def bench_trainer_step(s: Size, x: Tensor, reps: int, warm_steps: int = 8) -> dict[str, float]:
    """GPU time of the trainer's graphed step (`SAEModule._step` as `training_step` replays it on a
    non-logging step), timed from inside a bf16-mixed Lightning fit once its graph is captured."""
    import lightning as L

    from mmsae import kernels
    from mmsae.trainer import SAEDataModule, SAEModule, SAESpec

    kernels.set_backend("auto")
    result: dict[str, float] = {}

    class TimeStep(L.Callback):
        def on_train_batch_end(
            self, trainer: L.Trainer, module: SAEModule, outputs: object, batch: Tensor, batch_idx: int
        ) -> None:
            if batch_idx + 1 != warm_steps:
                return
            graphed = module._graphed
            assert graphed is not None and graphed.disabled is None and graphed.graphs, graphed.disabled
            key = tuple(sae.loss_structure(c.count()) for sae, c in zip(module.saes, module.clocks))
            replays = graphed.replays
            # The training batches' dtype and shape: the same captured graph.
            result["ms"] = time_ms(lambda: graphed(x16, key, metrics=False), warmup=2, reps=reps)
            assert graphed.replays > replays + reps, "the timed calls must be replays"
            result["dead"] = float(module.clocks[0].count())
            trainer.should_stop = True

    x16 = x.half()
    module = SAEModule(  # one step per loop iteration: the callback runs after each step
        [SAESpec("topk", s.n, s.k)], d_in=s.d, warmup_steps=10, cuda_graphs=True, steps_per_iteration=1
    )
    data = SAEDataModule(x16.repeat(2, 1), tokens=4 * warm_steps * s.B, batch_size=s.B)
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        max_epochs=1,
        precision="bf16-mixed",
        logger=False,
        log_every_n_steps=10**6,  # no logging step after the first: the metrics-free graph is timed
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[TimeStep()],
    )
    torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, datamodule=data)
    return {
        **result,
        "mtok_s": s.B / result["ms"] / 1e3,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def bench_impl(name: str, s: Size, x: Tensor, reps: int, profile: bool = False) -> dict[str, float]:
    if name == "mmsae_trainer_step":
        return bench_trainer_step(s, x, reps)
    model, loss_fn = make_step(name, s)
    # mmsae_graph: the mmsae step replayed as one CUDA graph by the trainer's GraphedStep, which needs a
    # capturable Adam with a device LR and autocast without its weight-cast cache.
    graphed = name == "mmsae_graph"
    lr = torch.tensor(1e-4, device="cuda") if graphed else 1e-4
    # mmsae: the trainer's optimizer. Peers: torch's fused Adam, the fastest torch offers.
    adam = Adam if name.startswith("mmsae") else torch.optim.Adam
    opt = adam(model.parameters(), lr=lr, fused=True, capturable=graphed)

    def step_fn(x_BD: Tensor) -> dict[str, Tensor]:
        opt.zero_grad(set_to_none=True)  # graphed: gradients are allocated in the graph's pool
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not graphed):
            loss = loss_fn(x_BD)
        loss.backward()
        opt.step()
        return {"loss": loss.detach()}

    if graphed:
        from mmsae.trainer.graphs import GraphedStep

        runner = GraphedStep(step_fn)
        step: Callable[[], object] = partial(runner, x)
        for _ in range(runner.warmup):  # eager warm-ups; the call after them captures
            step()
    else:
        step = partial(step_fn, x)
    step()
    torch.cuda.synchronize()
    if profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        print(
            f"--- {name} {s}", prof.key_averages().table(sort_by="cuda_time_total", row_limit=14), flush=True
        )
    torch.cuda.reset_peak_memory_stats()
    ms = time_ms(step, warmup=2, reps=reps)
    if graphed:
        assert runner.replays > reps and runner.disabled is None, runner.disabled
    peak = torch.cuda.max_memory_allocated() / 2**30
    return {"ms": ms, "mtok_s": s.B / ms / 1e3, "peak_gib": peak}


def bench_floor(s: Size, x: Tensor, reps: int) -> dict[str, float]:
    W = torch.randn(s.n, s.d, device="cuda", dtype=torch.bfloat16)
    xb = x.bfloat16()
    ms = time_ms(lambda: xb @ W.T, warmup=3, reps=reps)
    return {"ms": ms, "mtok_s": s.B / ms / 1e3, "tflops": 2 * s.B * s.n * s.d / ms / 1e9}


def bench_adam(s: Size, reps: int) -> dict[str, float]:
    """One optimizer step over the SAE's weights (W_enc, W_dec, biases), replayed as a CUDA graph (device
    time, as in the graphed step): torch's fused Adam, then mmsae's writing the bf16 copies of both matrices
    (what a forward under autocast asks for), against Adam's bandwidth floor (28 bytes per fp32 weight: read
    weight, gradient and moments, write weight and moments)."""
    out = {}
    for name, adam in (("torch_fused_ms", torch.optim.Adam), ("mmsae_ms", Adam)):
        params = [
            nn.Parameter(torch.randn(shape, device="cuda"))
            for shape in ((s.n, s.d), (s.n,), (s.n, s.d), (s.d,))
        ]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = adam(params, lr=torch.tensor(1e-4, device="cuda"), fused=True, capturable=True)
        if adam is Adam:
            for W in (params[0], params[2]):
                opt.weight_copies.cast(W, torch.bfloat16)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                opt.step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            opt.step()
        out[name] = time_ms(graph.replay, warmup=2, reps=reps)
        del graph, opt, params
        torch.cuda.empty_cache()
    out["floor_ms"] = 28 * (2 * s.n * s.d + s.n + s.d) / 3.0e9  # at the ~3.0 TB/s measured copy rate
    return out


def bench_select(s: Size, reps: int, tune: bool) -> dict[str, float]:
    """torch.topk vs the group, bound and bisection selects on bf16 pre-activations."""
    from mmsae.kernels.triton_select import GroupConfig, topk_select_into

    pre = torch.randn(s.B, s.n, device="cuda", dtype=torch.bfloat16)
    values = pre.new_empty(s.B, s.k)
    indices = torch.empty(s.B, s.k, dtype=torch.int64, device="cuda")
    out = {"torch_topk_ms": time_ms(lambda: pre.topk(s.k, dim=-1, sorted=False), 2, reps)}
    for method in ("group", "bound", "bisect"):
        out[f"{method}_ms"] = time_ms(partial(topk_select_into, pre, s.k, values, indices, method), 2, reps)
    out["hbm_read_ms"] = pre.numel() * 2 / 3.0e9  # one read of pre at ~3.0 TB/s (measured copy rate)
    if tune:
        for group in (16, 32, 64):
            for warps in (1, 2, 4):
                for rows in (16, 32):
                    n_groups = -(-s.n // group)
                    if not 2 * s.k <= n_groups <= 8192:
                        continue
                    cfg = GroupConfig(group, warps, rows)
                    run = partial(topk_select_into, pre, s.k, values, indices, "group", group=cfg)
                    out[f"group_g{group}_w{warps}_r{rows}_ms"] = time_ms(run, 2, reps)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", type=int, nargs="*", default=list(range(len(SIZES))), help="indices into SIZES"
    )
    parser.add_argument(
        "--impls",
        nargs="*",
        default=["dense_torch", "sparsify", "mmsae", "mmsae_graph", "mmsae_trainer_step"],
        help="also: mmsae_trainer_step (the trainer's full graphed step)",
    )
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--tune-select", action="store_true", help="also time select and gather tile configs")
    parser.add_argument("--profile", nargs="*", default=[], help="print the CUDA kernel table of these impls")
    parser.add_argument("--json", help="write all numbers here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_sae_step needs a CUDA GPU.")
    results = measure(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results},
                f,
                indent=1,
            )
    print_tables(args, results)


def measure(args: argparse.Namespace) -> list[dict[str, object]]:
    results = []
    for i in args.sizes:
        s = SIZES[i]
        x = torch.randn(s.B, s.d, device="cuda", dtype=torch.bfloat16)
        row: dict[str, object] = {"size": asdict(s), "floor": bench_floor(s, x, args.reps)}
        row["select"] = bench_select(s, args.reps, args.tune_select)
        row["adam"] = bench_adam(s, args.reps)
        for name in args.impls:
            try:
                row[name] = bench_impl(name, s, x, args.reps, name in args.profile)
            except Exception as err:  # a missing peer must not hide the other numbers
                row[name] = {"error": f"{type(err).__name__}: {err}"}
            torch.cuda.empty_cache()
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def print_tables(args: argparse.Namespace, results: list[dict]) -> None:
    print(
        f"\n{torch.cuda.get_device_name()}  torch {torch.__version__}  "
        f"bf16 autocast, Adam (peers: torch's fused), {args.reps} steps back to back, median of 3"
    )
    header = f"{'d':>5} {'n':>7} {'k':>3} {'B':>6} | " + " | ".join(
        f"{n:>18}" for n in [*args.impls, "GEMM floor"]
    )
    print(header + " |  mmsae/sparsify  | select ms: torch.topk  group  bound  bisect")
    for row in results:
        s = row["size"]
        cells = []
        for name in args.impls:
            r = row[name]
            cells.append(
                f"{'error':>18}" if "error" in r else f"{r['mtok_s']:7.2f} Mt/s {r['peak_gib']:5.1f}G"
            )
        cells.append(f"{row['floor']['mtok_s']:7.2f} Mt/s {row['floor']['tflops']:4.0f}TF")
        ratio = "-"
        best = max(
            (row[m]["mtok_s"] for m in ("mmsae", "mmsae_graph") if "mtok_s" in row.get(m, {})), default=None
        )
        if "mtok_s" in row.get("mmsae_graph", {}) and "mtok_s" in row.get("mmsae_trainer_step", {}):
            trainer_ratio = row["mmsae_trainer_step"]["mtok_s"] / row["mmsae_graph"]["mtok_s"]
            row["trainer_over_step"] = trainer_ratio
        if best is not None and "mtok_s" in row.get("sparsify", {}):
            ratio = f"{best / row['sparsify']['mtok_s']:.2f}x"
        sel = row["select"]
        print(
            f"{s['d']:>5} {s['n']:>7} {s['k']:>3} {s['B']:>6} | "
            + " | ".join(cells)
            + f" | {ratio:>15} | {sel['torch_topk_ms']:20.3f}"
            + f"  {sel['group_ms']:8.3f}  {sel['bound_ms']:8.3f}  {sel['bisect_ms']:9.3f}"
        )
    print(
        "\nThe trainer's graphed step (clip, projection, renormalisation, AuxK, dead clocks) / the bare one"
    )
    for row in results:
        if "trainer_over_step" in row:
            s = row["size"]
            print(f"{s['d']:>5} {s['n']:>7} {s['k']:>3} {s['B']:>6} | {row['trainer_over_step']:.2f}")
    print("\nAdam step over W_enc, W_dec and biases, graph replays, ms (mmsae's writes both bf16 copies too)")
    print(f"{'d':>5} {'n':>7} | torch fused |  mmsae | 28 B/weight at 3.0 TB/s")
    for row in results:
        s, adam = row["size"], row["adam"]
        print(
            f"{s['d']:>5} {s['n']:>7} | {adam['torch_fused_ms']:11.3f} | {adam['mmsae_ms']:6.3f} | "
            f"{adam['floor_ms']:8.3f}"
        )


if __name__ == "__main__":
    main()
