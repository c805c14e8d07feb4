"""LLaVA adapter: tiny random-init LlavaForConditionalGeneration (CLIP vision + Llama), offline processor."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from conftest import commented_extract_command
from PIL import Image
from safetensors.torch import load_file, save_file

from mmsae.encoders import get_encoder
from mmsae.encoders.llava import IMAGE_TOKEN, LlavaEncoder, format_prompt, tiny_llava
from mmsae.store import ActivationStore

VISION = "model.vision_tower.encoder.layers"
LLM = "model.language_model.layers"


@pytest.fixture(scope="module")
def enc() -> LlavaEncoder:
    return get_encoder("llava:tiny")


@pytest.fixture(scope="module")
def batch() -> tuple[list[Image.Image], list[str]]:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)) for _ in range(2)]
    return images, ["what is in the picture?", "<image> describe it"]


def test_hooks_and_default_is_the_layer_llava_reads(enc: LlavaEncoder, batch: tuple) -> None:
    assert enc.hook_points() == [
        f"{VISION}.0",
        f"{VISION}.1",
        f"{VISION}.2",
        "model.multi_modal_projector",
        f"{LLM}.0",
        f"{LLM}.1",
    ]
    assert enc.default_hook == f"{VISION}.1"  # hidden_states[-2] of a 3-layer tower
    acts = enc.activations(batch, [enc.default_hook])[enc.default_hook]
    pixels = torch.stack([enc.transform(im) for im in batch[0]])
    with torch.no_grad():
        hidden = enc.model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    torch.testing.assert_close(acts.acts_ND, hidden[-2].reshape(-1, 16), rtol=0, atol=0)
    patch = enc.activations(batch, [enc.default_hook], tokens="patch")[enc.default_hook]
    assert patch.acts_ND.shape == (2 * 16, 16)  # what the "default" strategy feeds the projector


def test_llm_layers_image_tokens(enc: LlavaEncoder, batch: tuple) -> None:
    hook = f"{LLM}.0"
    every = enc.activations(batch, [hook, "model.multi_modal_projector"])
    image = enc.activations(batch, [hook], tokens="image")[hook]
    assert image.acts_ND.shape == (2 * 16, 16)
    assert every["model.multi_modal_projector"].acts_ND.shape == (2 * 16, 16)
    pos = image.meta["token_index"].view(2, 16)
    assert (pos[:, 1:] - pos[:, :-1] == 1).all()  # one contiguous run of image tokens per example
    with pytest.raises(ValueError, match="no CLS token"):
        enc.activations(batch, [hook], tokens="cls")


def test_generate_with_edit(enc: LlavaEncoder, batch: tuple) -> None:
    images, _ = batch
    plain = enc.generate(images, "what is this?", max_new_tokens=4)
    assert len(plain) == 2 and all(isinstance(t, str) for t in plain)
    assert enc.generate(images, "what is this?", max_new_tokens=4) == plain  # greedy: deterministic
    with enc.edit(enc.default_hook, lambda t: t):
        assert enc.generate(images, "what is this?", max_new_tokens=4) == plain
    direction = 50 * torch.randn(16, generator=torch.Generator().manual_seed(0))
    with enc.edit(f"{LLM}.1", lambda t: t + direction):
        steered = enc.generate(images, "what is this?", max_new_tokens=4)
    assert steered != plain


def test_bad_batch(enc: LlavaEncoder) -> None:
    with pytest.raises(TypeError, match="processor outputs"):
        enc.activations(torch.randn(1, 3, 32, 32), [enc.default_hook])


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_llm_layers_text_tokens(enc: LlavaEncoder, batch: tuple, padding_side: str) -> None:
    images, _ = batch
    prompts = ["<image> hi", "<image> a much longer prompt than the first one"]
    inputs = enc.processor(
        images=images, text=prompts, return_tensors="pt", padding=True, padding_side=padding_side
    )
    mask_BT = inputs["attention_mask"].bool()
    assert not mask_BT.all()  # the short prompt is padded
    hook = f"{LLM}.0"  # not the last layer: hidden_states[-1] has the final norm applied
    text = enc.activations(inputs, [hook], tokens="text", example_offset=5)[hook]
    keep_BT = mask_BT & (inputs["input_ids"] != enc.model.config.image_token_index)
    b_N, t_N = keep_BT.nonzero().unbind(1)
    assert text.meta["example_id"].tolist() == (b_N + 5).tolist()
    assert text.meta["token_index"].tolist() == t_N.tolist()  # columns of input_ids, padding skipped
    assert text.acts_ND.shape == (int(keep_BT.sum()), 16)
    assert (text.meta["example_id"] == 5).sum() < (text.meta["example_id"] == 6).sum()
    with torch.no_grad():
        hidden_BTD = enc.model(**inputs, output_hidden_states=True).hidden_states[1]  # after layer 0
    torch.testing.assert_close(text.acts_ND, hidden_BTD[b_N, t_N], rtol=0, atol=0)
    image = enc.activations(inputs, [hook], tokens="image")[hook]
    text_pos = set(zip(text.meta["example_id"].tolist(), text.meta["token_index"].tolist()))
    image_pos = set(zip((image.meta["example_id"] + 5).tolist(), image.meta["token_index"].tolist()))
    assert not text_pos & image_pos and len(text_pos | image_pos) == mask_BT.sum()  # a partition


def test_llm_token_modes_on_vision_hooks_are_clear_errors(enc: LlavaEncoder, batch: tuple) -> None:
    for mode in ("text", "image"):
        with pytest.raises(ValueError, match=f"tokens='{mode}'.*vision hook.*LLM hook"):
            enc.activations(batch, [enc.default_hook], tokens=mode)
    with pytest.raises(ValueError, match="image features only"):
        enc.activations(batch, ["model.multi_modal_projector"], tokens="text")


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_llm_all_index_and_mean_skip_padding(enc: LlavaEncoder, batch: tuple, padding_side: str) -> None:
    images, _ = batch
    prompts = ["<image> hi", "<image> a much longer prompt than the first one"]
    inputs = enc.processor(
        images=images, text=prompts, return_tensors="pt", padding=True, padding_side=padding_side
    )
    mask_BT = inputs["attention_mask"].bool()
    hook = f"{LLM}.0"
    every = enc.activations(inputs, [hook], tokens="all")[hook]
    assert every.acts_ND.shape[0] == mask_BT.sum()  # padding is no token of any example
    last = enc.activations(inputs, [hook], tokens=-1)[hook]
    alone = [
        enc.activations(([im], [p]), [hook], tokens="all")[hook].acts_ND for im, p in zip(images, prompts)
    ]
    torch.testing.assert_close(last.acts_ND, torch.stack([a[-1] for a in alone]), rtol=1e-4, atol=1e-5)
    first = enc.activations(inputs, [hook], tokens=0)[hook]
    torch.testing.assert_close(first.acts_ND, torch.stack([a[0] for a in alone]), rtol=1e-4, atol=1e-5)
    mean = enc.activations(inputs, [hook], tokens="mean")[hook]
    torch.testing.assert_close(mean.acts_ND, torch.stack([a.mean(0) for a in alone]), rtol=1e-4, atol=1e-5)
    assert mean.meta["token_index"].tolist() == [-1, -1]
    with pytest.raises(ValueError, match="out of range"):
        enc.activations(inputs, [hook], tokens=int(mask_BT.sum(1).min()))


# ------------------------------------------------------------------ the hub repo, offline
HUB_REPO = "llava-hf/llava-1.5-7b-hf"
HUB_COMMIT = "8c85e9a4d626b7b908448be32c1ba5ad79b95e76"  # any 40-hex revision: refs/main points at it
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "llava_vision.yaml"
# llava-1.5's chat template (chat_template.json of the hub repo)
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'text') %}{{ content['text'] + ' '}}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _legacy_key(key: str) -> str:
    """A parameter's name in the hub checkpoint, written before transformers 5 regrouped the modules."""
    for new, old in [
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
    ]:
        if key.startswith(new):
            return old + key[len(new) :]
    raise AssertionError(f"unexpected parameter {key}")


