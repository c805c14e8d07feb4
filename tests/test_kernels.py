"""Sparse, dense and autograd Triton kernels vs their torch references: random inputs, odd sizes, poisoned
outputs (top-k selection: test_kernels_select.py).

Without CUDA the kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET must be set
before the kernel modules are imported), so CI checks the same code the GPU compiles.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mmsae import kernels
from mmsae.kernels import reference, triton_ops
from mmsae.kernels.triton_dense import center_cast, col_sums
from mmsae.kernels.triton_sparse import gather_dot_into, gather_sum_into, segment_matmul_into, sort_by_feature

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    assert torch.isfinite(out).all(), "output has NaN/inf (an element was never written?)"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def random_codes(
    B: int, k: int, n: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """k distinct features per row out of n (like top-k output), with random signed values."""
    indices_BK = torch.rand(B, n, device=DEVICE).argsort(-1)[:, :k].contiguous()
    return torch.randn(B, k, device=DEVICE).to(dtype), indices_BK


# ----------------------------------------------------------------------------- sparse kernels
@pytest.mark.parametrize(("B", "k", "n", "d"), [(7, 5, 50, 70), (3, 40, 97, 33), (4, 20, 64, 600)])
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16])
def test_gather_sum_and_dot_match_dense(B: int, k: int, n: int, d: int, table_dtype: torch.dtype) -> None:
    """d=600 spans several column tiles of either default (256 fp32, 512 16-bit) with a ragged end."""
    w_BK, idx_BK = random_codes(B, k, n)
    table_ND = torch.randn(n, d, device=DEVICE).to(table_dtype)
    dense_BN = torch.zeros(B, n, device=DEVICE, dtype=torch.float64).scatter(1, idx_BK, w_BK.double())
    tol = 1e-5 if table_dtype == torch.float32 else 1e-2

    out_BD = torch.full((B, d), float("nan"), device=DEVICE)
    gather_sum_into(w_BK, idx_BK, table_ND, out_BD)
    assert rel_err(out_BD, dense_BN @ table_ND.double()) < tol

    g_BD = torch.randn(B, d, device=DEVICE)
    out_BK = torch.full((B, k), float("nan"), device=DEVICE)
    gather_dot_into(g_BD, idx_BK, table_ND, out_BK)
    assert rel_err(out_BK, (g_BD.double() @ table_ND.double().T).gather(1, idx_BK)) < tol


@pytest.mark.parametrize(("B", "k", "n", "d"), [(9, 5, 130, 70), (40, 3, 17, 33)])
def test_segment_matmul_matches_dense_transpose(B: int, k: int, n: int, d: int) -> None:
    w_BK, idx_BK = random_codes(B, k, n)
    dense_BD = torch.randn(B, d, device=DEVICE).bfloat16()
    codes_BN = torch.zeros(B, n, device=DEVICE, dtype=torch.float64).scatter(1, idx_BK, w_BK.double())
    never_chosen = torch.ones(n, dtype=torch.bool, device=DEVICE).index_fill(0, idx_BK.flatten(), False)
    for scale in (None, torch.tensor(-1.5, device=DEVICE)):
        out_ND = torch.full((n, d), float("nan"), device=DEVICE)
        sums_N = torch.full((n,), float("nan"), device=DEVICE)
        segment_matmul_into(w_BK, idx_BK, dense_BD, out_ND, scale=scale, sums_N=sums_N)
        s = 1.0 if scale is None else scale.item()
        assert rel_err(out_ND, s * codes_BN.T @ dense_BD.double()) < 1e-5
        assert rel_err(sums_N, s * codes_BN.sum(0)) < 1e-6  # every feature written, zero where never chosen
        assert (out_ND[never_chosen] == 0).all()


@pytest.mark.parametrize("chunk", [4, None])  # None: the library's 256, reached by a feature in every row
def test_segment_matmul_splits_long_segments(chunk: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Skewed features, as in training (one fires on every row, a few on many): their segments are split into
    work items whose partial sums a second pass adds; the result equals the dense reference, deterministic."""
    from mmsae.kernels import triton_sparse

    if chunk is not None:
        monkeypatch.setattr(triton_sparse, "SEGMENT_CHUNK", chunk)
    B, k, n, d = (37, 3, 11, 70) if chunk is not None else (600, 2, 9, 33)
    idx_BK = torch.stack(
        [torch.zeros(B, dtype=torch.long), torch.randint(1, 4, (B,))]
        + [torch.randint(4, n, (B,)) for _ in range(k - 2)],
        1,
    ).to(DEVICE)
    w_BK = torch.randn(B, k, device=DEVICE)
    dense_BD = torch.randn(B, d, device=DEVICE).bfloat16()
    codes_BN = torch.zeros(B, n, device=DEVICE, dtype=torch.float64).scatter_add(1, idx_BK, w_BK.double())
    by_feature = sort_by_feature(idx_BK, n)
    lengths = torch.bincount(idx_BK.flatten(), minlength=n)[by_feature.by_length]
    size = triton_sparse.SEGMENT_CHUNK
    assert torch.equal(by_feature.item_end.long(), ((lengths + size - 1) // size).clamp_min(1).cumsum(0))
    assert lengths[0] == B > size, "a feature must be split"
    scale = torch.tensor(0.5, device=DEVICE)
    results = []
    for _ in range(2):
        out_ND = torch.full((n, d), float("nan"), device=DEVICE)
        sums_N = torch.full((n,), float("nan"), device=DEVICE)
        segment_matmul_into(w_BK, idx_BK, dense_BD, out_ND, by_feature, scale=scale, sums_N=sums_N)
        assert rel_err(out_ND, 0.5 * codes_BN.T @ dense_BD.double()) < 1e-5
        assert rel_err(sums_N, 0.5 * codes_BN.sum(0)) < 1e-6
        results.append(out_ND)
    assert torch.equal(results[0], results[1]), "fixed summation order"


@pytest.mark.parametrize("n", [7, 1 << 16, (1 << 16) + 5])  # int16 keys up to 2¹⁶ features, int32 beyond
def test_sort_by_feature_is_stable_with_exact_segments(n: int) -> None:
    idx_BK = torch.randint(0, n, (50, 6), device=DEVICE)
    idx_BK[0, :2] = torch.tensor([0, n - 1])  # both ends of the key range
    by_feature = sort_by_feature(idx_BK, n)
    flat = idx_BK.flatten()
    assert torch.equal(by_feature.order, flat.sort(stable=True).indices)
    counts = torch.bincount(flat, minlength=n)
    assert by_feature.seg.dtype == torch.int32 and by_feature.seg.shape == (n + 1,)
    assert torch.equal(by_feature.seg.long().diff(), counts) and by_feature.seg[0] == 0
    assert torch.equal(by_feature.rows.long(), by_feature.order // 6)
    lengths = counts[by_feature.by_length]
    assert sorted(by_feature.by_length.tolist()) == list(range(n)) and (lengths.diff() <= 0).all()


# ----------------------------------------------------------------------------- autograd
def check_encode_decode_grads(
    B: int, d: int, n: int, k: int, dtype: torch.dtype, autocast: bool, x_grad: bool = True
) -> None:
    """Triton encode+decode vs the same function in torch, evaluated at the indices the kernel chose.

    Comparing at the kernel's own indices keeps ties (common in 16-bit pre-activations) from
    making two correct selections look different; the selected values are checked separately.
    """
    x_BD = torch.randn(B, d, device=DEVICE, dtype=dtype)
    W_enc = torch.randn(n, d, device=DEVICE, dtype=dtype) / d**0.5
    params = {
        "W_enc": W_enc.requires_grad_(),
        "b_enc": (torch.randn(n, device=DEVICE, dtype=dtype) * 0.1).requires_grad_(),
        "W_dec": torch.randn(n, d, device=DEVICE, dtype=dtype).requires_grad_(),
        "b_dec": (torch.randn(d, device=DEVICE, dtype=dtype) * 0.1).requires_grad_(),
    }
    if x_grad:  # SAE training leaves x without a gradient: then b_dec's comes from db_enc, not from dx
        params["x"] = x_BD.requires_grad_()
    probe_BD = torch.randn(B, d, device=DEVICE)

    def run(
        chosen_BK: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Triton path when chosen_BK is None, else torch at those indices."""
        for p in params.values():
            p.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            if chosen_BK is None:
                values_BK, indices_BK = triton_ops.topk_encode(
                    x_BD, params["W_enc"], params["b_enc"], k, b_dec=params["b_dec"]
                )
                x_hat = triton_ops.sparse_decode(values_BK, indices_BK, params["W_dec"], params["b_dec"])
            else:
                pre_BN = (x_BD - params["b_dec"]) @ params["W_enc"].T + params["b_enc"]
                values_BK, indices_BK = pre_BN.gather(1, chosen_BK).relu(), chosen_BK
                x_hat = reference.sparse_decode(values_BK, indices_BK, params["W_dec"], params["b_dec"])
        (x_hat.float() * probe_BD).sum().backward()
        return x_hat, values_BK, indices_BK, {name: p.grad.clone() for name, p in params.items()}

    x_hat, values_BK, indices_BK, grads = run(None)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        ref_top = ((x_BD - params["b_dec"]) @ W_enc.T + params["b_enc"]).float().topk(k, dim=-1).values.relu()
    tol = 1e-5 if dtype == torch.float32 and not autocast else 2e-2
    assert rel_err(values_BK.float().sort(-1, descending=True).values, ref_top) < tol
    x_hat_ref, _, _, grads_ref = run(indices_BK)
    assert rel_err(x_hat, x_hat_ref) < tol
    for name in params:
        assert rel_err(grads[name], grads_ref[name]) < tol, name


@pytest.mark.parametrize("x_grad", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_autograd_matches_torch(dtype: torch.dtype, x_grad: bool) -> None:
    check_encode_decode_grads(B=6, d=37, n=90, k=7, dtype=dtype, autocast=False, x_grad=x_grad)


@pytest.mark.skipif(not CUDA, reason="needs CUDA; CPU twin: test_autograd_matches_torch")
@pytest.mark.parametrize("x_grad", [True, False])
def test_autograd_matches_torch_bf16_autocast_gpu(x_grad: bool) -> None:
    # B·k ≥ 4n: the decoder gathers from its 16-bit copy of W_dec.
    check_encode_decode_grads(B=1031, d=257, n=16411, k=64, dtype=torch.float32, autocast=True, x_grad=x_grad)


@pytest.mark.parametrize("b_dec", [True, False])
@pytest.mark.parametrize("x_grad", [True, False])
def test_encode_at_and_its_sparse_backward_match_dense_autograd(x_grad: bool, b_dec: bool) -> None:
    """`encode_at` (AuxK's pre-activations at chosen features): values and every gradient as autograd's
    through the dense pre-activations gathered at the same indices."""
    B, d, n, k = 9, 37, 90, 11
    _, indices_BK = random_codes(B, k, n)
    params = {
        "x": torch.randn(B, d, device=DEVICE).requires_grad_(x_grad),
        "b_dec": (0.1 * torch.randn(d, device=DEVICE)).requires_grad_(),
        "W_enc": (torch.randn(n, d, device=DEVICE) / d**0.5).requires_grad_(),
        "b_enc": (0.1 * torch.randn(n, device=DEVICE)).requires_grad_(),
    }
    if not b_dec:
        del params["b_dec"]
    probe_BK = torch.randn(B, k, device=DEVICE)

    def run(dense: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        for p in params.values():
            p.grad = None
        x, W, b, c = params["x"], params["W_enc"], params["b_enc"], params.get("b_dec")
        if dense:
            pre_BK = ((x if c is None else x - c) @ W.T + b).gather(1, indices_BK)
        else:
            pre_BK = triton_ops.encode_at(x, W, b, indices_BK, c)
        (pre_BK * probe_BK).sum().backward()
        return pre_BK, {name: p.grad.clone() for name, p in params.items() if p.requires_grad}

    pre_BK, grads = run(dense=False)
    ref_BK, ref_grads = run(dense=True)
    assert pre_BK.dtype == torch.float32 and rel_err(pre_BK, ref_BK) < 1e-6
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert rel_err(grads[name], ref_grads[name]) < 1e-5, name


@pytest.mark.parametrize("edit", [False, True])
def test_one_feature_sort_serves_both_backward_passes(monkeypatch: pytest.MonkeyPatch, edit: bool) -> None:
    """The decoder's backward reuses the encoder's sort of the indices; indices changed in place after
    that sort was made (a retained graph keeps it alive) are sorted anew for the next decode."""
    calls = []
    monkeypatch.setattr(triton_ops, "sort_by_feature", lambda *a: calls.append(1) or sort_by_feature(*a))
    B, d, n, k = 9, 21, 40, 5
    x_BD = torch.randn(B, d, device=DEVICE)
    W_enc = torch.randn(n, d, device=DEVICE, requires_grad=True)
    W_dec = torch.randn(n, d, device=DEVICE, requires_grad=True)
    values_BK, indices_BK = triton_ops.topk_encode(x_BD, W_enc, torch.zeros(n, device=DEVICE), k)
    triton_ops.sparse_decode(values_BK, indices_BK, W_dec).sum().backward(retain_graph=edit)
    grad_W_dec = W_dec.grad
    assert len(calls) == 1
    if edit:
        indices_BK[:, 0] = (indices_BK[:, 0] + 1) % n
        x_hat = triton_ops.sparse_decode(values_BK, indices_BK, W_dec)
        (grad_W_dec,) = torch.autograd.grad(x_hat.sum(), [W_dec])  # the decoder's backward only
        assert len(calls) == 2
    W_ref = W_dec.detach().clone().requires_grad_()
    reference.sparse_decode(values_BK.detach(), indices_BK, W_ref).sum().backward()
    assert rel_err(grad_W_dec, W_ref.grad) < 1e-5


def test_decode_from_16bit_copy_of_fp32_atoms() -> None:
    """16-bit codes decoding an fp32 W_dec gathered often enough per step read a 16-bit copy of it; the
    result and gradients are those of the reference, which casts W_dec to the codes' dtype too. With an
    fp32 bias the output and its gradient are fp32, and the backward gathers a 16-bit copy of that."""
    B, k, n, d = 24, 5, 30, 19
    assert B * k >= triton_ops.LOW_PRECISION_TABLE_MIN_REUSE * n
    values_BK = torch.rand(B, k, device=DEVICE).half().requires_grad_()
    indices_BK = torch.stack([torch.randperm(n, device=DEVICE)[:k] for _ in range(B)])
    W_dec = torch.randn(n, d, device=DEVICE).requires_grad_()
    bias_D = torch.randn(d, device=DEVICE).requires_grad_()
    probe_BD = torch.randn(B, d, device=DEVICE)
    for bias in (None, bias_D):
        outs, grads = [], []
        for decode in (triton_ops.sparse_decode, reference.sparse_decode):
            values_BK.grad = W_dec.grad = bias_D.grad = None
            x_hat = decode(values_BK, indices_BK, W_dec, bias)
            (x_hat.float() * probe_BD).sum().backward()
            outs.append(x_hat)
            grads.append([values_BK.grad, W_dec.grad, bias_D.grad])
        assert outs[0].dtype == outs[1].dtype == (torch.float16 if bias is None else torch.float32)
        assert rel_err(outs[0], outs[1]) < 2e-3
        (got_v, got_w, got_b), (ref_v, ref_w, ref_b) = grads
        assert rel_err(got_v, ref_v) < 2e-3 and rel_err(got_w, ref_w) < 2e-3
        if bias is None:
            assert got_b is None and ref_b is None
        else:
            assert rel_err(got_b, ref_b) < 2e-3


def check_decode_with_mse(
    B: int, k: int, n: int, d: int, dtype: torch.dtype, use: str, bias: bool, autocast: bool = False
) -> None:
    """`decode_with_mse` against `sparse_decode` + `normalized_mse` in torch: x̂, the loss and the gradients of
    values, W_dec and bias, for a backward through the loss only (the fused one), through x̂ only, and through
    both (x̂'s gradient plus the loss's). The data has a mean far from zero and the loss a non-unit weight."""
    values_BK, indices_BK = random_codes(B, k, n, dtype)
    values_BK = values_BK.relu().requires_grad_()
    W_dec = (torch.randn(n, d, device=DEVICE) / d**0.5).to(dtype).requires_grad_()
    bias_D = (torch.randn(d, device=DEVICE) * 0.1).requires_grad_() if bias else None
    x_BD = (torch.randn(B, d, device=DEVICE) + 3 * torch.randn(d, device=DEVICE)).to(dtype)
    probe_BD = torch.randn(B, d, device=DEVICE)
    leaves = [t for t in (values_BK, W_dec, bias_D) if t is not None]
    results = []
    for fused in (True, False):
        for t in leaves:
            t.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            if fused:
                x_hat, mse = triton_ops.decode_with_mse(values_BK, indices_BK, W_dec, bias_D, x_BD)
            else:
                x_hat = reference.sparse_decode(values_BK, indices_BK, W_dec, bias_D)
                mse = reference.normalized_mse(x_BD, x_hat)
        total = {
            "loss": 3 * mse,
            "x_hat": (x_hat.float() * probe_BD).sum(),
            "both": 3 * mse + (x_hat.float() * probe_BD).sum() * 1e-3,
        }[use]
        total.backward()
        results.append((x_hat, mse, [t.grad for t in leaves]))
    (x_hat, mse, grads), (ref_x_hat, ref_mse, ref_grads) = results
    tol = 1e-5 if dtype == torch.float32 and not autocast else 2e-2
    assert x_hat.dtype == ref_x_hat.dtype and mse.dtype == torch.float32
    assert rel_err(x_hat, ref_x_hat) < tol and rel_err(mse, ref_mse) < tol
    for name, got, ref in zip(("values", "W_dec", "bias"), grads, ref_grads, strict=False):
        assert got is not None and got.dtype == ref.dtype, name
        assert rel_err(got, ref) < tol, name


@pytest.mark.parametrize("use", ["loss", "x_hat", "both"])
@pytest.mark.parametrize(
    ("B", "k", "n", "d", "dtype", "bias"),
    [
        (13, 5, 40, 70, torch.float32, True),  # ragged column chunk, k < BLOCK_K
        (6, 40, 97, 33, torch.float32, False),  # BLOCK_K = 64: narrower chunks
        (24, 5, 30, 19, torch.float16, True),  # 16-bit codes and atoms, fp32 bias: fp32 x̂
    ],
)
def test_decode_with_mse_matches_decode_then_loss(
    B: int, k: int, n: int, d: int, dtype: torch.dtype, bias: bool, use: str
) -> None:
    check_decode_with_mse(B, k, n, d, dtype, use, bias)


@pytest.mark.skipif(not CUDA, reason="needs CUDA; CPU twin: test_decode_with_mse_matches_decode_then_loss")
@pytest.mark.parametrize("use", ["loss", "both"])
def test_decode_with_mse_bf16_autocast_gpu(use: str) -> None:
    # B·k ≥ 4n: the fused decoder gathers from its 16-bit copy of W_dec.
    check_decode_with_mse(2053, 32, 4099, 768, torch.float32, use, bias=True, autocast=True)


def test_decode_with_mse_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """An x that needs a gradient, or codes with extra leading dims, get the unfused pair of calls; the
    kernel rejects an x of the wrong shape with the shapes it expected."""
    monkeypatch.setattr(kernels, "_BACKEND", "triton")
    values_BK, indices_BK = random_codes(6, 3, 20)
    W_dec = torch.randn(20, 8, device=DEVICE)
    x = torch.randn(6, 8, device=DEVICE, requires_grad=True)
    x_hat, mse = kernels.decode_with_mse(values_BK, indices_BK, W_dec, None, x)
    mse.backward()
    assert x.grad is not None and torch.equal(mse, reference.normalized_mse(x, x_hat))
    with pytest.raises(ValueError, match=r"x \(5, 8\)"):
        triton_ops.decode_with_mse(values_BK, indices_BK, W_dec, None, torch.randn(5, 8, device=DEVICE))


def test_topk_sae_training_forward_computes_its_loss_with_the_decoder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A TopK SAE in training mode takes its reconstruction loss from the fused decoder; loss and every
    parameter's gradient equal the torch backend's, and eval mode decodes without it."""
    from mmsae.sae import build_sae

    torch.manual_seed(0)
    sae = build_sae("topk", 24, 64, k=4, aux_k=0).to(DEVICE).train()
    x_BD = torch.randn(33, 24, device=DEVICE) + 2
    results = []
    for backend in ("triton", "torch"):
        monkeypatch.setattr(kernels, "_BACKEND", backend)
        sae.zero_grad(set_to_none=True)
        out = sae(x_BD)
        assert "mse" in out.aux
        loss = sae.loss(x_BD, out).loss
        loss.backward()
        results.append((loss, {name: p.grad.clone() for name, p in sae.named_parameters()}))
    (loss, grads), (ref_loss, ref_grads) = results
    assert rel_err(loss, ref_loss) < 1e-5
    for name, grad in grads.items():
        assert rel_err(grad, ref_grads[name]) < 1e-5, name
    sae.eval()
    assert "mse" not in sae(x_BD).aux
    # Matryoshka's loss is over prefix reconstructions: its forward leaves the loss to it.
    matryoshka = build_sae("matryoshka", 24, 64, k=4, selection="topk").to(DEVICE).train()
    assert "mse" not in matryoshka(x_BD).aux


# ----------------------------------------------------------------------------- dense row kernels
def check_center_cast(x_dtype: torch.dtype, out_dtype: torch.dtype, exact: bool) -> None:
    """37 × 300 spans two column tiles and a ragged row block; also a non-contiguous x."""
    x_BD = (torch.randn(37, 300, device=DEVICE) * 3).to(x_dtype)
    b_D = torch.randn(300, device=DEVICE)
    expected = (x_BD - b_D).to(out_dtype)
    for x in (x_BD, x_BD.T.contiguous().T):
        got = center_cast(x, b_D, out_dtype)
        assert got.dtype == out_dtype
        if exact:
            assert torch.equal(got, expected)
        else:  # one rounding step: the interpreter truncates fp32 → 16-bit instead of rounding to nearest
            step = torch.finfo(out_dtype).eps * expected.float().abs()
            assert ((got.float() - expected.float()).abs() <= step).all()


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_center_cast_equals_subtract_then_cast(x_dtype: torch.dtype, out_dtype: torch.dtype) -> None:
    """Bit for bit on the GPU; within one rounding step in the CPU interpreter."""
    check_center_cast(x_dtype, out_dtype, exact=CUDA or out_dtype == torch.float32)


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("x_hat_dtype", [torch.bfloat16, torch.float32])
def test_normalized_mse_and_gradient_match_the_reference(
    x_dtype: torch.dtype, x_hat_dtype: torch.dtype
) -> None:
    """Forward and x̂'s gradient against the torch reference, with a data mean far from zero (the variance
    is taken around the column means) and a non-unit upstream gradient."""
    x_BD = (torch.randn(37, 300, device=DEVICE) + 5 * torch.randn(300, device=DEVICE)).to(x_dtype)
    x_hat_BD = (x_BD.float() + 0.3 * torch.randn(37, 300, device=DEVICE)).to(x_hat_dtype)
    results = []
    for fn in (triton_ops.normalized_mse, reference.normalized_mse):
        leaf = x_hat_BD.clone().requires_grad_()
        loss = fn(x_BD, leaf)
        (loss * 3).backward()
        assert loss.dtype == torch.float32 and leaf.grad.dtype == x_hat_dtype
        results.append((loss, leaf.grad))
    (loss, grad), (ref_loss, ref_grad) = results
    assert rel_err(loss, ref_loss) < 1e-5
    assert rel_err(grad, ref_grad) < (1e-5 if x_hat_dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("B", [1, 130, 300])  # one row; more rows than one program sums; several programs
def test_col_sums_and_16bit_copy(B: int) -> None:
    x_BD = torch.randn(B, 300, device=DEVICE)
    sums_D, copy_BD = col_sums(x_BD, torch.bfloat16)
    assert rel_err(sums_D, x_BD.double().sum(0)) < 1e-6
    assert copy_BD is not None and copy_BD.dtype == torch.bfloat16
    step = torch.finfo(torch.bfloat16).eps * x_BD.abs()  # interpreter: truncated; GPU: rounded to nearest
    assert ((copy_BD.float() - x_BD).abs() <= step).all()
    if CUDA:
        assert torch.equal(copy_BD, x_BD.bfloat16())
    assert col_sums(x_BD)[1] is None
    w_B = torch.randn(B, device=DEVICE)  # weighted: a GEMV wᵀx with fp32 sums over 16-bit rows
    x16_BD = x_BD.bfloat16()
    assert rel_err(col_sums(x16_BD, weights_B=w_B)[0], w_B.double() @ x16_BD.double()) < 1e-6
    with pytest.raises(ValueError, match="one per row"):
        col_sums(x_BD, weights_B=w_B[1:])


def test_normalized_mse_dispatch_keeps_the_reference_where_the_kernel_does_not_apply(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """[B, T, d] inputs (means over the first axis only) and an x that needs a gradient take the reference."""
    monkeypatch.setattr(kernels, "_BACKEND", "triton")
    x = torch.randn(4, 3, 8, device=DEVICE)
    x_hat = torch.randn(4, 3, 8, device=DEVICE)
    assert torch.equal(kernels.normalized_mse(x, x_hat), reference.normalized_mse(x, x_hat))
    x2 = torch.randn(6, 8, device=DEVICE, requires_grad=True)
    loss = kernels.normalized_mse(x2, x2.detach() * 0.9)
    loss.backward()
    assert x2.grad is not None and torch.equal(loss, reference.normalized_mse(x2, x2.detach() * 0.9))


# ----------------------------------------------------------------------------- dispatch
def test_backend_flag_and_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="Unknown kernel backend"):
        kernels.set_backend("cuda")  # type: ignore[arg-type]
    cpu = torch.zeros(1)
    monkeypatch.setattr(kernels, "_BACKEND", "auto")  # restored after the test whatever set_backend does
    assert not kernels._use_triton(cpu), "auto must fall back to torch off CUDA"
    kernels.set_backend("torch")
    assert not kernels._use_triton(torch.zeros(1, device=DEVICE))
    kernels.set_backend("triton")
    assert kernels._use_triton(cpu)
    x_BD, W, b = (
        torch.randn(4, 9, device=DEVICE),
        torch.randn(20, 9, device=DEVICE),
        torch.randn(20, device=DEVICE),
    )
    values, indices = kernels.topk_encode(x_BD, W, b, 3)
    ref_values, _ = reference.topk_encode(x_BD, W, b, 3)
    assert rel_err(values.sort(-1).values, ref_values.sort(-1).values) < 1e-5
    assert (
        rel_err(kernels.sparse_decode(values, indices, W), reference.sparse_decode(values, indices, W)) < 1e-5
    )
