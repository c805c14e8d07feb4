"""`mmsae.kernels.optim.Adam` against torch.optim.Adam, and the 16-bit weight copies it writes.

Without CUDA the Triton step runs in the interpreter on CPU tensors (backend forced to "triton").
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mmsae import kernels
from mmsae.kernels import triton_ops, weight_copies
from mmsae.kernels.optim import Adam

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SHAPES = [(37, 19), (5,), (2500,)]  # ragged blocks, a bias, more than one program


def make_params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(s, device=DEVICE)) for s in SHAPES]


def run_steps(
    opt: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    grads: list[list[torch.Tensor]],
) -> None:
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()


def random_grads(steps: int) -> list[list[torch.Tensor]]:
    # Gradients of very different scales per element: exercises √v / √bc2 + eps at both ends.
    return [
        [torch.randn(s, device=DEVICE) * torch.rand(s, device=DEVICE).pow(6) for s in SHAPES]
        for _ in range(steps)
    ]


def assert_same_state(
    params: list[torch.Tensor],
    ref_params: list[torch.Tensor],
    opt: torch.optim.Optimizer,
    ref_opt: torch.optim.Optimizer,
) -> None:
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=2e-6, atol=1e-7)
        state, ref_state = opt.state[p], ref_opt.state[q]
        assert float(state["step"]) == float(ref_state["step"])
        torch.testing.assert_close(state["exp_avg"], ref_state["exp_avg"], rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(state["exp_avg_sq"], ref_state["exp_avg_sq"], rtol=1e-6, atol=1e-12)


CONFIGS = {
    "default": {},
    "l2": {"weight_decay": 0.1},
    "adamw": {"weight_decay": 0.1, "decoupled_weight_decay": True},
    "maximize": {"maximize": True, "betas": (0.0, 0.99)},
    "device_lr": {"capturable": True, "lr": "tensor"},
}


@pytest.mark.parametrize("config", CONFIGS)
def test_fused_adam_equals_torch_adam(triton_backend: None, config: str) -> None:
    """Weights, moments and step counts after 4 steps equal torch's (fp32 rounding apart), for every option
    the fused step supports; the step count and LR may live on the device (capturable, CUDA graphs)."""
    kwargs = dict(CONFIGS[config])
    if kwargs.get("lr") == "tensor":
        kwargs["lr"] = torch.tensor(3e-3, device=DEVICE)
    params = make_params()
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = Adam(params, **{"lr": 3e-3, **kwargs})
    # The reference keeps the LR tensor but not capturable, which torch allows on CUDA only.
    ref_kwargs = {**kwargs, "lr": kwargs["lr"].clone() if "lr" in kwargs else 3e-3, "capturable": False}
    ref_opt = torch.optim.Adam(ref_params, **ref_kwargs, foreach=False)
    grads = random_grads(4)
    run_steps(opt, params, grads)
    run_steps(ref_opt, ref_params, grads)
    assert_same_state(params, ref_params, opt, ref_opt)
    assert not torch.equal(params[0], make_params()[0]), "the weights must have moved"


def test_fused_adam_catches_a_wrong_bias_correction(
    triton_backend: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The comparison above is sharp enough to see a bias correction off by one step."""
    from mmsae.kernels import triton_adam

    params = make_params()
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt, ref_opt = Adam(params, lr=3e-3), torch.optim.Adam(ref_params, lr=3e-3, foreach=False)
    real = triton_adam.adam_update_
    monkeypatch.setattr(triton_adam, "adam_update_", lambda *a, **kw: real(*a[:4], a[4] + 1, *a[5:], **kw))
    grads = random_grads(2)
    run_steps(opt, params, grads)
    run_steps(ref_opt, ref_params, grads)
    with pytest.raises(AssertionError):
        assert_same_state(params, ref_params, opt, ref_opt)


