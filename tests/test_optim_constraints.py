"""`mmsae.kernels.optim.Adam`'s clipping and unit-norm rows (`max_grad_norm`, `unit_rows`) against the
trainer's sequence of torch ops: remove_parallel_grads → clip_grad_norm_ → torch Adam → normalize_decoder.

Without CUDA the fused step runs in the Triton interpreter on CPU tensors (backend forced to "triton").
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mmsae import kernels
from mmsae.kernels import triton_adam
from mmsae.kernels.optim import Adam

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# An SAE in miniature: W_enc, b_enc, W_dec (unit rows), b_dec. d = 24 pads to 32: 128 rows per program, so
# 300 rows make three programs, the last ragged.
N, D = 300, 24


@pytest.fixture
def triton_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "_BACKEND", "triton")


def make_params(n: int = N, d: int = D) -> list[torch.nn.Parameter]:
    W_dec = torch.randn(n, d, device=DEVICE)
    W_dec /= W_dec.norm(dim=-1, keepdim=True)
    shapes = [W_dec.clone(), torch.randn(n, device=DEVICE), W_dec, torch.randn(d, device=DEVICE)]
    return [torch.nn.Parameter(t) for t in shapes]


def random_grads(params: list[torch.Tensor], steps: int, scale: float) -> list[list[torch.Tensor]]:
    return [[torch.randn_like(p) * scale for p in params] for _ in range(steps)]


def reference_steps(
    params: list[torch.nn.Parameter],
    grads: list[list[torch.Tensor]],
    lr: float | torch.Tensor,
    clip: float | None,
) -> torch.optim.Adam:
    """What SAEModule did with torch ops around torch's Adam."""
    opt = torch.optim.Adam(params, lr=lr, foreach=False)
    W_dec = params[2]
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        with torch.no_grad():
            W_dec.grad -= (W_dec.grad * W_dec).sum(-1, keepdim=True) * W_dec  # remove_parallel_grads
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)  # normalize_decoder
    return opt


def fused_steps(
    params: list[torch.nn.Parameter],
    grads: list[list[torch.Tensor]],
    lr: float | torch.Tensor,
    clip: float | None,
) -> Adam:
    opt = Adam([{"params": params, "lr": lr, "max_grad_norm": clip, "unit_rows": [params[2]]}])
    for W in (params[0], params[2]):
        opt.weight_copies.cast(W, torch.bfloat16)  # as a bf16 forward would: the step writes the copies
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return opt


def assert_close_states(
    params: list[torch.Tensor],
    ref: list[torch.Tensor],
    opt: torch.optim.Optimizer,
    ref_opt: torch.optim.Optimizer,
) -> None:
    for i, (p, q) in enumerate(zip(params, ref)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"param {i}")
        # torch's unfused Adam updates the first moment by lerp: a last-bit difference at the moment's scale.
        for key, atol in (("exp_avg", 1e-7), ("exp_avg_sq", 1e-9)):
            torch.testing.assert_close(
                opt.state[p][key], ref_opt.state[q][key], rtol=1e-5, atol=atol, msg=f"{key} of param {i}"
            )


@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
@pytest.mark.parametrize("clip", [None, 1e-3, 1e3], ids=["no_clip", "clip_active", "clip_inactive"])
def test_fused_step_equals_the_trainers_torch_sequence(
    triton_backend: None, clip: float | None, lr_kind: str
) -> None:
    """Three steps: weights, moments, unit rows and the bf16 copies equal the reference's (fp32 rounding)."""
    params = make_params()
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    grads = random_grads(params, 3, scale=1.0)
    lr = torch.tensor(1e-2, device=DEVICE) if lr_kind == "tensor" else 1e-2
    opt = fused_steps(params, grads, lr, clip)
    ref_opt = reference_steps(ref, grads, lr.clone() if lr_kind == "tensor" else lr, clip)
    assert_close_states(params, ref, opt, ref_opt)
    torch.testing.assert_close(params[2].norm(dim=-1), torch.ones(N, device=DEVICE))
    assert all(g is not None for g in (opt.weight_copies.current(p, torch.bfloat16) for p in params[::2]))
    for W in (params[0], params[2]):  # the copies hold the final (renormalised) weights
        copy16 = opt.weight_copies.current(W, torch.bfloat16).float()
        # CUDA rounds to nearest; the interpreter truncates: within one bf16 step either way.
        assert ((copy16 - W.detach()).abs() <= 2**-7 * W.detach().abs()).all()
        if CUDA:
            assert torch.equal(copy16, W.detach().bfloat16().float())