def _write_llava_repo(snapshot: Path, model: torch.nn.Module, processor: Any) -> None:
    """The files of llava-hf/llava-1.5-7b-hf: sharded safetensors with its key names and an index, the
    configs, a separate preprocessor_config.json, tokenizer files and chat_template.json."""
    state = {_legacy_key(k): v.contiguous() for k, v in model.state_dict().items()}
    keys, n_shards = sorted(state), 3
    weight_map = {}
    for s in range(n_shards):
        name = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: state[k] for k in keys[s::n_shards]}
        save_file(part, snapshot / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (snapshot / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = model.config.to_dict()
    config["architectures"] = ["LlavaForConditionalGeneration"]
    (snapshot / "config.json").write_text(json.dumps(config, indent=2))
    model.generation_config.to_json_file(snapshot / "generation_config.json")
    processor.image_processor.to_json_file(snapshot / "preprocessor_config.json")
    processor_config = {
        "image_token": IMAGE_TOKEN,
        "num_additional_image_tokens": 1,
        "patch_size": processor.patch_size,
        "processor_class": "LlavaProcessor",
        "vision_feature_select_strategy": "default",
    }
    (snapshot / "processor_config.json").write_text(json.dumps(processor_config, indent=2))
    (snapshot / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    tokenizer = processor.tokenizer
    tokenizer.save_pretrained(snapshot)  # tokenizer.json, tokenizer_config.json
    special = {k: str(v) for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    (snapshot / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    added = {IMAGE_TOKEN: tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)}
    (snapshot / "added_tokens.json").write_text(json.dumps(added))


def _as_hub_cache(snapshot_files: Path, cache: Path, repo: str, commit: str) -> Path:
    """Move files into the hub cache layout: blobs/<sha256>, snapshots/<commit>/<name> → blob, refs/main."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    for path in sorted(snapshot_files.iterdir()):
        blob = root / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.move(path, blob)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


LOAD_OFFLINE = """
import contextlib, io, json, sys
from safetensors.torch import save_file
from mmsae import cli
from mmsae.encoders import get_encoder
args = json.loads(sys.argv[1])
enc = get_encoder(args["spec"])
save_file({k: v.contiguous() for k, v in enc.model.state_dict().items()}, args["weights_out"])
random = get_encoder(args["spec"], pretrained=False)
from PIL import Image
pair = enc.pair_pipeline(Image.new("RGB", (30, 40)), "What is this?")
text = enc.processor.tokenizer.decode(pair["input_ids"])
printed = io.StringIO()
with contextlib.redirect_stdout(printed):
    rc = cli.main(args["extract_argv"])
print(json.dumps({"hooks": enc.hook_points(), "default": enc.default_hook, "id": enc.id,
                  "random_hooks": random.hook_points(), "extract_rc": rc, "printed": printed.getvalue(),
                  "text": text}))
"""


def test_hub_layout_of_llava_1_5_loads_offline_by_its_spec(tmp_path: Path) -> None:
    """The real from_pretrained resolution (refs/main → snapshot → sharded legacy-named weights, separate
    preprocessor config) on a tiny-width copy of llava-hf/llava-1.5-7b-hf, with its 24 vision layers; then
    the extract command of configs/llava_vision.yaml, as written there, on two photos."""
    model, processor = tiny_llava(vision_layers=24, image_size=28, patch=14)
    model.config.vision_feature_layer = -2
    files = tmp_path / "files"
    files.mkdir()
    _write_llava_repo(files, model, processor)
    _as_hub_cache(files, tmp_path / "hub", HUB_REPO, HUB_COMMIT)
    text = CONFIG.read_text()
    config = yaml.safe_load(text)
    hook = config["model"]["hook"]
    assert config["data"]["hook"] == hook and config["model"]["encoder"] == f"llava:{HUB_REPO}"
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        Image.fromarray(np.full((30, 40, 3), 60 * i, dtype=np.uint8)).save(photos / f"{i}.png")
    argv = [a.replace("folder:images", f"folder:{photos}") for a in commented_extract_command(text)]
    assert argv[argv.index("--hooks") + 1] == hook and any(str(photos) in a for a in argv)
    argv += ["--out_dir", str(tmp_path / "acts"), "--device", "cpu"]  # the last value of an option wins
    args = {
        "spec": f"llava:{HUB_REPO}",
        "weights_out": str(tmp_path / "sd.safetensors"),
        "extract_argv": ["extract", *argv],
    }
    env = {**os.environ, "HF_HOME": str(tmp_path / "home"), "HF_HUB_CACHE": str(tmp_path / "hub")}
    env["HF_HUB_OFFLINE"] = "1"
    script = [sys.executable, "-c", LOAD_OFFLINE, json.dumps(args)]
    run = subprocess.run(script, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["id"] == f"llava:{HUB_REPO}" and out["default"] == hook == f"{VISION}.22"
    assert out["hooks"] == out["random_hooks"] and hook in out["hooks"]
    assert out["extract_rc"] == 0, run.stderr[-3000:]
    text = out["text"].replace("</w>", "")  # the chat template, as in use: "USER: <image>\n... ASSISTANT:"
    assert text == f"<|startoftext|>user:{'<image>' * 4}whatisthis?assistant:<|endoftext|>", out["text"]
    store = ActivationStore(out["printed"].splitlines()[0])
    assert store.hooks == [hook] and store.n_tokens == 2 * 4  # (28 / 14)² patches of each photo
    loaded = load_file(tmp_path / "sd.safetensors")
    expected = model.state_dict()
    assert sorted(loaded) == sorted(expected)
    for key, value in expected.items():  # the checkpoint's weights, not a random init
        assert torch.equal(loaded[key], value), key


def test_prompts_take_the_chat_template(enc: LlavaEncoder) -> None:
    processor = tiny_llava()[1]
    assert format_prompt(processor, "What is this?") == "<image>\nWhat is this?"  # no template
    processor.chat_template = CHAT_TEMPLATE
    assert format_prompt(processor, "What is this?") == "USER: <image>\nWhat is this? ASSISTANT:"
    assert format_prompt(processor, "Q: <image> what?") == "Q: <image> what?"  # placed by the user
