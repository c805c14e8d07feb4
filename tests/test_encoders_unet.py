"""Diffusion UNet adapter on diffusers' tiny SD test components (real classes, random init, 2 DDIM steps)."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch

import mmsae
from mmsae.datasets.images import PromptList
from mmsae.encoders import get_encoder
from mmsae.encoders.unet import UNetEncoder, tiny_pipeline
from mmsae.extract import extract
from mmsae.intervene.cli import cli_main

PROMPTS = ["a red cube", "a cat"]
BLOCK = "up_blocks.0.attentions.0"  # a Transformer2DModel at the lowest resolution
TEXT = "text_encoder.encoder.layers.1"


@pytest.fixture(scope="module")
def enc() -> UNetEncoder:
    return get_encoder("unet:tiny")


def test_hook_names(enc: UNetEncoder) -> None:
    hooks = enc.hook_points()
    assert {
        BLOCK,
        "up_blocks.0.attentions.1",
        "mid_block.attentions.0",
        "down_blocks.1.attentions.0",
        "text_encoder.encoder.layers.0",
        TEXT,
    } <= set(hooks)
    assert not any("attn1" in h for h in hooks)  # attention internals are not block-level hooks
    assert enc.default_hook in hooks
    assert enc.module("text_encoder.text_model.encoder.layers.1") is enc.module(TEXT)  # transformers-4 name


def test_timesteps_cond_grid_and_update(enc: UNetEncoder) -> None:
    acts = enc.activations(
        PROMPTS, [BLOCK, "up_blocks.0.resnets.0", TEXT], cfg_half="both", height=32, width=48
    )  # non-square: latents 16×24, this block runs at 8×12
    block = acts[BLOCK]
    steps = enc.pipe.scheduler.timesteps.tolist()
    assert len(steps) == 2 and block.meta["grid"].tolist() == [8, 12]
    assert block.acts_ND.shape == (2 * 2 * 2 * 96, 8)  # steps × CFG halves × prompts × positions
    assert sorted(set(block.meta["timestep"].tolist())) == sorted(steps)
    assert set(block.meta["cond"].tolist()) == {0, 1}
    assert block.meta["token_index"].max() == 95
    cond = block.meta["cond"] == 1
    assert not torch.allclose(block.acts_ND[cond], block.acts_ND[~cond])  # halves really differ
    only_cond = enc.activations(PROMPTS, [BLOCK], height=32, width=48)[BLOCK]  # default: the cond half
    torch.testing.assert_close(only_cond.acts_ND, block.acts_ND[cond])
    assert set(acts[TEXT].meta["cond"].tolist()) == {0, 1} and "timestep" not in acts[TEXT].meta

    # update = output − input; the block's input is the output of the resnet before it
    update = enc.activations(PROMPTS, [BLOCK], update=True, cfg_half="both", height=32, width=48)[BLOCK]
    torch.testing.assert_close(update.acts_ND, block.acts_ND - acts["up_blocks.0.resnets.0"].acts_ND)


def test_timestep_selection(enc: UNetEncoder) -> None:
    every = enc.activations(PROMPTS, [BLOCK], every_n=2)[BLOCK]
    steps = enc.pipe.scheduler.timesteps.tolist()
    assert set(every.meta["timestep"].tolist()) == {steps[0]}
    chosen = enc.activations(PROMPTS, [BLOCK], timesteps=[steps[1]])[BLOCK]
    assert set(chosen.meta["timestep"].tolist()) == {steps[1]}
    assert chosen.acts_ND.shape == every.acts_ND.shape == (2 * 64, 8)  # 32 px → 16² latents → 8² here


def test_errors(enc: UNetEncoder) -> None:
    with pytest.raises(ValueError, match="no CLS token"):
        enc.activations(PROMPTS, [BLOCK], tokens="cls")
    with pytest.raises(ValueError, match="classifier-free guidance"):
        enc.activations(PROMPTS, [BLOCK], cfg_half="uncond", guidance_scale=1.0)
    with pytest.raises(ValueError, match="update=True needs"):
        enc.activations(PROMPTS, ["up_blocks.0"], update=True)  # upsamples: output ≠ input shape
    with pytest.raises(TypeError, match="list of prompt strings"):
        enc.activations("a cat", [BLOCK])


def test_stop_early_only_for_single_call(enc: UNetEncoder) -> None:
    assert not enc.can_stop_early()  # multi-step sampling: every step calls every block
    with enc._sampling_overrides({"num_inference_steps": 1, "guidance_scale": 0.0}):
        assert enc.can_stop_early()  # SDXL-Turbo style: one UNet call
    one = enc.activations(PROMPTS, [BLOCK], num_inference_steps=1, guidance_scale=0.0)[BLOCK]
    assert one.acts_ND.shape == (2 * 64, 8)


def test_sample_images(enc: UNetEncoder) -> None:
    images = enc.sample(PROMPTS[:1], height=32, width=48)
    assert len(images) == 1 and images[0].size == (48, 32)


def test_sdxl_turbo_path() -> None:
    """SDXL (two text encoders, text_time conditioning) with Turbo sampling: 1 step, no CFG, early stop."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from mmsae.encoders.tiny_tokenizer import tiny_clip_tokenizer
    from mmsae.encoders.unet import UNetSampling
    from mmsae.encoders.unet_pipelines import tiny_text_config, tiny_vae

    # diffusers' own tiny SDXL test components
    unet = UNet2DConditionModel(
        block_out_channels=(2, 4),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
        norm_num_groups=1,
    )
    vae = tiny_vae()
    tok = tiny_clip_tokenizer(1000)
    # SDXL's two text encoders feed the UNet's 64-wide cross-attention: 32 each, and a 32-d pooled projection.
    text_cfg = tiny_text_config(
        tok, hidden_size=32, intermediate_size=37, num_attention_heads=4, projection_dim=32
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(text_cfg),
        text_encoder_2=CLIPTextModelWithProjection(text_cfg),
        tokenizer=tok,
        tokenizer_2=tok,
        unet=unet,
        scheduler=EulerDiscreteScheduler(timestep_spacing="trailing"),
    )
    enc = UNetEncoder(
        pipe,
        "unet:sdxl-turbo-tiny",
        UNetSampling(num_inference_steps=1, guidance_scale=0.0, height=32, width=32),
    )
    text_2 = "text_encoder_2.text_model.encoder.layers.1"  # CLIPTextModelWithProjection keeps `text_model`
    assert text_2 in enc.hook_points() and enc.can_stop_early()
    acts = enc.activations(PROMPTS, ["up_blocks.0.attentions.0", text_2])
    block = acts["up_blocks.0.attentions.0"]
    assert block.meta["grid"].tolist() == [8, 8] and block.acts_ND.shape == (2 * 64, 4)
    assert set(block.meta["timestep"].tolist()) == {999} and set(block.meta["cond"].tolist()) == {1}
    assert acts[text_2].acts_ND.shape == (2 * 77, 32)


