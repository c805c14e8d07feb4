"""benchmarks/bench_encode_gemm.py, bench_group_encode.py and bench_merge_top.py on the CPU (Triton's
interpreter), and the group re-score's bookkeeping against torch. The interpreter's bf16 dot products are
wrong, so the re-score is checked on fp16 operands, which it computes as it does bf16 ones."""

from __future__ import annotations

import torch
from conftest import load_benchmark, lowest_index_topk, run_benchmark

SIZES = ("--device", "cpu", "--tokens", "128", "--d", "32", "--n", "512", "--k", "4", "--reps", "1")


def test_group_encode_rescores_the_chosen_groups_and_takes_their_top_k() -> None:
    bench = load_benchmark("bench_group_encode")
    M, D, N, k, gs = 96, 32, 512, 4, 16
    x, W = torch.randn(M, D).half(), (torch.randn(N, D) / D**0.5).half()
    b = torch.randn(N) * 0.01
    pre = (x.float() @ W.float().T + b).bfloat16().float()
    gmax = pre.view(M, N // gs, gs).amax(-1).bfloat16()
    bits = gmax.view(torch.int16).int() & 0xFFFF
    keys = (
        torch.where(bits >= 0x8000, bits ^ 0xFFFF, bits | 0x8000) - 32768
    ).short()  # the GEMM's int16 keys
    enc = bench.GroupEncode(x, W, b, k, 6, gs)
    groups = enc.choose(keys)
    assert torch.equal(groups, lowest_index_topk(gmax, 6).sort(1).values)  # in column order
    tied = torch.zeros(2, N // gs, dtype=torch.int16)
    assert enc.choose(tied).tolist() == [list(range(6))] * 2  # ties to the lowest group, as the product's
    gmax = gmax.float()
    rescored = enc.rescore(groups)
    want = pre.view(M, N // gs, gs).gather(1, groups[..., None].expand(-1, -1, gs)).reshape(M, -1)
    torch.testing.assert_close(rescored, want, atol=0.04, rtol=0.01)  # fp16 products, bf16 rounding
    values, features = enc.top(groups, rescored)
    torch.testing.assert_close(values, pre.gather(1, features).relu(), atol=0.04, rtol=0)  # the features' own
    top = pre.topk(k, dim=1).values.relu()
    torch.testing.assert_close(values.sort(1).values, top.sort(1).values, atol=0.04, rtol=0)


def test_encode_gemm_and_group_encode_run() -> None:
    out = run_benchmark("bench_encode_gemm", *SIZES, "--candidates", "8")
    assert "(product)" in out and "fp8, fastest, group maxima only" in out
    assert "fp8 candidate encode, k' = 8" in out
    out = run_benchmark("bench_group_encode", *SIZES, "--fp8-groups", "6")
    assert "| bf16 maxima (" in out and "| fp8 maxima, k' = 6 groups (" in out


def test_torch_steps_swap_the_kernels_and_put_them_back() -> None:
    from mmsae import kernels
    from mmsae.kernels import reference

    bench = load_benchmark("bench_stats")
    before = {name: getattr(kernels, name) for name in bench.STATS_STEPS}
    with bench.reference_steps():
        assert all(getattr(kernels, name) is getattr(reference, name) for name in bench.STATS_STEPS)
    assert {name: getattr(kernels, name) for name in bench.STATS_STEPS} == before
    assert run_benchmark("bench_stats", "--small", "--torch-steps").count("(torch steps:") == 2


def test_merge_bench_kernel_equals_torch() -> None:
    """The Triton merge gives the torch reference's tables on both kinds of batches: a GPU run of the
    script compares like with like."""
    out = run_benchmark(
        "bench_merge_top", "--device", "cpu", "--n", "200", "--tokens", "256", "--tokens-per-example", "5",
        "--reps", "1",
    )  # fmt: skip
    rows = [line for line in out.splitlines() if line.startswith("| ") and "sort of" not in line]
    rows = [line for line in rows if "equal to torch" not in line]
    assert len(rows) == 4 and all(line.endswith("| yes |") for line in rows)
