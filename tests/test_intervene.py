"""Intervention core: edit algebra, hooks on a real timm ViT, masks, restoring the model, bad input."""

from __future__ import annotations

import pytest
import torch

import mmsae
from mmsae.encoders.registry import get_encoder
from mmsae.intervene.edits import Add, Clamp, Direction, EditContext, Scale, Set, SetMax, Zero, parse_edit
from mmsae.intervene.intervention import (
    Intervention,
    Splice,
    apply_edits,
    feature_columns,
    grid_for,
    spatial_gate,
)
from mmsae.intervene.text_steer import concept_delta
from mmsae.sae.base import as_dense


@pytest.fixture(scope="module")
def vit():
    return get_encoder("timm:test_vit")


@pytest.fixture()
def sae(vit):
    return mmsae.build_sae("topk", 64, 256, k=8, hook="blocks.4", encoder=vit.id)


@pytest.fixture(scope="module")
def pixels(vit):
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, *vit.data_config["input_size"], generator=g)


def exact_sae(d: int, hook: str, encoder: str):
    """Atoms ±e_j with k = d: relu keeps exactly the sign-matching atom of each dimension → x̂ = x."""
    sae = mmsae.build_sae("topk", d, 2 * d, k=d, hook=hook, encoder=encoder, aux_k=0)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_keep_error_edit_equals_error_plus_edited_decode(sae):
    x = torch.randn(10, 64)
    codes = sae.encode(x)
    f = as_dense(codes)
    f_new = f.clone()
    f_new[:, 3] = 5.0
    f_new[:, 7] *= 0.5
    expected = (x - sae.decode(codes)) + f_new @ sae.W_dec + sae.b_dec
    out = apply_edits(sae, x, [Set(3, 5.0), Scale(7, 0.5)], EditContext())
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_no_edits_is_identity_or_reconstruction(sae):
    x = torch.randn(6, 64)
    assert torch.equal(apply_edits(sae, x, [], EditContext()), x)
    torch.testing.assert_close(apply_edits(sae, x, [], EditContext(), keep_error=False), sae(x).x_hat)


def test_direction_adds_scaled_decoder_row(sae):
    x = torch.randn(4, 64)
    out = apply_edits(sae, x, [Direction(5, 3.0)], EditContext())
    torch.testing.assert_close(out, x + 3.0 * sae.W_dec[5])


def test_edits_of_one_feature_compose_in_order(sae):
    x = torch.randn(5, 64)
    codes = sae.encode(x)
    f_i = feature_columns(codes, torch.tensor([9]))[:, 0]
    out = apply_edits(sae, x, [Set(9, 2.0), Add(9, 1.0), Scale(9, 2.0)], EditContext())
    torch.testing.assert_close(out, x + (6.0 - f_i)[:, None] * sae.W_dec[9], atol=1e-5, rtol=1e-5)


def test_feature_columns_sparse_matches_dense(sae):
    x = torch.randn(7, 64)
    codes = sae.encode(x)
    features = torch.arange(0, 256, 5)
    torch.testing.assert_close(feature_columns(codes, features), codes.dense()[:, features])


def test_column_ops():
    f = torch.tensor([-1.0, 0.5, 3.0])
    ctx = EditContext(max_acts=torch.tensor([0.0, 4.0]))
    assert Set(0, 2.0).apply(f, ctx).tolist() == [2.0, 2.0, 2.0]
    assert Add(0, 1.0).apply(f, ctx).tolist() == [0.0, 1.5, 4.0]
    assert Scale(0, 2.0).apply(f, ctx).tolist() == [-2.0, 1.0, 6.0]
    assert Clamp(0, 0.0, 1.0).apply(f, ctx).tolist() == [0.0, 0.5, 1.0]
    assert Clamp(0, None, 1.0).apply(f, ctx).tolist() == [-1.0, 0.5, 1.0]
    assert SetMax(1, -2.5).apply(f, ctx).tolist() == [-10.0, -10.0, -10.0]
    assert Zero(0).apply(f, ctx).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="max_activations"):
        SetMax(1, 2.0).apply(f, EditContext())