# ---------------------------------------------------------------- what a store is made of
SAMPLING_CHANGES = {  # store_config key → a UNetSampling change that alters the recorded bytes
    "num_inference_steps": {"num_inference_steps": 3},
    "guidance_scale": {"guidance_scale": 3.0},
    "seed": {"seed": 1},
    "height": {"height": 48},
    "width": {"width": 48},
    "negative_prompt": {"negative_prompt": "blurry"},
    "timesteps": {"timesteps": [999]},
    "every_n": {"every_n": 2},
    "cfg_half": {"cfg_half": "both"},
    "site": {"update": True},
}


def test_store_config_names_every_sampling_setting(enc: UNetEncoder) -> None:
    config = enc.store_config()
    assert json.loads(json.dumps(config)) == config  # the store hashes it as JSON
    saved = enc.sampling
    try:
        for key, change in SAMPLING_CHANGES.items():
            enc.sampling = dataclasses.replace(saved, **change)
            other = enc.store_config()
            assert other[key] != config[key], key
            assert {k for k in config if other[k] != config[k]} == {key}, key
    finally:
        enc.sampling = saved
    # constructor settings reach it too
    assert get_encoder("unet:tiny", guidance_scale=3.0).store_config()["guidance_scale"] == 3.0


def test_store_config_names_the_scheduler() -> None:
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    enc = UNetEncoder(tiny_pipeline(), "unet:sd")
    config = enc.store_config()
    assert config["scheduler"] == "DDIMScheduler" and config["scheduler_config"]["steps_offset"] == 1
    # None means the pipeline's default resolution: recorded as the resolution it is, one store for both
    assert (config["height"], config["width"]) == (64, 64)  # UNet sample_size 32 × VAE scale factor 2
    assert (
        UNetEncoder(tiny_pipeline(), "unet:sd", dataclasses.replace(enc.sampling, height=64)).store_config()
        == config
    )
    scheduler_config = enc.pipe.scheduler.config
    enc.pipe.scheduler = DDIMScheduler.from_config(scheduler_config, timestep_spacing="trailing")
    assert enc.store_config()["scheduler_config"] != config["scheduler_config"]
    enc.pipe.scheduler = EulerDiscreteScheduler.from_config(scheduler_config)
    assert enc.store_config()["scheduler"] == "EulerDiscreteScheduler"


def test_extract_stores_differ_by_sampling(tmp_path: Path) -> None:
    """Two extractions that differ only in how they sample land in two stores (no false cache hit)."""
    prompts = PromptList(PROMPTS)
    kw = {"batch_size": 2, "progress": False}
    first = extract(get_encoder("unet:tiny"), prompts, [BLOCK], tmp_path, **kw)
    other = extract(get_encoder("unet:tiny", guidance_scale=3.0), prompts, [BLOCK], tmp_path, **kw)
    assert other.path != first.path


