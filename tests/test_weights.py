"""Pretrained weights offline: an unreachable hub fails fast; a local HF cache laid out like the real repo
loads through the spec string users type, with open_clip's own hub resolution."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import open_clip
import pytest
from safetensors.torch import save_file

from mmsae.encoders import WeightsUnavailableError, get_encoder
from mmsae.encoders import weights as weights_mod
from mmsae.encoders.clip import TINY_CONFIG

REPO = "timm/vit_base_patch32_clip_224.openai"  # open_clip's hf_hub entry for ViT-B-32/openai
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is: connections are refused


def test_repo_is_the_one_open_clip_asks_for() -> None:
    assert open_clip.get_pretrained_cfg("ViT-B-32", "openai")["hf_hub"] == f"{REPO}/"


def test_unreachable_hub_fails_fast_with_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No network: the hub is probed once, then the load fails at once (hub retries alone take ~45 s)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError, match=f"hf download {REPO}"):
        get_encoder("clip:ViT-B-32/openai", cache_dir=str(tmp_path))
    assert time.perf_counter() - start < 5.0
    assert "Hugging Face hub unreachable" in capsys.readouterr().err
    start = time.perf_counter()  # a second load in the same process does not probe again
    with pytest.raises(WeightsUnavailableError):
        get_encoder("clip:RN50/openai", cache_dir=str(tmp_path))
    assert time.perf_counter() - start < 5.0 and "unreachable" not in capsys.readouterr().err


def test_hf_hub_offline_is_honoured_without_a_probe(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # set after huggingface_hub was imported: still honoured

    def no_probe(host: str, port: int) -> bool:
        raise AssertionError("HF_HUB_OFFLINE is set: the hub must not be probed")

    monkeypatch.setattr(weights_mod, "_reachable", no_probe)
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError, match="pretrained=False"):
        get_encoder("clip:ViT-B-32/openai", cache_dir=str(tmp_path))
    assert time.perf_counter() - start < 5.0


def _cache_file(repo_dir: Path, name: str, data: bytes) -> None:
    """One file as the hub client stores it: a content-addressed blob, linked from the snapshot."""
    digest = hashlib.sha256(data).hexdigest()
    blob = repo_dir / "blobs" / digest
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = repo_dir / "snapshots" / COMMIT / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))


@pytest.fixture
def hf_home(tmp_path: Path) -> tuple[Path, Path]:
    """HF_HOME holding `timm/vit_base_patch32_clip_224.openai` in the real layout, at tiny width."""
    tiny_cfg = json.loads(TINY_CONFIG.read_text())
    open_clip.add_model_config(TINY_CONFIG)
    model = open_clip.create_model(TINY_CONFIG.stem, force_quick_gelu=True)
    weights = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    repo_dir = tmp_path / "hf" / "hub" / f"models--{REPO.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    config = {
        "model_cfg": {**tiny_cfg, "quick_gelu": True},
        "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3},
    }
    _cache_file(repo_dir, "open_clip_config.json", json.dumps(config).encode())
    _cache_file(repo_dir, "open_clip_model.safetensors", weights.read_bytes())
    _cache_file(repo_dir, "README.md", b"---\nlibrary_name: open_clip\n---\n")
    return tmp_path / "hf", weights


LOAD_SCRIPT = """
import json, sys
import open_clip, torch
from open_clip import factory
from safetensors.torch import load_file
from mmsae.encoders import get_encoder

# The architecture at tiny width under its real name; the tag, hub id and file resolution stay open_clip's.
factory._MODEL_CONFIGS["ViT-B-32"] = json.load(open(sys.argv[1]))
saved = load_file(sys.argv[2])
out = {}
for spec in ("clip:ViT-B-32/openai", "clip:hf-hub:timm/vit_base_patch32_clip_224.openai"):
    enc = get_encoder(spec)
    state = enc.model.state_dict()
    out[spec] = max((state[k].float() - v.float()).abs().max().item() for k, v in saved.items())
    out[spec + " mean"] = list(enc.image_pipeline.transforms[-1].mean)
print(json.dumps(out))
"""


def test_offline_hf_cache_loads_through_the_user_spec(hf_home: tuple[Path, Path]) -> None:
    """HF_HUB_OFFLINE=1 and HF_HOME set before start-up, as a user would: open_clip's own resolution runs."""
    home, weights = hf_home
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, str(TINY_CONFIG), str(weights)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["clip:ViT-B-32/openai"] == 0.0  # the cached weights, bit for bit
    assert result["clip:hf-hub:timm/vit_base_patch32_clip_224.openai"] == 0.0
    assert result["clip:ViT-B-32/openai mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert result["clip:hf-hub:timm/vit_base_patch32_clip_224.openai mean"] == [0.5] * 3  # the repo's config


def test_random_init_without_its_tokenizer_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """An HF text tower's config and tokenizer are needed even for random init: offline, say so."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", "/nonexistent-hf-cache")  # nothing cached
    with pytest.raises(WeightsUnavailableError, match="needs files even with pretrained=False"):
        get_encoder("clip:roberta-ViT-B-32", pretrained=False)


_LOAD_TIMED = """
import sys, time
from mmsae.encoders import WeightsUnavailableError, get_encoder
from mmsae.encoders.registry import encoder_class
spec = sys.argv[1]
encoder_class(spec.split(":")[0])  # imports (seconds for diffusers) are not the load
start = time.perf_counter()
try:
    get_encoder(spec)
except WeightsUnavailableError as err:
    print("pretrained=False" in str(err), time.perf_counter() - start)
"""


@pytest.mark.parametrize(
    "spec",
    [
        "timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k",
        "llava:llava-hf/llava-1.5-7b-hf",
        "unet:stable-diffusion-v1-5/stable-diffusion-v1-5",
    ],
)
def test_every_family_fails_fast_without_a_hub(spec: str, tmp_path: Path) -> None:
    """timm, transformers and diffusers loads skip the hub's retries once it is known to be unreachable.

    A fresh process, as a user's: the hub clients read HF_HUB_OFFLINE at import, which this test process
    sets. A name that does not resolve is what a machine without network sees; the clients retry it with
    back-off (~50 s for one timm checkpoint), where a refused connection fails at once."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(
        HF_ENDPOINT="http://hub.invalid",  # RFC 2606: never resolves
        HF_HOME=str(tmp_path / "hf"),
        MMSAE_ZOO=str(tmp_path / "zoo"),  # an installed zoo must not answer for the hub
    )
    env.pop("HF_HUB_CACHE", None)
    run = subprocess.run(
        [sys.executable, "-c", _LOAD_TIMED, spec],
        env=env,
        cwd=tmp_path,  # `-c` puts the working directory first on sys.path: the repo's kernels/ would shadow
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.stdout.split()[:1] == ["True"], run.stderr[-2000:]
    seconds = run.stdout.split()[1]
    assert float(seconds) < 5.0