def test_parse_edit():
    assert parse_edit("set:12=5") == Set(12, 5.0)
    assert parse_edit("dir:3=-4.5") == Direction(3, -4.5)
    assert parse_edit("zero:7") == Zero(7)
    assert parse_edit("clamp:3=:2") == Clamp(3, None, 2.0)
    assert parse_edit("max:1=10") == SetMax(1, 10.0)
    for bad in ("bogus:1=2", "set:1", "set:x=2", "zero:1=3", "clamp:1=2", "set12=5"):
        with pytest.raises(ValueError, match=r"(?i)edit"):
            parse_edit(bad)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Set(1, float("nan")),
        lambda: Add(1, float("inf")),
        lambda: Scale(1, float("nan")),
        lambda: SetMax(1, float("nan")),
        lambda: Direction(1, float("-inf")),
        lambda: Clamp(1, float("nan"), None),
        lambda: parse_edit("max:1=nan"),
    ],
)
def test_non_finite_strengths_are_refused(make):
    """A NaN strength used to be accepted: replies held NaN and steered images got NaN edits."""
    with pytest.raises(ValueError, match=r"edit of feature 1: \w+=(nan|inf|-inf) is not a finite number"):
        make()


def test_intervention_changes_output_and_restores_exactly(vit, sae, pixels):
    bare = vit.run_model(pixels).detach()
    module = vit.module("blocks.4")
    n_hooks = len(module._forward_hooks)
    with Intervention(vit, Splice(sae, [Set(3, 20.0)])) as iv:
        steered = vit.run_model(pixels).detach()
    assert iv.splices[0].n_applied == 1
    assert not torch.allclose(steered, bare, atol=1e-3)
    assert len(module._forward_hooks) == n_hooks
    assert torch.equal(vit.run_model(pixels), bare)


def test_hooks_removed_when_the_body_raises(vit, sae, pixels):
    module = vit.module("blocks.4")
    n_hooks = len(module._forward_hooks)
    with pytest.raises(RuntimeError, match="boom"), Intervention(vit, Splice(sae, [Set(3, 20.0)])):
        raise RuntimeError("boom")
    assert len(module._forward_hooks) == n_hooks


def test_exact_sae_spliced_without_error_is_lossless(vit, pixels):
    bare = vit.run_model(pixels).detach()
    with Intervention(vit, Splice(exact_sae(64, "blocks.4", vit.id), keep_error=False)):
        spliced = vit.run_model(pixels).detach()
    torch.testing.assert_close(spliced, bare, atol=1e-4, rtol=1e-4)


def test_zero_token_mask_leaves_model_unchanged_and_cls_mask_edits_only_cls(vit, sae, pixels):
    T = vit.n_prefix + vit.grid[0] * vit.grid[1]
    bare = vit.activations(pixels, ["blocks.4"])["blocks.4"].acts_ND.view(2, T, -1)
    with Intervention(vit, Splice(sae, [Set(3, 20.0)], token_mask=torch.zeros(T))):
        zero = vit.activations(pixels, ["blocks.4"])["blocks.4"].acts_ND.view(2, T, -1)
    assert torch.equal(zero, bare)
    # activations() reads the hook output after the edit hook, so it sees the edited tokens.
    cls_only = torch.zeros(T, dtype=torch.bool)
    cls_only[0] = True
    with Intervention(vit, Splice(sae, [Set(3, 20.0)], token_mask=cls_only)):
        edited = vit.activations(pixels, ["blocks.4"])["blocks.4"].acts_ND.view(2, T, -1)
    assert torch.equal(edited[:, 1:], bare[:, 1:])
    assert not torch.allclose(edited[:, 0], bare[:, 0])


