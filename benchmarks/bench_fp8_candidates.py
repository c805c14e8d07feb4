"""How exact a top-k encode is whose candidates come from an fp8 GEMM, re-scored in fp32, on real tokens.

An encode-only pass (`feature_stats`, the index) spends most of its time in the encoder GEMM. An fp8 GEMM
runs at about 1.6 × bf16 on Hopper (`bench_stats.py --limits`), but rounds each operand to 3 mantissa bits.
The candidate scheme keeps the result exact where it matters: the k' ≥ k largest fp8 scores of each token are
candidates, their pre-activations are computed again in fp32 (`kernels.encode_at`), and the top k of those
are the codes. It misses a feature of the fp32 top k only when its fp8 score ranks below k'. The group
variant takes the GEMM's maxima over groups of `--group` neighbouring features instead (what the fused GEMM's
epilogue keeps, `kernels.triton_group`): the g' groups with the largest fp8 maxima are re-scored whole, and
it misses a feature only when its group's fp8 maximum ranks below g'.

This script measures that on real activations: a TopK SAE trained on DINOv2-S/14 `blocks.9` patch tokens of
the zoo's photos (`dino_tokens.py`: those of `bench_recipe_gpu.py`, from its `--cache`), encoded on held-out
photos in fp32 (the reference), in bf16 (operands rounded to bf16, fp32 accumulation: what the GPU encode
computes) and through fp8 candidates (each token and each feature scaled to e4m3's range, as
`torch._scaled_mm` scales rows and columns). For each, the share of tokens whose top-k set differs from the
reference and the share of the reference's (token, feature) pairs it misses.

    python benchmarks/bench_fp8_candidates.py --cache dino_cpu --budgets 196608 --eval-tokens 65536 \\
        --calib-tokens 16384
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

import torch
from torch import Tensor

import mmsae

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its siblings; `-P` leaves the script's folder out
import dino_tokens
from bench_stats import to_e4m3_rows


def fp8_rows(t_RD: Tensor) -> Tensor:
    """`t_RD` rounded to e4m3 with one scale per row (`bench_stats.to_e4m3_rows`, as its fp8 encode)."""
    t8_RD, scale_R1 = to_e4m3_rows(t_RD)
    return t8_RD.float() * scale_R1


def candidate_topk(approx_BN: Tensor, exact_BN: Tensor, k: int, k_cand: int) -> Tensor:
    """[B, k] features: the top k by `exact_BN` among the top `k_cand` by `approx_BN` of each row."""
    cand_BC = approx_BN.topk(k_cand, dim=1).indices
    best_BK = exact_BN.gather(1, cand_BC).topk(k, dim=1).indices
    return cand_BC.gather(1, best_BK)


def group_candidate_topk(approx_BN: Tensor, exact_BN: Tensor, k: int, groups: int, group: int) -> Tensor:
    """[B, k] features: the top k by `exact_BN` among the features of the `groups` groups (of `group`
    neighbouring features) with the largest `approx_BN` maxima in each row."""
    B, n = approx_BN.shape
    gmax_BG = approx_BN.view(B, n // group, group).amax(-1)
    chosen_BC = gmax_BG.topk(groups, dim=1).indices
    cand_BF = (chosen_BC[:, :, None] * group + torch.arange(group)).flatten(1)
    best_BK = exact_BN.gather(1, cand_BF).topk(k, dim=1).indices
    return cand_BF.gather(1, best_BK)


def disagreement(ref_BK: Tensor, got_BK: Tensor, n: int) -> tuple[float, float]:
    """(share of rows whose feature sets differ, share of `ref_BK`'s entries missing from `got_BK`'s row)."""
    marked_BN = torch.zeros(len(ref_BK), n, dtype=torch.bool).scatter_(1, got_BK, True)
    found_BK = marked_BN.gather(1, ref_BK)
    return (~found_BK).any(1).float().mean().item(), (~found_BK).float().mean().item()


@torch.no_grad()
def rows(
    sae: mmsae.SAE, x_BD: Tensor, k: int, cand_mults: list[float], group_mults: list[float], group: int
) -> list[tuple[str, float, float]]:
    """(encode, tokens whose top-k set differs from fp32, pairs missed) for bf16, each fp8 k' and each
    fp8 g'."""
    W_ND, b_N = sae.W_enc.float(), sae.b_enc.float()
    xc_BD = x_BD.float() - sae.b_dec.float()
    exact_BN = xc_BD @ W_ND.T + b_N
    n = exact_BN.shape[1]
    ref_BK = exact_BN.topk(k, dim=1).indices
    bf16_BN = xc_BD.bfloat16().float() @ W_ND.bfloat16().float().T + b_N
    out = [("bf16", *disagreement(ref_BK, bf16_BN.topk(k, dim=1).indices, n))]
    fp8_BN = fp8_rows(xc_BD) @ fp8_rows(W_ND).T + b_N
    for mult in cand_mults:
        k_cand = min(n, round(mult * k))
        got_BK = candidate_topk(fp8_BN, exact_BN, k, k_cand)
        out.append((f"fp8 candidates, k' = {k_cand}", *disagreement(ref_BK, got_BK, n)))
    for mult in group_mults:
        groups = min(n // group, round(mult * k))
        got_BK = group_candidate_topk(fp8_BN, exact_BN, k, groups, group)
        name = f"fp8 group maxima, g' = {groups} groups of {group}"
        out.append((name, *disagreement(ref_BK, got_BK, n)))
    return out


def main(argv: list[str] | None = None) -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    dino_tokens.add_arguments(ap)
    ap.add_argument("--n-features", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--encode-tokens", type=int, default=16_384, help="held-out tokens encoded")
    ap.add_argument("--cand-mults", type=float, nargs="+", default=[1.0, 1.25, 1.5, 2.0, 3.0])
    ap.add_argument("--group-mults", type=float, nargs="*", default=[1.0, 1.25, 1.5, 2.0], help="g' / k")
    ap.add_argument("--group", type=int, default=16, help="features per group of the GEMM's maxima")
    args = ap.parse_args(argv)
    train_ND, eval_ND = dino_tokens.cached_tokens(args)
    x_BD = eval_ND[: args.encode_tokens]
    print(
        f"TopK SAEs (k = {args.k}) trained on {len(train_ND):,} DINOv2-S tokens, batch {args.batch_size}; "
        f"{len(x_BD):,} held-out tokens encoded\n"
    )
    print(f"| n | encode | tokens whose top-{args.k} set differs from fp32 | pairs missed |")
    print("|---:|---|---:|---:|")
    for n in args.n_features:
        sae = mmsae.train(
            train_ND, sae="topk", n_features=n, k=args.k, tokens=len(train_ND), batch_size=args.batch_size
        ).cpu()
        for name, tokens, pairs in rows(sae, x_BD, args.k, args.cand_mults, args.group_mults, args.group):
            print(f"| {n} | {name} | {100 * tokens:.3f} % | {100 * pairs:.4f} % |", flush=True)


if __name__ == "__main__":
    main()
