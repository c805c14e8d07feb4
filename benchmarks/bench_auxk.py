"""AuxK's cost per training step: `TopKSAE.auxk_loss` forward + backward, sparse against dense.

`sparse` is the loss as training runs it: the k_aux dead features of each token are chosen without a
gradient from one GEMM whose bias is −∞ at live features (16-bit scores under autocast), and only their
pre-activations are recomputed with one (`kernels.encode_at`: k_aux dot products per token, the TopK encode's
sparse backward). `dense` is the same loss as AuxK ran before: the fp32 pre-activations of every feature,
masked and gathered in autograd, so that its backward writes a [B, n] gradient and runs two GEMMs over it.
Bf16 autocast on CUDA, as training; k_aux = d_in // 2 (Gao et al.), fewer for fewer dead features. Median
ms of forward + backward (`triton.testing.do_bench` on CUDA, wall clock on the CPU).

    python benchmarks/bench_auxk.py --device cuda         # batch 4096, n = 16384, d = 384 and 768
    python benchmarks/bench_auxk.py --device cuda --d 384 --dead 1024 --profile  # where the time goes
    python benchmarks/bench_auxk.py --device cpu --small  # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable

import torch
from bench_select import median_ms
from torch import Tensor

from mmsae import kernels
from mmsae.sae import DeadFeatures, TopKSAE, build_sae


def dense_auxk(sae: TopKSAE, x_BD: Tensor, x_hat_BD: Tensor, dead: DeadFeatures) -> Tensor:
    """`TopKSAE.auxk_loss` with the chosen codes gathered from the dense pre-activations in autograd."""
    masked_BN = sae.pre_acts(x_BD).masked_fill(~dead.mask, float("-inf"))
    indices = kernels.topk_indices(masked_BN, sae.aux_size(dead.count))
    values = masked_BN.gather(-1, indices).relu()
    return sae.aux_fit(x_BD, x_hat_BD, values, indices, dead.mask)


def auxk_step(
    sae: TopKSAE, x_BD: Tensor, dead: DeadFeatures, path: str, device: torch.device
) -> Callable[[], None]:
    """One forward + backward of AuxK's loss by `path`, as a function."""
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        x_hat_BD = sae(x_BD).x_hat.float()

    def run() -> None:
        with autocast:
            if path == "sparse":
                loss = sae.auxk_loss(x_BD, x_hat_BD, dead)
            else:
                loss = dense_auxk(sae, x_BD, x_hat_BD, dead)
        loss.backward()

    return run


def profile_table(run: Callable[[], None]) -> str:
    """The GPU kernels of 10 calls, after 3 unprofiled ones."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            run()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--d", type=int, nargs="+", default=[384, 768])
    ap.add_argument("--dead", type=int, nargs="+", default=[64, 1024, 8192])
    ap.add_argument("--profile", action="store_true", help="CUDA: the GPU kernels of each path, every row")
    ap.add_argument("--small", action="store_true", help="batch 64, n = 512, d = 32, 8 and 200 dead")
    args = ap.parse_args(argv)
    if args.small:
        args.batch, args.n, args.d, args.dead = 64, 512, [32], [8, 200]
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"AuxK forward + backward, batch {args.batch}, n = {args.n}, ms (median); {device}")
    print("| d | k_aux | dead | dense | sparse | sparse ÷ dense |\n|---:|---:|---:|---:|---:|---:|")
    for d in args.d:
        sae = build_sae("topk", d, args.n, k=32).to(device).train()
        assert isinstance(sae, TopKSAE)
        x_BD = torch.randn(args.batch, d, device=device)
        for n_dead in args.dead:
            dead_N = torch.zeros(args.n, dtype=torch.bool, device=device)
            dead_N[torch.randperm(args.n, device=device)[:n_dead]] = True
            dead = DeadFeatures(dead_N, n_dead)
            dense, sparse = (
                median_ms(auxk_step(sae, x_BD, dead, p, device), device) for p in ("dense", "sparse")
            )
            times = f"{dense:.3f} | {sparse:.3f} | {sparse / dense:.2f}"
            print(f"| {d} | {sae.aux_size(n_dead)} | {n_dead} | {times} |", flush=True)
            if args.profile and device.type == "cuda":
                for path in ("dense", "sparse"):
                    table = profile_table(auxk_step(sae, x_BD, dead, path, device))
                    print(f"\n{path}, d = {d}, {n_dead} dead, 10 calls:\n{table}\n", flush=True)


if __name__ == "__main__":
    main()