def test_spatial_mask_edits_only_masked_patches(vit, sae, pixels):
    T = vit.n_prefix + vit.grid[0] * vit.grid[1]
    bare = vit.activations(pixels, ["blocks.4"])["blocks.4"].acts_ND.view(2, T, -1)
    mask = torch.zeros(160, 160)
    mask[:, :80] = 1.0  # left half of the image
    with Intervention(vit, Splice(sae, [Direction(3, 5.0)], spatial_mask=mask)):
        edited = vit.activations(pixels, ["blocks.4"])["blocks.4"].acts_ND.view(2, T, -1)
    changed_HW = (edited - bare).abs().amax(-1).amax(0)[1:].view(vit.grid) > 1e-4
    half = vit.grid[1] // 2
    assert changed_HW[:, :half].all() and not changed_HW[:, half:].any()
    assert torch.equal(edited[:, 0], bare[:, 0])  # the CLS prefix is never spatial


def test_grid_and_spatial_gate():
    assert grid_for(384, 512 / 768) == (16, 24)
    assert grid_for(256, 1.0) == (16, 16)
    gate = spatial_gate(torch.ones(4, 4), 17, n_prefix=1)
    assert gate.shape == (17,) and gate[0] == 0 and (gate[1:] == 1).all()
    with pytest.raises(ValueError, match="does not fit"):
        grid_for(197, 1.0)


def test_several_saes_at_once(vit, sae, pixels):
    other = mmsae.build_sae("topk", 64, 128, k=4, hook="blocks.1", encoder=vit.id)
    single = Splice(sae, [Set(3, 20.0)])
    with Intervention(vit, single):
        one = vit.run_model(pixels).detach()
    splices = [Splice(sae, [Set(3, 20.0)]), Splice(other, [Set(1, 20.0)])]
    with Intervention(vit, splices):
        two = vit.run_model(pixels).detach()
    assert [s.n_applied for s in splices] == [1, 1]
    assert not torch.allclose(one, two, atol=1e-3)


def test_refuses_sae_from_another_hook_or_encoder(vit, sae):
    with pytest.raises(ValueError, match=r"trained on hook 'blocks\.4'"):
        Intervention(vit, Splice(sae, hook="blocks.2"))
    foreign = mmsae.build_sae("topk", 64, 256, k=8, hook="blocks.4", encoder="timm:vit_base_patch16_224")
    with pytest.raises(ValueError, match="trained on encoder 'timm:vit_base_patch16_224'"):
        Intervention(vit, Splice(foreign))
    nohook = mmsae.build_sae("topk", 64, 256, k=8)
    with pytest.raises(ValueError, match="records no hook"):
        Intervention(vit, Splice(nohook))
    with pytest.raises(KeyError, match="Unknown hook point"):
        Intervention(vit, Splice(nohook, hook="blocks.99"))


def test_bad_feature_window_half_and_mask(vit, sae, pixels):
    with pytest.raises(IndexError, match="256 features"):
        Intervention(vit, Splice(sae, [Set(256, 1.0)]))
    with pytest.raises(IndexError, match="256 features"):
        Intervention(vit, Splice(sae, [Direction(-1, 1.0)]))
    with pytest.raises(ValueError, match="diffusion encoder"):
        Intervention(vit, Splice(sae, [Set(1, 1.0)], timesteps=(0, 10)))
    with (
        pytest.raises(ValueError, match="classifier-free guidance"),
        Intervention(vit, Splice(sae, [Set(1, 1.0)], cfg_half="cond")),
    ):
        vit.run_model(pixels)
    with (
        pytest.raises(ValueError, match="token_mask has shape"),
        Intervention(vit, Splice(sae, [Set(1, 1.0)], token_mask=torch.ones(5))),
    ):
        vit.run_model(pixels)
    with pytest.raises(ValueError, match="max_acts has shape"):
        Intervention(vit, Splice(sae, [SetMax(1, 1.0)], max_acts=torch.ones(3)))


