"""Diffusion steering, text steering, spliced fidelity and SAeUron unlearning on the tiny real SD pipeline."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import mmsae
from mmsae.datasets.images import PromptList
from mmsae.encoders.registry import get_encoder
from mmsae.extract import extract
from mmsae.intervene.edits import Direction, EditContext, Set
from mmsae.intervene.fidelity import generation_fidelity, image_similarity
from mmsae.intervene.intervention import Intervention, Splice
from mmsae.intervene.steer import max_activations, steer_diffusion
from mmsae.intervene.text_steer import concept_delta, steer_prompts, text_steering
from mmsae.intervene.unlearn import (
    SampleConfig,
    Suppress,
    Unlearner,
    UnlearnSelection,
    clip_concept_classifier,
    evaluate_unlearning,
    select_features,
    timestep_sums,
)
from mmsae.sae.base import normalized_mse

HOOK = "up_blocks.0.attentions.1"  # a Transformer2DModel output: every position a token of d=8
TEXT_HOOK = "text_encoder.text_model.encoder.layers.1"
PROMPTS = ["a red cat", "a blue house"]


@pytest.fixture(scope="module")
def unet():
    return get_encoder("unet:tiny")


@pytest.fixture()
def sae(unet):
    return mmsae.build_sae("topk", 8, 32, k=4, hook=HOOK, encoder=unet.id)


def hook_acts(unet, prompts, hook=HOOK, **sampling):
    acts = unet.activations(prompts, [hook], cfg_half="both", **sampling)[hook]
    return acts.acts_ND, acts.meta


def test_diffusion_steering_changes_images_and_restores(unet, sae):
    result = steer_diffusion(unet, Splice(sae, [Direction(3, 20.0)]), PROMPTS, seed=1, num_inference_steps=2)
    assert (image_similarity(result.before, result.after) < 1).all()
    again = unet.sample(PROMPTS, num_inference_steps=2, seed=1)
    torch.testing.assert_close(image_similarity(result.before, again), torch.ones(2))


def test_timestep_window_and_cfg_half(unet, sae):
    bare, meta = hook_acts(unet, PROMPTS, num_inference_steps=1)
    splice = Splice(sae, [Direction(3, 5.0)], cfg_half="cond")
    with Intervention(unet, splice):
        edited, _ = hook_acts(unet, PROMPTS, num_inference_steps=1)
    changed = (edited - bare).abs().amax(-1) > 1e-4
    assert changed[meta["cond"] == 1].all() and not changed[meta["cond"] == 0].any()
    late = Splice(sae, [Direction(3, 5.0)], timesteps=(400, 999))  # of the steps [501, 1], only 501
    with Intervention(unet, late):
        edited, _ = hook_acts(unet, PROMPTS, num_inference_steps=2)
    bare, meta = hook_acts(unet, PROMPTS, num_inference_steps=2)
    assert late.n_applied == 1
    first = meta["timestep"] == 501
    assert ((edited - bare).abs().amax(-1)[first] > 1e-4).all()


def test_spatial_mask_on_unet_grid(unet, sae):
    bare, meta = hook_acts(unet, PROMPTS, num_inference_steps=1)
    H, W = meta["grid"].tolist()
    mask = torch.zeros(64, 64)
    mask[:32] = 1.0  # top half of the image
    with Intervention(unet, Splice(sae, [Direction(3, 5.0)], spatial_mask=mask)):
        edited, _ = hook_acts(unet, PROMPTS, num_inference_steps=1)
    changed = ((edited - bare).abs().amax(-1) > 1e-4).view(-1, H, W)
    assert changed[:, : H // 2].all() and not changed[:, H // 2 :].any()


def test_bad_timestep_windows(unet, sae):
    with pytest.raises(ValueError, match="outside the schedule"):
        Intervention(unet, Splice(sae, [Direction(3, 1.0)], timesteps=(1000, 2000)))
    with pytest.raises(ValueError, match="outside the schedule"):
        Intervention(unet, Splice(sae, [Direction(3, 1.0)], timesteps=(600, 100)))
    with pytest.raises(ValueError, match="contains none of the 2 sampled timesteps"):
        steer_diffusion(
            unet, Splice(sae, [Direction(3, 1.0)], timesteps=(600, 700)), PROMPTS, num_inference_steps=2
        )


def test_generation_fidelity(unet, sae):
    from test_intervene import exact_sae  # tests/ is on sys.path (rootdir-less test modules)

    perfect = generation_fidelity(unet, exact_sae(8, HOOK, unet.id), PROMPTS, num_inference_steps=2)
    torch.testing.assert_close(perfect, torch.ones(2), atol=2e-3, rtol=0)
    lossy = mmsae.build_sae("topk", 8, 32, k=1, hook=HOOK, encoder=unet.id)
    assert (generation_fidelity(unet, lossy, PROMPTS, num_inference_steps=2) < 1).all()


def test_text_steering_adds_to_prompt_and_subtracts_from_negative(unet):
    sae = mmsae.build_sae("topk", 8, 32, k=4, hook=TEXT_HOOK, encoder=unet.id)
    delta_TD = torch.randn(77, 8)
    bare, meta = hook_acts(unet, PROMPTS, hook=TEXT_HOOK, num_inference_steps=1)
    with text_steering(unet, TEXT_HOOK, delta_TD):
        steered, _ = hook_acts(unet, PROMPTS, hook=TEXT_HOOK, num_inference_steps=1)
    sign = (meta["cond"] * 2 - 1).float()[:, None]
    torch.testing.assert_close(steered - bare, sign * delta_TD.repeat(4, 1), atol=1e-5, rtol=1e-5)
    result = steer_prompts(unet, sae, PROMPTS, "a cat", strength=-5.0, num_inference_steps=2)
    assert (image_similarity(result.before, result.after) < 1).all()
    with pytest.raises(ValueError, match="text-encoder hook"):
        steer_prompts(
            unet, mmsae.build_sae("topk", 8, 32, k=4, hook=HOOK, encoder=unet.id), PROMPTS, "a cat", -1.0
        )


def test_concept_delta_uses_dense_codes_without_b_dec():
    sae = mmsae.build_sae("topk", 8, 32, k=1)
    with torch.no_grad():
        sae.b_dec.fill_(3.0)
    h = torch.randn(5, 8)
    expected = 0.5 * (sae.pre_acts(h).relu() @ sae.W_dec)
    torch.testing.assert_close(concept_delta(sae, h, 0.5), expected)
    assert ((sae.pre_acts(h) > 0).sum(-1) > 1).any()  # more than the k=1 top-k would keep


def test_suppress_rule():
    edit = Suppress(2, rules=((501, 1.5, 0.5),), recorded=(501, 1), multiplier=-4.0)
    f = torch.tensor([0.25, 0.75, 3.0])
    assert edit.apply(f, EditContext(timestep=490)).tolist() == [0.25, -6.0, -6.0]
    assert edit.apply(f, EditContext(timestep=10)).tolist() == f.tolist()  # nearest recorded step: 1


def test_select_features_and_unlearn(unet, sae, tmp_path):
    sampling = SampleConfig(num_inference_steps=2, guidance_scale=7.5, batch_size=2)
    concepts = {"cat": ["a cat", "a cat on a sofa"], "dog": ["a dog", "a dog in a park"]}
    sae.save(tmp_path)
    selection = select_features(
        unet, sae, concepts, ["a house", "a tree"], percentile=90, sampling=sampling, save_to=tmp_path
    )
    saved = json.loads((tmp_path / "unlearn_selection.json").read_text())
    assert saved["hook"] == HOOK and set(saved["concepts"]) == {"cat", "dog"}
    loaded = UnlearnSelection.load(tmp_path)
    assert loaded == selection
    assert set(loaded.concepts["cat"].features) == {501, 1}
    for t, features in loaded.concepts["cat"].features.items():
        assert 1 <= len(features) <= 4 and all(0 <= i < 32 for i in features)
        assert all(m > 0 for m in loaded.concepts["cat"].mean_concept[t])

    unlearner = Unlearner(unet, sae, tmp_path, ["cat", "dog"], multiplier=-30.0)
    bare = unet.sample(["a cat"], num_inference_steps=2, guidance_scale=7.5, seed=0)
    forgotten = unlearner.generate(["a cat"], sampling)
    assert unlearner.splice.n_applied == 2
    assert image_similarity(bare, forgotten)[0] < 1

    clip = get_encoder("clip:tiny")
    report = evaluate_unlearning(
        unlearner, ["a cat"], ["a house"], clip_concept_classifier(clip, "cat", ["house"]), sampling
    )
    assert 0 <= report.retained_similarity <= 1
    assert report.concept_rate_before in (0.0, 1.0) and report.concept_rate_after in (0.0, 1.0)


def test_unlearn_bad_input(unet, sae, tmp_path):
    selection = UnlearnSelection(HOOK, unet.id, 32, 99.0)
    with pytest.raises(KeyError, match="Unknown concept"):
        Unlearner(unet, sae, selection, ["cat"])
    with pytest.raises(ValueError, match="must be negative"):
        Unlearner(unet, sae, selection, [], multiplier=2.0)
    with pytest.raises(ValueError, match="this one has 64"):
        Unlearner(unet, mmsae.build_sae("topk", 8, 64, k=4, hook=HOOK, encoder=unet.id), selection, [])
    with pytest.raises(FileNotFoundError, match="unlearn select"):
        UnlearnSelection.load(tmp_path)
    with pytest.raises(ValueError, match="percentile"):
        select_features(unet, sae, {"cat": ["a cat"]}, ["a house"], percentile=100)


# ------------------------------------------------------------ SAEs trained on block updates (site="update")
@pytest.fixture()
def update_sae(unet):
    return mmsae.build_sae("topk", 8, 32, k=4, hook=HOOK, encoder=unet.id, site="update")


def test_unlearn_refuses_non_finite_multipliers(unet, sae):
    """A NaN multiplier passed `multiplier >= 0` and turned suppressed activations into NaN."""
    selection = UnlearnSelection(HOOK, unet.id, 32, 99.0)
    for multiplier in (float("nan"), float("-inf")):
        with pytest.raises(ValueError, match="must be negative and finite"):
            Unlearner(unet, sae, selection, [], multiplier=multiplier)


def test_update_splice_without_edits_is_exact_and_restores(unet, update_sae):
    bare = unet.run_model(PROMPTS)
    splice = Splice(update_sae)
    with Intervention(unet, splice):
        spliced = unet.run_model(PROMPTS)
    assert splice.n_applied == 2 and torch.equal(spliced, bare)
    with Intervention(unet, Splice(update_sae, [Set(3, 20.0)])):
        edited = unet.run_model(PROMPTS)
    assert not torch.allclose(edited, bare, atol=1e-3)
    assert torch.equal(unet.run_model(PROMPTS), bare)  # leaving the context restores the model


def test_update_splice_without_error_writes_input_plus_reconstructed_update(unet, update_sae):
    calls: list[dict[str, torch.Tensor]] = []
    block = unet.module(HOOK)

    def before(_mod, args, _kwargs, out):  # prepended after the splice's hook, so it runs first
        calls.append({"in": unet.to_tokens(HOOK, args[0]), "out": unet.to_tokens(HOOK, out)})

    def after(_mod, _args, _kwargs, out):  # appended: sees what the splice wrote
        calls[-1]["spliced"] = unet.to_tokens(HOOK, out)

    with Intervention(unet, Splice(update_sae, keep_error=False)):
        handles = [
            block.register_forward_hook(before, with_kwargs=True, prepend=True),
            block.register_forward_hook(after, with_kwargs=True),
        ]
        unet.run_model(PROMPTS)
    for h in handles:
        h.remove()
    assert len(calls) == 2  # one block call per sampling step (CFG halves batched)
    with torch.no_grad():
        for c in calls:
            in_BTD, out_BTD = c["in"], c["out"]
            x_hat_BTD = update_sae(out_BTD - in_BTD).x_hat
            torch.testing.assert_close(c["spliced"], in_BTD + x_hat_BTD, atol=1e-5, rtol=1e-5)
            # not the output-site splice, and not a no-op
            assert not torch.allclose(c["spliced"], update_sae(out_BTD).x_hat, atol=1e-3)
            assert not torch.allclose(c["spliced"], out_BTD, atol=1e-3)


def test_update_splice_honours_cfg_half_mask_and_window(unet, update_sae):
    bare, meta = hook_acts(unet, PROMPTS, update=True, num_inference_steps=2)
    H, W = meta["grid"].tolist()
    mask = torch.zeros(64, 64)
    mask[:32] = 1.0  # top half of the image
    splice = Splice(update_sae, [Direction(3, 5.0)], cfg_half="cond", spatial_mask=mask, timesteps=(400, 999))
    with Intervention(unet, splice):
        # the block's input is upstream of the edit, so the recorded update moves by exactly 5·W_dec[3]
        edited, _ = hook_acts(unet, PROMPTS, update=True, num_inference_steps=2)
    assert splice.n_applied == 1  # of the steps [501, 1], only 501
    first = meta["timestep"] == 501
    delta = (edited - bare)[first].view(-1, H, W, 8)
    cond = meta["cond"][first].view(-1, H, W)[:, 0, 0] == 1
    expected = 5.0 * update_sae.W_dec[3].detach()
    torch.testing.assert_close(
        delta[cond][:, : H // 2], expected.expand_as(delta[cond][:, : H // 2]), atol=1e-5, rtol=1e-4
    )
    assert delta[cond][:, H // 2 :].abs().max() < 1e-6 and delta[~cond].abs().max() < 1e-6


def test_feature_statistics_of_an_update_sae_read_updates(unet, update_sae):
    acts = unet.activations(PROMPTS, [HOOK], update=True, num_inference_steps=2)[HOOK]  # cond half, seed 0
    with torch.no_grad():
        codes = update_sae.encode(acts.acts_ND)
        expected_max = codes.dense().amax(0).clamp_min(0)
        torch.testing.assert_close(max_activations(unet, update_sae, [PROMPTS]), expected_max)
        sums, counts = timestep_sums(unet, update_sae, HOOK, PROMPTS, SampleConfig(2, batch_size=2))
        for t in (501, 1):
            at_t = acts.meta["timestep"] == t
            torch.testing.assert_close(sums[t], codes.dense()[at_t].double().sum(0), atol=1e-4, rtol=1e-4)
            assert counts[t] == int(at_t.sum())


def test_update_sae_refused_where_no_update_exists(unet):
    resample = "up_blocks.0.upsamplers.0"  # doubles H and W: output shape ≠ input shape
    sae = mmsae.build_sae("topk", 8, 32, k=4, hook=resample, encoder=unet.id, site="update")
    bare = unet.run_model(PROMPTS)
    refused = r"site='update'\) needs a block whose output has its input's shape"
    with pytest.raises(ValueError, match=refused), Intervention(unet, Splice(sae)):
        unet.run_model(PROMPTS)
    assert torch.equal(unet.run_model(PROMPTS), bare)  # the failed splice left no hook behind
    clip = get_encoder("clip:tiny")
    on_clip = mmsae.build_sae("topk", 8, 32, k=4, hook=clip.default_hook, encoder=clip.id, site="update")
    with pytest.raises(ValueError, match="can only splice module outputs"):
        Intervention(clip, Splice(on_clip))


def test_extract_train_splice_on_block_updates(tmp_path):
    torch.manual_seed(0)
    enc = get_encoder("unet:tiny", update=True)
    prompts = PromptList(["a red cat", "a house", "a dog", "a tree", "a car", "a boat", "a sofa", "a sun"])
    store = extract(enc, prompts, [HOOK], tmp_path, batch_size=4, progress=False)
    assert store.provenance() == {"encoder": enc.id, "hook": HOOK, "site": "update"}
    enc.sampling = dataclasses.replace(enc.sampling, update=False)  # the same extraction, of block outputs
    outputs = extract(enc, prompts, [HOOK], tmp_path, batch_size=4, progress=False)
    enc.sampling = dataclasses.replace(enc.sampling, update=True)
    assert outputs.path != store.path and outputs.site() == "output"
    with pytest.raises(ValueError, match="site='update' contradicts the store"):
        mmsae.train(outputs.path, n_features=32, k=4, tokens=256, batch_size=256, site="update")

    sae = mmsae.train(store.path, n_features=32, k=4, tokens=8192, batch_size=256, warmup_steps=10)
    assert (sae.cfg.site, sae.cfg.hook, sae.cfg.encoder) == ("update", HOOK, enc.id)
    sae.save(tmp_path / "sae")
    sae = mmsae.load_sae(tmp_path / "sae")
    assert sae.cfg.site == "update"

    held_out = ["a fish", "a red tree"]
    updates = enc.activations(held_out, [HOOK])[HOOK].acts_ND
    with torch.no_grad():
        assert normalized_mse(updates, sae(updates).x_hat) < 0.5

    bare = enc.run_model(held_out)
    with Intervention(enc, Splice(sae, keep_error=False)):
        spliced = enc.run_model(held_out)
    as_output = mmsae.load_sae(tmp_path / "sae")
    as_output.cfg.site = "output"  # the same weights misread as an SAE on block outputs
    with Intervention(enc, Splice(as_output, keep_error=False)):
        misread = enc.run_model(held_out)
    assert 0 < (spliced - bare).norm() < (misread - bare).norm()
