"""benchmarks/bench_encode_gemm.py, bench_group_encode.py and bench_merge_top.py run on the CPU (Triton's
interpreter; its bf16 dot products are wrong, so only that they run is checked)."""

from __future__ import annotations

from conftest import load_benchmark, run_benchmark

SIZES = ("--device", "cpu", "--tokens", "128", "--d", "32", "--n", "512", "--k", "4", "--reps", "1")


def test_encode_gemm_and_group_encode_run() -> None:
    out = run_benchmark("bench_encode_gemm", *SIZES, "--candidates", "8")
    assert "(product)" in out and "fp8, fastest, group maxima only" in out
    assert "fp8 candidate encode, k' = 8" in out
    out = run_benchmark("bench_group_encode", *SIZES, "--fp8-groups", "2")
    assert (
        "| group_topk, 16-bit, kept k, whole |" in out and "| group_topk, e4m3, kept 8 = ⌈2k⌉, whole |" in out
    )


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