def test_state_dicts_move_between_torch_adam_and_the_fused_one(triton_backend: None) -> None:
    """Checkpoints of either optimizer resume in the other: same keys, same values, same continuation."""
    grads = random_grads(4)
    params = make_params()
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours, theirs = Adam(params, lr=1e-2), torch.optim.Adam(ref_params, lr=1e-2, foreach=False)
    run_steps(ours, params, grads[:2])
    run_steps(theirs, ref_params, grads[:2])
    # Swap: torch continues from our state, we continue from torch's (its step count lives on the host).
    ours_sd, theirs_sd = copy.deepcopy(ours.state_dict()), copy.deepcopy(theirs.state_dict())  # as if saved
    assert ours_sd["param_groups"] == [{**g, "foreach": None} for g in theirs_sd["param_groups"]]
    assert {k for s in ours_sd["state"].values() for k in s} == {"step", "exp_avg", "exp_avg_sq"}
    p2 = [torch.nn.Parameter(p.detach().clone()) for p in params]
    q2 = [torch.nn.Parameter(q.detach().clone()) for q in ref_params]
    torch_from_ours, ours_from_torch = torch.optim.Adam(p2, lr=1e-2, foreach=False), Adam(q2, lr=1e-2)
    torch_from_ours.load_state_dict(ours_sd)
    ours_from_torch.load_state_dict(theirs_sd)
    run_steps(torch_from_ours, p2, grads[2:])
    run_steps(ours_from_torch, q2, grads[2:])
    run_steps(theirs, ref_params, grads[2:])
    assert_same_state(p2, ref_params, torch_from_ours, theirs)
    assert_same_state(q2, ref_params, ours_from_torch, theirs)


def test_the_adam_kernel_names_mismatched_inputs() -> None:
    from mmsae.kernels.triton_adam import adam_update_

    p, g = torch.zeros(4, 3, device=DEVICE), torch.zeros(4, 3, device=DEVICE)
    with pytest.raises(ValueError, match=r"exp_avg must be contiguous and of the weight's shape \(4, 3\)"):
        adam_update_(p, g, torch.zeros(3, 4, device=DEVICE), torch.zeros_like(p), 1.0, 1e-3, 0.9, 0.999, 1e-8)
    with pytest.raises(ValueError, match=r"fp32 gradients and moments; grad is torch\.bfloat16"):
        adam_update_(p, g.bfloat16(), torch.zeros_like(p), torch.zeros_like(p), 1.0, 1e-3, 0.9, 0.999, 1e-8)


def test_unsupported_options_run_torchs_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """AMSGrad (and, under the auto backend, CPU weights) take torch's own step, not the kernel."""
    from mmsae.kernels import triton_adam

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the fused kernel must not run here")

    monkeypatch.setattr(triton_adam, "adam_update_", fail)
    for backend, kwargs in (("triton", {"amsgrad": True}), ("auto", {})):
        monkeypatch.setattr(kernels, "_BACKEND", backend)
        if backend == "auto" and CUDA:
            continue  # auto runs the kernel on CUDA
        params = make_params()
        ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opt, ref_opt = Adam(params, **kwargs), torch.optim.Adam(ref_params, **kwargs)
        grads = random_grads(2)
        run_steps(opt, params, grads)
        run_steps(ref_opt, ref_params, grads)
        for p, q in zip(params, ref_params):
            assert torch.equal(p, q)


