"""Converters against files written by the real libraries (tests/fixtures/converters, made by its
make_fixtures.py with SAELens, EleutherAI sparsify and SAeUron): mmsae reproduces each library's own
codes and reconstructions on the stored inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mmsae
from mmsae.convert import from_saelens, from_sparsify
from mmsae.encoders.registry import get_encoder
from mmsae.intervene.edits import Set
from mmsae.intervene.intervention import Intervention, Splice
from mmsae.sae.base import REGISTRY, SAE, SAEConfig, SAEOutput

FIXTURES = Path(__file__).parent / "fixtures" / "converters"
SCALE = json.loads((FIXTURES / "versions.json").read_text())["norm_scaling_factor"]
TOL = {"rtol": 1e-5, "atol": 1e-5}


def expected(name: str) -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / name / "expected.safetensors")


def check_outputs(sae: mmsae.SAE, name: str, codes_match: bool = True) -> None:
    ref = expected(name)
    with torch.no_grad():
        out = sae(ref["x"])
        torch.testing.assert_close(out.x_hat, ref["recon"], **TOL)
        if codes_match:
            torch.testing.assert_close(sae.encode_dense(ref["x"]), ref["codes"], **TOL)
    assert (ref["codes"] != 0).any() and (ref["codes"] == 0).any()
    assert not sae.training


@pytest.mark.parametrize(
    "name",
    [
        "saelens_standard",
        "saelens_standard_no_bdec",
        "saelens_topk",
        "saelens_jumprelu",
        "saelens_jumprelu_no_bdec",
        "saelens_gated",
        "saelens_gated_no_bdec",
    ],
)
def test_saelens_files_reproduce_saelens_outputs(name: str) -> None:
    sae = from_saelens(FIXTURES / name)
    check_outputs(sae, name)
    assert sae.cfg.hook == "blocks.2.hook_resid_post" and sae.cfg.extra["converted_from"] == "saelens"


def test_saelens_decoder_norm_rescaling_reproduces_reconstructions() -> None:
    """rescale_acts_by_decoder_norm: SAELens' codes are z·‖W_dec‖, decoded with unit atoms."""
    sae = from_saelens(FIXTURES / "saelens_topk_rescaled")
    check_outputs(sae, "saelens_topk_rescaled")
    raw = load_file(FIXTURES / "saelens_topk_rescaled" / "sae_weights.safetensors")
    assert not torch.allclose(raw["W_dec"].norm(dim=-1), torch.ones(64))  # the flag changes the math here


def test_saelens_expected_average_scale_is_folded() -> None:
    name = "saelens_expected_average"
    with pytest.raises(ValueError, match="norm_scaling_factor"):
        from_saelens(FIXTURES / name)
    check_outputs(from_saelens(FIXTURES / name, norm_scaling_factor=SCALE), name)


@pytest.mark.parametrize(
    ("name", "mode"),
    [("saelens_layer_norm", "layer_norm"), ("saelens_constant_norm", "constant_norm_rescale")],
)
def test_saelens_per_token_normalisation_reproduces_saelens_outputs(
    name: str, mode: str, tmp_path: Path
) -> None:
    """SAELens normalises each token on the way in and undoes it on x̂: mmsae's `input_norm` does the same
    (the fixture inputs include a token at 7× scale), and the mode survives a save and load."""
    sae = from_saelens(FIXTURES / name)
    assert sae.cfg.input_norm == mode
    check_outputs(sae, name)
    ref = expected(name)
    _, stats = sae.normalize(ref["x"])
    with torch.no_grad():  # decode gives x̂ₙ; denormalize with the tokens' statistics gives x̂
        torch.testing.assert_close(
            sae.denormalize(sae.decode(sae.encode(ref["x"])), stats), ref["recon"], **TOL
        )
    sae.save(str(tmp_path / "sae"))
    loaded = mmsae.load_sae(tmp_path / "sae")
    assert loaded.cfg.input_norm == mode
    check_outputs(loaded, name)


def test_saelens_covariance_whitening_is_refused_by_name(tmp_path: Path) -> None:
    """Its statistics live in SAELens' activation-scaler file, not the SAE folder (SAELens folds them into
    the weights when training ends), so there is nothing to convert them from."""
    folder = tmp_path / "whitened"
    shutil.copytree(FIXTURES / "saelens_standard", folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps(cfg | {"normalize_activations": "covariance_whitening"}))
    with pytest.raises(ValueError, match=r"cfg\.json.*covariance_whitening.*fold_activation_whitening"):
        from_saelens(folder)


@pytest.mark.parametrize("name", ["sparsify_topk", "sparsify_topk_free_decoder"])
def test_sparsify_files_reproduce_sparsify_outputs(name: str) -> None:
    for path, hookpoint in [(FIXTURES / name, "layers.3"), (FIXTURES / name / "layers.3", None)]:
        sae = from_sparsify(path, hookpoint=hookpoint)
        check_outputs(sae, name)
        assert sae.cfg.hook == "layers.3" and sae.cfg.k == 6 and sae.cfg.n_features == 64
    assert sae.cfg.unit_norm_decoder == (name == "sparsify_topk")


