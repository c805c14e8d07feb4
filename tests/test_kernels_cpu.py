"""The CPU decoder path (`kernels.cpu`): the reference's values and gradients without its dense codes."""

from __future__ import annotations

import pytest
import torch

from mmsae import kernels
from mmsae.kernels import cpu, reference


def _codes(lead: tuple[int, ...], k: int, n: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    indices = torch.rand(*lead, n, generator=g).argsort(-1)[..., :k]  # distinct per row, as TopK's
    values = torch.randn(*lead, k, generator=g, dtype=dtype).relu_()
    W = torch.randn(n, 24, generator=g, dtype=dtype)
    b = torch.randn(24, generator=g, dtype=dtype)
    return values, indices, W, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("lead", "with_bias"), [((37,), True), ((5, 7), False)])
def test_gather_decode_equals_the_reference_with_its_gradients(
    dtype: torch.dtype, lead: tuple[int, ...], with_bias: bool
) -> None:
    values, indices, W, b = _codes(lead, 6, 50, dtype)
    grads = []
    for decode in (cpu.sparse_decode, reference.sparse_decode):
        v, w, bb = (t.clone().requires_grad_() for t in (values, W, b))
        out = decode(v, indices, w, bb if with_bias else None)
        out.pow(2).sum().backward()
        grads.append((out.detach(), v.grad, w.grad, bb.grad))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for got, want in zip(*grads, strict=True):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, **tol)
    assert grads[0][0].shape == (*lead, 24)


def test_the_dispatch_takes_the_gather_on_cpu_float_and_the_reference_elsewhere(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(
        cpu, "sparse_decode", lambda *a: calls.append("gather") or reference.sparse_decode(*a)
    )
    values, indices, W, _ = _codes((8,), 4, 32, torch.float32)
    kernels.sparse_decode(values, indices, W)
    assert calls == ["gather"]
    kernels.sparse_decode(values.bfloat16(), indices, W.bfloat16())  # 16-bit: the reference
    assert kernels.sparse_decode(values[:0], indices[:0], W).shape == (0, 24)  # no rows: the reference
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kernels.sparse_decode(values, indices, W)
    monkeypatch.setattr(kernels, "_BACKEND", "torch")  # a forced reference stays the reference
    kernels.sparse_decode(values, indices, W)
    assert calls == ["gather"]
