"""benchmarks/bench_stats.py: its CPU run with `--profile`, and the kernel total it reports."""

from __future__ import annotations

from types import SimpleNamespace

from conftest import load_benchmark, run_benchmark
from torch.autograd import DeviceType


def test_kernel_total_counts_device_events_only() -> None:
    """Ops that launch Triton kernels carry those kernels' time as their own "self" device time: summing
    every event counted the kernels twice (a profile reported 592 ms of kernels in a 316 ms pass)."""
    bench = load_benchmark("bench_stats")
    # The op (e.g. _TopKEncode) carries 2 ms: the 1.5 + 0.5 ms of the kernels it launched.
    events = [
        SimpleNamespace(device_type=DeviceType.CPU, self_device_time_total=2000.0),
        SimpleNamespace(device_type=DeviceType.CUDA, self_device_time_total=1500.0),
        SimpleNamespace(device_type=DeviceType.CUDA, self_device_time_total=500.0),
    ]
    assert bench.kernel_ms(events) == 2.0


def test_small_run_with_profile_and_limits() -> None:
    out = run_benchmark("bench_stats", "--small", "--profile", "--limits")
    assert "one pass: wall" in out and "GPU kernels 0 ms" in out  # no GPU here: no kernels
    assert len([line for line in out.splitlines() if line.strip().startswith(("512", "2048"))]) == 2
    limits = out.split("encode limits, chunk 2048")[1].splitlines()
    assert [line.split(" ms")[0].rsplit(None, 1)[0].strip() for line in limits if " ms" in line] == [
        "GEMM x·Wᵀ",
        "GEMM x·Wᵀ + b (F.linear)",
        "torch.topk of the GEMM output",
        "exact encode (kernels.topk_encode)",
    ]
