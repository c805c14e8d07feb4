"""benchmarks/bench_fp8_candidates.py: the fp8 rounding, the candidate top-k (by feature and by group), the
disagreement it reports."""

from __future__ import annotations

import torch
from conftest import load_benchmark

from mmsae.sae import build_sae

bench = load_benchmark("bench_fp8_candidates")


def test_fp8_rows_rounds_each_row_to_three_mantissa_bits_of_its_own_scale() -> None:
    t_RD = torch.randn(8, 64) * torch.logspace(-3, 3, 8)[:, None]  # rows of very different magnitudes
    q_RD = bench.fp8_rows(t_RD)
    rowmax_R1 = t_RD.abs().amax(1, keepdim=True)
    assert torch.equal(q_RD.abs().amax(1, keepdim=True), rowmax_R1)  # the row's maximum maps to e4m3's
    normal = t_RD.abs() >= rowmax_R1 * 2**-8  # e4m3's normal range below its maximum (448 ≈ 2^8.8)
    assert ((q_RD - t_RD).abs() <= t_RD.abs() * 2**-4)[normal].all()
    assert ((q_RD - t_RD).abs() > 0).any()  # it does round


def test_candidate_topk_is_the_exact_topk_when_the_candidates_hold_it() -> None:
    exact_BN = torch.randn(50, 200)
    ref = exact_BN.topk(5, dim=1).indices.sort(1).values
    got = bench.candidate_topk(torch.randn(50, 200), exact_BN, 5, 200)  # every feature a candidate
    assert torch.equal(got.sort(1).values, ref)
    assert torch.equal(bench.candidate_topk(exact_BN, exact_BN, 5, 8).sort(1).values, ref)
    # candidates by a score that hides the best feature of every row miss exactly that one
    hiding_BN = exact_BN.scatter(1, exact_BN.argmax(1, keepdim=True), -1e9)
    missed = bench.candidate_topk(hiding_BN, exact_BN, 5, 5)
    assert not (missed == exact_BN.argmax(1, keepdim=True)).any()


def test_group_candidates_hold_the_topk_when_their_groups_do() -> None:
    """Every group chosen: the exact top k; groups chosen by the exact maxima: still the exact top k (each
    top-k feature's group has a maximum at least its value); a score hiding a group misses its features."""
    exact_BN = torch.randn(50, 64)
    ref = exact_BN.topk(4, dim=1).indices.sort(1).values
    got = bench.group_candidate_topk(torch.randn(50, 64), exact_BN, 4, 16, 4)  # all 16 groups of 4
    assert torch.equal(got.sort(1).values, ref)
    assert torch.equal(bench.group_candidate_topk(exact_BN, exact_BN, 4, 4, 4).sort(1).values, ref)
    best_group = exact_BN.argmax(1, keepdim=True) // 4
    hiding_BN = exact_BN.clone().view(50, 16, 4).scatter_(1, best_group[..., None].expand(-1, -1, 4), -1e9)
    missed = bench.group_candidate_topk(hiding_BN.view(50, 64), exact_BN, 4, 15, 4)
    assert not (missed // 4 == best_group).any()


def test_disagreement_counts_rows_and_pairs() -> None:
    ref = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
    got = torch.tensor([[1, 0], [2, 9], [8, 9], [6, 7]])
    assert bench.disagreement(ref, got, 10) == (0.5, 3 / 8)


def test_rows_report_bf16_and_each_candidate_count() -> None:
    torch.manual_seed(0)
    sae = build_sae("topk", d_in=16, n_features=64, k=4)
    table = bench.rows(sae, torch.randn(256, 16), 4, [1.0, 16.0], [1.0, 4.0], 4)
    assert [name for name, _, _ in table] == [
        "bf16",
        "fp8 candidates, k' = 4",
        "fp8 candidates, k' = 64",
        "fp8 group maxima, g' = 4 groups of 4",
        "fp8 group maxima, g' = 16 groups of 4",
    ]
    assert all(0 <= tokens <= 1 and 0 <= pairs <= tokens for _, tokens, pairs in table)
    assert table[1][1] > 0  # fp8 scores alone pick other features for some tokens
    assert table[2][1:] == (0.0, 0.0)  # every feature a candidate: the fp32 top k
    assert table[4][1:] == (0.0, 0.0)  # every group a candidate