def test_the_comparison_sees_a_missing_projection_or_clip(
    triton_backend: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The test above is sharp: without the projection, or with clipping off, the results differ."""
    params = make_params()
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    grads = random_grads(params, 2, scale=1.0)
    ref_opt = reference_steps(ref, grads, 1e-2, 1e-3)
    unclipped = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = fused_steps(unclipped, grads, 1e-2, None)
    with pytest.raises(AssertionError):
        assert_close_states(unclipped, ref, opt, ref_opt)
    monkeypatch.setattr(triton_adam, "unit_rows_adam_update_", triton_adam.adam_update_)  # no projection
    unprojected = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = fused_steps(unprojected, grads, 1e-2, 1e-3)
    with pytest.raises(AssertionError):
        assert_close_states(unprojected, ref, opt, ref_opt)


@pytest.mark.parametrize("d", [1, 7, 200])
def test_unit_rows_kernel_for_other_row_widths(triton_backend: None, d: int) -> None:
    """Rows wider than one program's block share (d=200 pads to 256: 16 rows per program) and tiny rows."""
    params = make_params(n=37, d=d)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    grads = random_grads(params, 2, scale=0.1)
    assert_close_states(
        params, ref, fused_steps(params, grads, 1e-2, 0.05), reference_steps(ref, grads, 1e-2, 0.05)
    )


def test_unit_rows_grad_norm_is_the_projected_gradients(triton_backend: None) -> None:
    W, g = make_params()[2].detach(), torch.randn(N, D, device=DEVICE)
    projected = g - (g * W).sum(-1, keepdim=True) * W
    torch.testing.assert_close(triton_adam.unit_rows_grad_norm(W, g), projected.norm(), rtol=1e-6, atol=0)


def test_torch_path_is_the_trainers_sequence_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the Triton step does not apply (here: the torch backend), the optimizer runs the same torch ops
    the trainer ran: identical results."""
    monkeypatch.setattr(kernels, "_BACKEND", "torch")

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("no kernel may run on the torch path")

    for name in ("adam_update_", "unit_rows_adam_update_", "unit_rows_grad_norm"):
        monkeypatch.setattr(triton_adam, name, fail)
    params = make_params()
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    grads = random_grads(params, 3, scale=1.0)
    fused_steps(params, grads, 1e-2, 1e-3)
    reference_steps(ref, grads, 1e-2, 1e-3)
    for p, q in zip(params, ref):
        assert torch.equal(p, q)


def test_state_dict_format_is_torchs_and_the_keys_survive_a_load(triton_backend: None) -> None:
    """max_grad_norm and unit_rows stay out of the state dict (checkpoints move between this Adam and
    torch's, with or without them), and loading a state dict keeps the optimizer's own."""
    params = make_params()
    grads = random_grads(params, 2, scale=1.0)
    opt = fused_steps(params, grads, 1e-2, 1e-3)
    plain = torch.optim.Adam([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2, foreach=False)
    saved = copy.deepcopy(opt.state_dict())
    assert saved["param_groups"][0].keys() == plain.state_dict()["param_groups"][0].keys()
    assert "unit_rows" not in saved["param_groups"][0] and "max_grad_norm" not in saved["param_groups"][0]
    plain.load_state_dict(saved)  # torch's Adam takes it
    opt.load_state_dict(copy.deepcopy(plain.state_dict()))
    assert opt.param_groups[0]["max_grad_norm"] == 1e-3 and opt.param_groups[0]["unit_rows"][0] is params[2]
    assert "unit_rows: [(300, 24)]" in repr(opt)


def test_unit_rows_must_be_2d_weights_of_the_group() -> None:
    params = make_params()
    with pytest.raises(ValueError, match="unit_rows must list 2-D weights of the same param group"):
        Adam([{"params": params[:2], "unit_rows": [params[2]]}])
    with pytest.raises(ValueError, match=r"shape \(24,\)"):
        Adam([{"params": params, "unit_rows": [params[3]]}])
    with pytest.raises(ValueError, match="max_grad_norm=0 must be positive"):
        Adam([{"params": params, "max_grad_norm": 0}])


@pytest.mark.gpu
@pytest.mark.skipif(
    not CUDA, reason="needs CUDA; CPU twin: test_fused_step_equals_the_trainers_torch_sequence"
)
def test_fused_step_is_captured_and_replayed_on_cuda() -> None:
    """Capturable (device LR and step), one CUDA graph: replays equal the eager reference."""
    params = make_params(n=4096, d=768)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    grads = random_grads(params, 4, scale=1.0)
    lr = torch.tensor(1e-3, device="cuda")
    opt = Adam(
        [{"params": params, "lr": lr, "max_grad_norm": 0.5, "unit_rows": [params[2]]}], capturable=True
    )
    static = [torch.zeros_like(p) for p in params]
    for p, s in zip(params, static):
        p.grad = s
    opt.step()  # warm-up (JIT, state allocated) outside the capture; then back to the start
    with torch.no_grad():
        for p, q in zip(params, ref):
            p.copy_(q)
    for state in opt.state.values():
        for t in state.values():
            t.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # records the step; runs nothing
        opt.step()
    for step_grads in grads:
        for s, g in zip(static, step_grads):
            s.copy_(g)
        graph.replay()
    reference_steps(ref, grads, 1e-3, 0.5)
    for p, q in zip(params, ref):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
