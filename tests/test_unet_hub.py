"""An SD-1.5 repo in a local Hugging Face cache, loaded offline through the spec a user types.

The cache is laid out as `huggingface_hub` writes it (refs/main, blobs named by their etag, snapshot
symlinks) with the files of `stable-diffusion-v1-5/stable-diffusion-v1-5`: the repo's own model_index,
scheduler, tokenizer and feature-extractor configs verbatim, and tiny-width unet / vae / text-encoder
weights (diffusers' test components) in their real file names. `mmsae extract` then runs in a fresh process
with HF_HOME pointing at it and HF_HUB_OFFLINE=1, so diffusers' and huggingface_hub's own resolution
(`DiffusionPipeline.from_pretrained` → offline snapshot lookup) finds the files.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from mmsae.encoders import get_encoder
from mmsae.encoders.tiny_tokenizer import tiny_clip_tokenizer
from mmsae.encoders.unet import UNetEncoder, tiny_pipeline
from mmsae.extract import ActivationStore

REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
COMMIT = "451f4fe16113bff5a5d2269ed5ad43b0592e9a14"  # any 40-hex commit: refs/main points at it
PROMPTS = ["a red cube", "a cat on a mat", "a house"]
HOOK = "up_blocks.0.attentions.0"

# The repo's configs as published (model_index lists the safety checker: users load with
# safety_checker=None, so a cache filled that way never has its folder).
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.6.0",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


def _token(content: str) -> dict[str, object]:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


TOKENIZER_CONFIG = {
    "add_prefix_space": False,
    "bos_token": {"__type": "AddedToken", **_token("<|startoftext|>")},
    "do_lower_case": True,
    "eos_token": {"__type": "AddedToken", **_token("<|endoftext|>")},
    "errors": "replace",
    "model_max_length": 77,
    "name_or_path": "openai/clip-vit-large-patch14",
    "pad_token": "<|endoftext|>",
    "special_tokens_map_file": "./special_tokens_map.json",
    "tokenizer_class": "CLIPTokenizer",
    "unk_token": {"__type": "AddedToken", **_token("<|endoftext|>")},
}
SPECIAL_TOKENS_MAP = {
    "bos_token": _token("<|startoftext|>"),
    "eos_token": _token("<|endoftext|>"),
    "pad_token": "<|endoftext|>",
    "unk_token": _token("<|endoftext|>"),
}
PREPROCESSOR_CONFIG = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 224,
}
VERBATIM = {
    "model_index.json": MODEL_INDEX,
    "scheduler/scheduler_config.json": SCHEDULER_CONFIG,
    "feature_extractor/preprocessor_config.json": PREPROCESSOR_CONFIG,
    "tokenizer/tokenizer_config.json": TOKENIZER_CONFIG,
    "tokenizer/special_tokens_map.json": SPECIAL_TOKENS_MAP,
}


def etag(path: str, data: bytes) -> str:
    """The blob name huggingface_hub gives a file: LFS files by sha256, others by their git blob sha1."""
    if path.endswith(".safetensors"):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def write_cached_repo(hub_cache: Path, repo_id: str, commit: str, files: dict[str, bytes]) -> Path:
    """`files` as a downloaded snapshot of `repo_id` in a hub cache; returns the snapshot folder."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    snapshot = repo / "snapshots" / commit
    for path, data in files.items():
        blob = repo / "blobs" / etag(path, data)
        blob.write_bytes(data)
        link = snapshot / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def clip_bpe_files(staging: Path) -> dict[str, bytes]:
    """vocab.json and merges.txt of the tiny CLIP tokenizer: the slow-tokenizer files CLIP repos ship
    (transformers 5 saves only a tokenizer.json, which SD-1.5's tokenizer/ folder does not have)."""
    tiny_clip_tokenizer(vocab_size=1000).save_pretrained(staging)
    bpe = json.loads((staging / "tokenizer.json").read_text())["model"]
    merges = "".join(f"{a} {b}\n" for a, b in bpe["merges"])
    return {
        "tokenizer/vocab.json": json.dumps(bpe["vocab"]).encode(),
        "tokenizer/merges.txt": f"#version: 0.2\n{merges}".encode(),
    }


def sd15_files(staging: Path) -> dict[str, bytes]:
    """The repo's files: verbatim configs, and diffusers' tiny test components under the weights' names."""
    pipe = tiny_pipeline()
    files = {path: json.dumps(config, indent=2).encode() for path, config in VERBATIM.items()}
    files.update(clip_bpe_files(staging / "tokenizer"))
    weights = {
        "unet": "diffusion_pytorch_model.safetensors",
        "vae": "diffusion_pytorch_model.safetensors",
        "text_encoder": "model.safetensors",
    }
    for part, weights_name in weights.items():
        getattr(pipe, part).save_pretrained(staging / part)
        for name in ("config.json", weights_name):
            files[f"{part}/{name}"] = (staging / part / name).read_bytes()
    return files


# What a user runs: the hub id as the spec, nothing else. Two sampling steps keep the test quick.
USER_SCRIPT = """
import sys
from mmsae.datasets.images import PromptList
from mmsae.encoders import get_encoder
from mmsae.extract import extract

encoder = get_encoder(sys.argv[1], num_inference_steps=2)
store = extract(encoder, PromptList(sys.argv[4:]), [sys.argv[2]], sys.argv[3], batch_size=4, dtype="float32")
print(store.path)
"""


def test_sd15_repo_from_an_offline_hub_cache(tmp_path: Path) -> None:
    home = tmp_path / "hf-home"
    snapshot = write_cached_repo(home / "hub", REPO, COMMIT, sd15_files(tmp_path / "staging"))
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1")
    # cwd: outside the source tree, whose top-level datasets/ and kernels/ folders would shadow packages
    done = subprocess.run(
        [sys.executable, "-c", USER_SCRIPT, f"unet:{REPO}", HOOK, str(tmp_path / "acts"), *PROMPTS],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    store = ActivationStore(done.stdout.splitlines()[-1])
    assert store.info["config"]["encoder"] == f"unet:{REPO}"

    # The same files loaded as a local folder give the same activations: the hub path found these weights,
    # this tokenizer (the slow-format files read back) and SD-1.5's PNDM scheduler.
    local = get_encoder(f"unet:{snapshot}", num_inference_steps=2)
    assert isinstance(local, UNetEncoder) and type(local.pipe.scheduler).__name__ == "PNDMScheduler"
    assert local.pipe.tokenizer(PROMPTS).input_ids == tiny_clip_tokenizer(1000)(PROMPTS).input_ids
    expected = local.activations(PROMPTS, [HOOK])[HOOK]
    got = torch.cat([t.acts_ND for t in store.token_acts(HOOK)])
    n_calls = len(local.pipe.scheduler.timesteps)  # PNDM's PLMS steps call the UNet once more than asked
    assert got.shape == expected.acts_ND.shape == (len(PROMPTS) * n_calls * 16 * 16, 8)  # 64 px → 16² here
    torch.testing.assert_close(got, expected.acts_ND)