def normalised_sae(mode: str, vit) -> tuple[mmsae.SAE, mmsae.SAE]:
    """A TopK SAE with per-token input normalisation, and its twin without (same weights)."""
    sae = mmsae.build_sae("topk", 64, 256, k=8, hook="blocks.4", encoder=vit.id, input_norm=mode)
    plain = mmsae.build_sae("topk", 64, 256, k=8, hook="blocks.4", encoder=vit.id)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(64, generator=torch.Generator().manual_seed(3)) * 0.1)
    plain.load_state_dict(sae.state_dict())
    return sae, plain


def hand_stats(mode: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(xₙ, scale, shift) of SAELens' formulas: x̂ = x̂ₙ·scale + shift."""
    if mode == "layer_norm":
        mu = x.mean(-1, keepdim=True)
        sigma = (x - mu).std(-1, keepdim=True)
        return (x - mu) / (sigma + 1e-5), sigma, mu
    norm = x.norm(dim=-1, keepdim=True)
    return x * 64**0.5 / norm, norm / 64**0.5, torch.zeros_like(norm)


@pytest.mark.parametrize("mode", ["layer_norm", "constant_norm_rescale"])
def test_edits_on_a_normalising_sae_match_a_hand_computation(mode, vit):
    sae, plain = normalised_sae(mode, vit)
    x = torch.randn(6, 64) * torch.tensor([1.0, 7.0, 0.2, 1.0, 3.0, 1.0])[:, None] + 0.5
    x_n, scale, shift = hand_stats(mode, x)
    f = as_dense(plain.encode(x_n))  # the codes are those of the normalised tokens
    torch.testing.assert_close(sae.encode_dense(x), f)
    f_new = f.clone()
    f_new[:, 3] = 5.0
    recon = (f @ sae.W_dec + sae.b_dec) * scale + shift
    edited = (f_new @ sae.W_dec + sae.b_dec) * scale + shift
    tol = {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(sae(x).x_hat, recon, **tol)
    torch.testing.assert_close(apply_edits(sae, x, [Set(3, 5.0)], EditContext()), x - recon + edited, **tol)
    torch.testing.assert_close(
        apply_edits(sae, x, [Set(3, 5.0)], EditContext(), keep_error=False), edited, **tol
    )
    torch.testing.assert_close(
        apply_edits(sae, x, [Direction(5, 3.0)], EditContext()), x + 3.0 * scale * sae.W_dec[5], **tol
    )


@pytest.mark.parametrize("mode", ["layer_norm", "constant_norm_rescale"])
def test_identity_edit_on_a_normalising_sae_keeps_the_model_exact(mode, vit, pixels):
    sae, _ = normalised_sae(mode, vit)
    x = torch.randn(5, 64) * 4.0
    assert torch.equal(apply_edits(sae, x, [Scale(3, 1.0), Add(9, 0.0)], EditContext()), x)
    with torch.no_grad():
        bare = vit.run_model(pixels)
        with Intervention(vit, Splice(sae, [Scale(3, 1.0)])):
            same = vit.run_model(pixels)
        with Intervention(vit, Splice(sae, [Set(3, 50.0)])):
            steered = vit.run_model(pixels)
    assert torch.equal(same, bare) and not torch.allclose(steered, bare)


def test_text_concept_delta_on_a_normalising_sae_is_scaled_per_token(vit):
    sae, plain = normalised_sae("layer_norm", vit)
    h = torch.randn(4, 64) * torch.tensor([1.0, 5.0, 0.5, 2.0])[:, None]
    h_n, scale, _ = hand_stats("layer_norm", h)
    expected = scale * (0.5 * plain.pre_acts(h_n).relu() @ sae.W_dec)
    torch.testing.assert_close(concept_delta(sae, h, 0.5), expected, atol=1e-5, rtol=1e-5)
