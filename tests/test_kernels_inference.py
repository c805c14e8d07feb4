"""Every kernel entry point under `torch.inference_mode()` and `torch.no_grad()`, where users run SAEs.

Inference tensors carry no version counter: a kernel that keys a cache on `_version` (the decoder's shared
feature sort did) raises "Inference tensors do not track version counter" there. Without CUDA the Triton
kernels run in Triton's interpreter (TRITON_INTERPRET, set by conftest before triton is imported).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import mmsae
from mmsae import kernels
from mmsae.kernels import reference

CUDA = torch.cuda.is_available()
# Triton runs on the GPU where there is one, in its interpreter on CPU tensors elsewhere.
DEVICE = "cuda" if CUDA else "cpu"
MODES: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
    "inference_mode": torch.inference_mode,
    "no_grad": torch.no_grad,
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def check_entry_points(
    device: str, dtype: torch.dtype, mode: str, B: int, d: int, n: int, k: int, autocast: bool = False
) -> None:
    """topk_encode, encode_at, sparse_decode, decode_with_mse and normalized_mse of `mmsae.kernels` (Triton
    path) inside `mode`, against the torch reference computed outside it; weights made outside the mode,
    as a trained SAE's are, and inputs made inside it."""
    W_enc = torch.randn(n, d, device=device, dtype=dtype, requires_grad=True)
    b_enc = (torch.randn(n, device=device, dtype=dtype) * 0.1).requires_grad_()
    W_dec = torch.randn(n, d, device=device, dtype=dtype, requires_grad=True)
    b_dec = (torch.randn(d, device=device, dtype=dtype) * 0.1).requires_grad_()
    tol = 2e-2 if dtype != torch.float32 or autocast else 1e-5
    with MODES[mode](), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        x_BD = torch.randn(B, d, device=device, dtype=dtype)
        values_BK, indices_BK = kernels.topk_encode(x_BD, W_enc, b_enc, k, b_dec=b_dec)
        at_BK = kernels.encode_at(x_BD, W_enc, b_enc, indices_BK, b_dec)
        x_hat_BD = kernels.sparse_decode(values_BK, indices_BK, W_dec, b_dec)
        fused_BD, fused_mse = kernels.decode_with_mse(values_BK, indices_BK, W_dec, b_dec, x_BD)
        mse = kernels.normalized_mse(x_BD, x_hat_BD)
        assert torch.is_inference(values_BK) == (mode == "inference_mode")
    x_BD, values_BK, indices_BK = x_BD.clone(), values_BK.clone().float(), indices_BK.clone()
    assert rel_err(at_BK.clone().relu(), values_BK) < tol  # the pre-activations the select chose
    with torch.no_grad():
        ref_top_BK = reference.topk_encode((x_BD - b_dec).float(), W_enc.float(), b_enc.float(), k)[0]
        ref_hat_BD = reference.sparse_decode(values_BK, indices_BK, W_dec.float(), b_dec.float())
        ref_mse = reference.normalized_mse(x_BD.float(), x_hat_BD.clone().float())
    assert rel_err(values_BK.sort(-1).values, ref_top_BK.sort(-1).values) < tol
    assert rel_err(x_hat_BD.clone().float(), ref_hat_BD) < tol
    assert rel_err(fused_BD.clone().float(), ref_hat_BD) < tol
    assert rel_err(fused_mse.clone().float(), reference.normalized_mse(x_BD.float(), ref_hat_BD)) < tol
    assert rel_err(mse.clone().float(), ref_mse) < 1e-5


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_entry_points_run_under_inference_mode_and_no_grad(
    triton_backend: None, mode: str, dtype: torch.dtype
) -> None:
    check_entry_points(DEVICE, dtype, mode, B=6, d=24, n=72, k=5)


@pytest.mark.parametrize("mode", list(MODES))
def test_topk_sae_made_or_used_under_inference_mode(triton_backend: None, mode: str) -> None:
    """A TopK SAE loaded inside the mode (inference-tensor weights) or before it, encoding and decoding
    there, and codes made under inference_mode decoded later outside it."""
    sae = mmsae.build_sae("topk", 16, 48, k=4).to(DEVICE)
    x_BD = torch.randn(5, 16, device=DEVICE)
    with torch.no_grad():
        kernels.set_backend("torch")
        expected = sae(x_BD)
        kernels.set_backend("triton")
    with MODES[mode]():
        inside = mmsae.build_sae("topk", 16, 48, k=4).to(DEVICE)
        inside.load_state_dict(sae.state_dict())
        for model in (sae, inside):
            out = model(x_BD)
            assert rel_err(out.x_hat.clone(), expected.x_hat) < 1e-5
            assert torch.equal(out.codes.indices.sort(-1).values, expected.codes.indices.sort(-1).values)
        codes = sae.encode(x_BD)
    with torch.no_grad():  # inference-tensor codes decoded outside inference mode
        assert rel_err(sae.decode(codes).clone(), expected.x_hat) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(
    not CUDA, reason="needs CUDA; CPU twin: test_kernel_entry_points_run_under_inference_mode…"
)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize(
    ("dtype", "autocast"), [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)]
)
def test_kernel_entry_points_run_under_inference_mode_and_no_grad_gpu(
    mode: str, dtype: torch.dtype, autocast: bool
) -> None:
    # A benchmark-like shape: 16-bit operands take the Hopper fused GEMM + group select, and B·k ≥ 4n makes
    # the decoder gather a 16-bit copy of fp32 atoms under autocast.
    check_entry_points("cuda", dtype, mode, B=1024, d=256, n=4096, k=32, autocast=autocast)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA; CPU twin: test_topk_sae_made_or_used_under_inference_mode")
def test_bench_intervene_runs_under_inference_mode_gpu() -> None:
    """The intervention benchmark times every mode under inference_mode (it crashed there on CUDA)."""
    import runpy
    from pathlib import Path

    bench = runpy.run_path(str(Path(__file__).parents[1] / "benchmarks" / "bench_intervene.py"))
    timings = bench["main"](
        ["--device", "cuda", "--small", "--warmup", "1", "--repeats", "1", "--expansion", "2"]
    )
    assert {t.mode for t in timings} == {"splice", "steer"} and all(t.spliced_ms > 0 for t in timings)