# ---------------------------------------------------------------- SDXL-Turbo settings
@pytest.fixture(scope="module")
def turbo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline saved under a Turbo name (Turbo checkpoints are recognised by their name)."""
    path = tmp_path_factory.mktemp("models") / "tiny-sdxl-turbo"
    tiny_pipeline().save_pretrained(path)
    return path


def contradiction_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "contradict" in str(w.message)]


def test_turbo_defaults_come_from_the_model(turbo_dir: Path) -> None:
    enc = get_encoder(f"unet:{turbo_dir}")
    assert (enc.sampling.num_inference_steps, enc.sampling.guidance_scale) == (1, 0.0)
    assert enc.can_stop_early()
    plain = UNetEncoder(tiny_pipeline(), "unet:sd")  # not Turbo: Stable Diffusion's own defaults
    assert (plain.sampling.num_inference_steps, plain.sampling.guidance_scale) == (50, 7.5)


def test_explicit_settings_survive_and_contradictions_warn(turbo_dir: Path) -> None:
    spec = f"unet:{turbo_dir}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        enc = get_encoder(spec, num_inference_steps=2)  # Turbo supports 1–4 steps
        tiny = get_encoder("unet:tiny", num_inference_steps=3)
    assert not contradiction_warnings(caught)
    assert (enc.sampling.num_inference_steps, enc.sampling.guidance_scale) == (2, 0.0)
    assert tiny.sampling.num_inference_steps == 3
    steps = enc.activations(PROMPTS[:1], [BLOCK])[BLOCK].meta["timestep"].unique()
    assert len(steps) == 2

    with pytest.warns(UserWarning, match="contradict.*guidance_scale=7.5, num_inference_steps=8"):
        cfg = get_encoder(spec, guidance_scale=7.5, num_inference_steps=8)
    assert (cfg.sampling.num_inference_steps, cfg.sampling.guidance_scale) == (8, 7.5)  # used as given
    with pytest.warns(UserWarning, match="contradict.*num_inference_steps=6"):
        acts = enc.activations(PROMPTS[:1], [BLOCK], num_inference_steps=6)[BLOCK]
    assert len(acts.meta["timestep"].unique()) == 6
    with pytest.warns(UserWarning, match="contradict.*guidance_scale=5"):
        enc.sample(PROMPTS[:1], guidance_scale=5.0)


def test_python_api_takes_sampler_defaults_from_the_model(turbo_dir: Path) -> None:
    """steer_diffusion, steer_prompts and unlearning sample a Turbo model at its own 1 step, guidance 0
    (they defaulted to 4 steps at 7.5, or 50 at 7.5), and keep explicit settings."""
    from mmsae.intervene import SampleConfig
    from mmsae.intervene.steer import sampler_settings

    enc = get_encoder(f"unet:{turbo_dir}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        enc.sample(PROMPTS[:1], **sampler_settings(None, None, seed=0))
    assert not contradiction_warnings(caught)
    assert sampler_settings(3, None, seed=1) == {"num_inference_steps": 3, "seed": 1}
    resolved = SampleConfig().for_encoder(enc)
    assert (resolved.num_inference_steps, resolved.guidance_scale) == (1, 0.0)
    assert SampleConfig(num_inference_steps=2).for_encoder(enc).num_inference_steps == 2


def test_steer_cli_takes_sampler_defaults_from_the_model(
    turbo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = f"unet:{turbo_dir}"
    sae_dir = tmp_path / "sae"
    mmsae.build_sae("topk", 8, 16, k=2, hook=BLOCK, encoder=spec).save(sae_dir)
    calls: list[tuple[int, float]] = []
    real_sample = UNetEncoder.sample

    def recording_sample(self: UNetEncoder, prompts: list[str], **kw: object) -> object:
        calls.append((kw["num_inference_steps"], kw["guidance_scale"]))
        return real_sample(self, prompts, **kw)

    monkeypatch.setattr(UNetEncoder, "sample", recording_sample)
    argv = ["steer", "diffusion", "--encoder", spec, "--sae", str(sae_dir), "--device", "cpu"]
    argv += ["--prompt", "a cat", "--edit", "dir:1=2", "--out", str(tmp_path / "out")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli_main(argv) == 0
    assert set(calls) == {(1, 0.0)} and not contradiction_warnings(caught)
    calls.clear()
    with pytest.warns(UserWarning, match="contradict.*guidance_scale=5"):
        assert cli_main([*argv, "--steps", "2", "--guidance", "5"]) == 0
    assert set(calls) == {(2, 5.0)}