def test_saeuron_file_reproduces_saeuron_outputs() -> None:
    """SAeUron's fork of sparsify: extra cfg fields (batch_topk is training-only: its loader encodes
    per token), hookpoint folders named after the pipeline module (`unet.` + the UNet's module path)."""
    sae = from_sparsify(FIXTURES / "saeuron", hookpoint="unet.up_blocks.1.attentions.1")
    check_outputs(sae, "saeuron")
    assert sae.cfg.hook == "up_blocks.1.attentions.1"  # the module path mmsae's UNet encoder names
    assert sae.cfg.extra["source_hook"] == "unet.up_blocks.1.attentions.1" and sae.cfg.site == "output"
    diff = from_sparsify(FIXTURES / "saeuron", hookpoint="unet.up_blocks.1.attentions.1", site="update")
    assert diff.cfg.site == "update"  # trained on output − input (SAeUron's output_or_diff="diff")


def test_saeuron_input_unit_norm_reproduces_saeuron_outputs() -> None:
    """input_unit_norm: (x − μ)/(σ + 1e-5) per token in, x̂ₙ·σ + μ out, as SAELens' layer_norm."""
    sae = from_sparsify(FIXTURES / "saeuron_unit_norm" / "unet.up_blocks.1.attentions.1")
    assert sae.cfg.input_norm == "layer_norm"
    check_outputs(sae, "saeuron_unit_norm")
    assert (
        from_sparsify(FIXTURES / "saeuron", hookpoint="unet.up_blocks.1.attentions.1").cfg.input_norm
        == "none"
    )


def test_sparsify_groupmax_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "layers.3"
    shutil.copytree(FIXTURES / "sparsify_topk" / "layers.3", folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps(cfg | {"activation": "groupmax"}))
    with pytest.raises(ValueError, match="groupmax"):
        from_sparsify(folder)


def test_hook_is_user_given_inferred_or_a_clear_error(tmp_path: Path) -> None:
    sae = from_saelens(FIXTURES / "saelens_topk", hook="visual.transformer.resblocks.1")
    assert sae.cfg.hook == "visual.transformer.resblocks.1"
    assert sae.cfg.extra["source_hook"] == "blocks.2.hook_resid_post"
    assert from_sparsify(FIXTURES / "sparsify_topk", hookpoint="layers.3", hook="h.3").cfg.hook == "h.3"
    bare = tmp_path / "bare"
    shutil.copytree(FIXTURES / "saelens_topk", bare)
    cfg = json.loads((bare / "cfg.json").read_text())
    cfg["metadata"].pop("hook_name")
    (bare / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"cfg\.json.*hook.*hook="):
        from_saelens(bare)
    assert from_saelens(bare, hook="blocks.0").cfg.hook == "blocks.0"


def test_converted_sae_splices_into_an_encoder(tmp_path: Path) -> None:
    """A SAELens SAE (layout of the golden files, at the tiny CLIP's width) records a TransformerLens hook
    name, which no mmsae encoder has; with the module path given as hook= an Intervention accepts it."""
    clip = get_encoder("clip:tiny")
    folder = tmp_path / "lens"
    shutil.copytree(FIXTURES / "saelens_topk", folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps(cfg | {"d_in": 32}))
    gen = torch.Generator().manual_seed(0)
    weights = {"W_enc": torch.randn(32, 64, generator=gen), "W_dec": torch.randn(64, 32, generator=gen)}
    save_file(
        weights | {"b_enc": torch.zeros(64), "b_dec": torch.zeros(32)}, folder / "sae_weights.safetensors"
    )
    pixels = torch.randn(2, 3, 32, 32)
    with pytest.raises(KeyError, match=r"blocks\.2\.hook_resid_post"):  # the recorded name is no module
        Intervention(clip, Splice(from_saelens(folder, encoder=clip.id), [Set(7, 10.0)]))
    sae = from_saelens(folder, hook="visual.transformer.resblocks.0", encoder=clip.id)
    with torch.no_grad():
        bare = clip.encode_image(pixels)
        with Intervention(clip, Splice(sae, [Set(7, 10.0)])):
            steered = clip.encode_image(pixels)
    assert steered.shape == bare.shape and not torch.allclose(bare, steered)


def test_input_norm_is_inference_only_and_old_configs_load(tmp_path: Path) -> None:
    sae = from_saelens(FIXTURES / "saelens_layer_norm")
    with pytest.raises(ValueError, match=r"input_norm='layer_norm'.*inference only.*folded"):
        sae.train()
    assert not sae.training
    with pytest.raises(ValueError, match=r"input_norm='unit'.*layer_norm"):
        mmsae.build_sae("relu", 16, 64, input_norm="unit")
    plain = from_saelens(FIXTURES / "saelens_standard")
    plain.save(str(tmp_path / "old"))
    cfg = json.loads((tmp_path / "old" / "cfg.json").read_text())
    cfg.pop("input_norm")  # a cfg.json written before the field existed
    (tmp_path / "old" / "cfg.json").write_text(json.dumps(cfg))
    old = mmsae.load_sae(tmp_path / "old")
    assert old.cfg.input_norm == "none"
    check_outputs(old, "saelens_standard")