def test_a_closure_runs_before_the_step_chooses_its_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning passes a closure that makes the gradients: the choice of kernel must see them (CPU weights
    under the auto backend take torch's step even though no gradient existed before the closure)."""
    from mmsae.kernels import triton_adam

    monkeypatch.setattr(kernels, "_BACKEND", "auto")
    calls: list[int] = []
    real = triton_adam.adam_update_
    monkeypatch.setattr(triton_adam, "adam_update_", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    params = make_params()
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt, ref_opt = Adam(params, lr=1e-2), torch.optim.Adam(ref_params, lr=1e-2, foreach=False)
    grads = random_grads(1)[0]

    def closure(ps: list[torch.nn.Parameter]) -> float:
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        return 1.5

    assert opt.step(lambda: closure(params)) == 1.5
    ref_opt.step(lambda: closure(ref_params))
    assert_same_state(params, ref_params, opt, ref_opt)
    assert len(calls) == (len(params) if CUDA else 0)


def test_adam_writes_the_16_bit_copy_a_forward_asked_for(triton_backend: None) -> None:
    """After a forward cast a weight, each step writes its bf16 copy; the next cast returns that copy (no new
    tensor) holding exactly the weight's rounded values. An in-place change of the weight makes it stale."""
    w = torch.nn.Parameter(torch.randn(37, 19, device=DEVICE))
    frozen = torch.randn(8, device=DEVICE)  # not trained: never gets a copy
    opt = Adam([w], lr=1e-2)
    copies = opt.weight_copies
    assert isinstance(copies, weight_copies.WeightCopies)
    assert copies.cast(frozen, torch.bfloat16) is not copies.cast(frozen, torch.bfloat16)
    first = copies.cast(w, torch.bfloat16)  # no copy yet: a fresh cast, and a request for one
    assert copies.wanted(w) == torch.bfloat16 and copies.wanted(frozen) is None
    assert Adam([w], lr=1e-2).weight_copies.wanted(w) is None, "each optimizer owns its copies"
    w.grad = torch.randn_like(w)
    version = w._version
    opt.step()
    assert w._version > version, "as torch's in-place step: a backward through the old weight must fail"
    kept = copies.cast(w, torch.bfloat16)
    assert kept is copies.cast(w, torch.bfloat16), "a current copy is returned, not recast"
    assert weight_copies.cast(None, w, torch.bfloat16) is not kept, "without the copies: a plain cast"
    assert not torch.equal(kept, first), "the copy holds the updated weight"
    expected = w.detach().to(torch.bfloat16)
    if CUDA:
        assert torch.equal(kept, expected)
    else:  # the interpreter truncates fp32 → bf16 instead of rounding to nearest: within one step
        assert ((kept.float() - expected.float()).abs() <= 2**-7 * expected.float().abs()).all()
    with torch.no_grad():
        w.mul_(2)  # e.g. atom renormalisation
    stale = copies.cast(w, torch.bfloat16)
    assert stale is not kept and torch.equal(stale, w.detach().to(torch.bfloat16))
    copies.forget(w)
    assert copies.wanted(w) is None


def test_the_decoder_gathers_the_optimizers_copy(triton_backend: None) -> None:
    """16-bit codes gather from a current copy of W_dec even where casting would not pay (few rows)."""
    W_dec = torch.nn.Parameter(torch.randn(64, 24, device=DEVICE))
    values = torch.randn(3, 4, device=DEVICE).to(torch.bfloat16)
    opt = Adam([W_dec], lr=1e-2)
    copies = opt.weight_copies
    assert triton_ops._decode_table(values, W_dec, copies) is W_dec  # B·k = 12 < 4n: fp32 atoms, no request
    big = torch.randn(64, 4, device=DEVICE).to(torch.bfloat16)
    assert triton_ops._decode_table(big, W_dec, copies).dtype == torch.bfloat16  # B·k ≥ 4n: cast, request
    W_dec.grad = torch.randn_like(W_dec)
    opt.step()
    assert triton_ops._decode_table(values, W_dec, copies) is copies.current(W_dec, torch.bfloat16)
    assert triton_ops._decode_table(values, W_dec) is W_dec, "without the copies, no copy is read"


@pytest.mark.skipif(
    not CUDA,
    reason="GPU only (bf16 autocast on CUDA); CPU twins: "
    "test_adam_writes_the_16_bit_copy_a_forward_asked_for, test_fused_adam_equals_torch_adam",
)
def test_topk_sae_trains_the_same_with_the_fused_adam_under_autocast() -> None:
    """Three bf16-autocast steps of a TopK SAE: the fused Adam (whose copies the forwards then read) leaves
    the same weights as torch's fused Adam with fresh casts."""
    from mmsae.sae import build_sae

    x_BD = torch.randn(4096, 256, device="cuda")
    results = []
    for optimizer in (Adam, torch.optim.Adam):
        torch.manual_seed(0)
        sae = build_sae("topk", 256, 2048, k=16, aux_k=0).cuda()
        opt = optimizer(sae.parameters(), lr=1e-3, fused=True)
        sae.weight_copies = getattr(opt, "weight_copies", None)
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = sae.loss(x_BD, sae(x_BD)).loss
            loss.backward()
            opt.step()
        if optimizer is Adam:
            assert opt.weight_copies.current(sae.W_enc, torch.bfloat16) is not None
            assert opt.weight_copies.current(sae.W_dec, torch.bfloat16) is not None
        results.append({name: p.detach().clone() for name, p in sae.named_parameters()})
    # Whole-tensor errors: a last-bit difference in a weight can flip one top-k choice, which moves that
    # feature's few gradient rows; everything else agrees to fp32 rounding.
    for name, value in results[0].items():
        err = float((value - results[1][name]).norm() / results[1][name].norm())
        assert err < 1e-4, (name, err)
