"""Encoder settings that change the bytes (`Encoder.store_config`) name the store; the CLI sets them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from mmsae.datasets.images import PromptList, RandomCrops, SkimagePhotos
from mmsae.encoders import get_encoder
from mmsae.encoders.base import Encoder
from mmsae.encoders.unet import UNetEncoder
from mmsae.extract import extract
from mmsae.extract_cli import _parse_config
from mmsae.store import STORE_JSON, ActivationStore, StoreError

PROMPTS = PromptList(["a red cube", "a blue sphere"])


class _DeclaresSampling(UNetEncoder):
    """The real tiny UNet, declaring its sampler settings as what changes its activations."""

    def store_config(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self.sampling)))


def _tiny(cls: type[UNetEncoder] = UNetEncoder) -> UNetEncoder:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # same weights each time: only the sampling settings differ
        return cls.from_spec("tiny", pretrained=False)


def _extract(encoder: Encoder, out: Path) -> ActivationStore:
    return extract(encoder, PROMPTS, None, out, batch_size=2, progress=False)


def test_a_declared_setting_gives_another_store(tmp_path: Path) -> None:
    encoder = _tiny(_DeclaresSampling)
    first = _extract(encoder, tmp_path)
    encoder.sampling = dataclasses.replace(encoder.sampling, guidance_scale=0.0)
    second = _extract(encoder, tmp_path)  # before: a cache hit returning the first store
    assert second.path != first.path and len(list(tmp_path.iterdir())) == 2
    assert (
        json.loads((second.path / STORE_JSON).read_text())["config"]["encoder_config"]["guidance_scale"] == 0
    )
    assert not torch.equal(first.shard_acts(first.hooks[0], 0), second.shard_acts(second.hooks[0], 0))
    # Training on the out_dir now needs to know which one.
    with pytest.raises(StoreError, match=r"(?s)holds 2 activation stores.*Name the one to use"):
        ActivationStore(tmp_path)


def test_encoders_without_settings_keep_their_store_config(tmp_path: Path) -> None:
    # No encoder_config key at all when store_config() is empty: stores made before keep their hash.
    vit = get_encoder("timm:test_vit")
    store = extract(vit, RandomCrops(SkimagePhotos(), n=2), None, tmp_path, batch_size=2, progress=False)
    assert "encoder_config" not in json.loads((store.path / STORE_JSON).read_text())["config"]
    assert vit.store_config() == {}


def test_unet_sampling_settings_give_two_stores(tmp_path: Path) -> None:
    cfg = _extract(get_encoder("unet:tiny"), tmp_path)
    no_cfg = _extract(get_encoder("unet:tiny", guidance_scale=0.0), tmp_path)
    assert no_cfg.path != cfg.path


def test_cli_passes_encoder_options() -> None:
    cfg = _parse_config(
        [
            "--encoder",
            "unet:tiny",
            "--dataset",
            "prompts:x.txt",
            "--encoder-options",
            "guidance_scale=0",
            "timesteps=[999, 500]",
        ]
    )
    assert cfg.encoder_options == {"guidance_scale": 0, "timesteps": [999, 500]}
    with pytest.raises(ValueError, match="key=value"):
        _parse_config(["--encoder_options", "guidance_scale"])


def test_extract_without_encoder_or_data_says_what_it_needs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`mmsae extract` alone ran a real extraction of hidden defaults into ./runs."""
    from mmsae.extract_cli import cli_main

    monkeypatch.chdir(tmp_path)
    assert cli_main([]) == 1
    assert "needs --encoder and --dataset" in capsys.readouterr().err
    assert cli_main(["--encoder", "timm:test_vit"]) == 1
    assert "needs --dataset" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written