VARIANT_OPTIONS = {
    "relu": {},
    "jumprelu": {},
    "gated": {},
    "archetypal": {"k": 4, "n_anchors": 32},
    "hierarchical_topk": {"ks": (2, 4)},
}
"""Options each registered variant needs at d=16, n=64 (the others take k)."""


@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("mode", ["layer_norm", "constant_norm_rescale"])
def test_every_variant_normalises_once(name: str, mode: str) -> None:
    """encode(x) codes normalize(x), once (variants' hooks call each other and pre_acts from their own
    forward), and forward(x) is decode(encode(x)) denormalised."""
    options = VARIANT_OPTIONS.get(name, {"k": 4})
    sae = mmsae.build_sae(name, 16, 64, input_norm=mode, **options)
    plain = mmsae.build_sae(name, 16, 64, **options)
    plain.load_state_dict(sae.state_dict())
    x = torch.randn(5, 16) * torch.tensor([1.0, 6.0, 0.3, 1.0, 2.0])[:, None] + 0.5
    x_n, stats = sae.normalize(x)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode_dense(x), plain.encode_dense(x_n))
        torch.testing.assert_close(sae(x).x_hat, sae.denormalize(plain(x_n).x_hat, stats))
        torch.testing.assert_close(sae(x).x_hat, sae.denormalize(sae.decode(sae.encode(x)), stats))


def test_hierarchical_budget_passes_through_the_normalisation() -> None:
    sae = mmsae.build_sae("hierarchical_topk", 16, 64, ks=(2, 4), input_norm="layer_norm")
    plain = mmsae.build_sae("hierarchical_topk", 16, 64, ks=(2, 4))
    plain.load_state_dict(sae.state_dict())
    x = torch.randn(5, 16) * 3 + 0.5
    x_n, stats = sae.normalize(x)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x, k=2).dense(), plain.encode(x_n, 2).dense())
        torch.testing.assert_close(sae(x, 2).x_hat, sae.denormalize(plain(x_n, k=2).x_hat, stats))
        assert sae(x, k=2).codes.values.shape == (5, 2)


class _GateSAE(SAE):
    """A variant defined outside mmsae: only hooks on its own input, no knowledge of `cfg.input_norm`."""

    arch = "_test_gate"

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        pre_BN = self.pre_acts(x)
        return pre_BN * (pre_BN > 0.1)

    def _forward(self, x: torch.Tensor) -> SAEOutput:
        codes_BN = self._encode(x)
        return SAEOutput(self.decode(codes_BN), codes_BN, {"input_norm": x.norm(dim=-1)})


def test_new_variant_gets_input_norm_without_doing_anything() -> None:
    """A variant that implements only the hooks is normalised by the base class's encode and forward."""
    sae = _GateSAE(SAEConfig(d_in=16, n_features=64, input_norm="constant_norm_rescale"))
    plain = _GateSAE(SAEConfig(d_in=16, n_features=64))
    plain.load_state_dict(sae.state_dict())
    x = torch.randn(5, 16) * torch.tensor([1.0, 6.0, 0.3, 1.0, 2.0])[:, None] + 0.5
    x_n, stats = sae.normalize(x)
    with torch.no_grad():
        out = sae(x)
        torch.testing.assert_close(out.aux["input_norm"], torch.full((5,), 16**0.5))  # its hook saw xₙ
        torch.testing.assert_close(sae.encode(x), plain.encode(x_n))
        torch.testing.assert_close(out.x_hat, sae.denormalize(plain(x_n).x_hat, stats))
        with pytest.raises(ValueError, match="d_in=16"):
            sae.encode(x[:, :8])


def test_variant_replacing_an_entry_point_is_refused() -> None:
    """A variant that defined encode or forward itself would skip `cfg.input_norm`: a clear error instead."""
    with pytest.raises(TypeError, match=r"_Bad defines encode: .*_encode"):

        class _Bad(SAE):
            def encode(self, x: torch.Tensor) -> torch.Tensor:
                return self.pre_acts(x)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_no_input_norm_adds_nothing_to_the_forward(name: str) -> None:
    """Without `cfg.input_norm` (every training run) encode and forward never normalise."""
    options = VARIANT_OPTIONS.get(name, {"k": 4})
    sae = mmsae.build_sae(name, 16, 64, **options)
    x = torch.randn(6, 16)

    def refuse(*args: object) -> None:
        raise AssertionError("normalised an input of an SAE without input_norm")

    sae.normalize = sae.denormalize = refuse  # type: ignore[method-assign]
    with torch.no_grad():
        sae(x)
        sae.encode(x)
    sae.train()(x).x_hat.sum().backward()  # the training forward, fused decoder included
