"""Every shipped config runs as written: its `mmsae extract` command (on a tiny model of the same family),
then `mmsae fit` on the path the config names, then the SAEs load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import commented_extract_command
from PIL import Image

from mmsae import cli
from mmsae.checkpoint import load_sae
from mmsae.encoders import get_encoder
from mmsae.extract_cli import _parse_config
from mmsae.extract_cli import cli_main as extract_main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = {"clip": "clip:tiny", "timm": "timm:test_vit", "unet": "unet:tiny", "llava": "llava:tiny"}


def extract_command(config: Path) -> list[str]:
    """The arguments of the `mmsae extract ...` command in a config's comments."""
    argv = commented_extract_command(config.read_text())
    assert argv is not None, f"{config.name} trains on a store but gives no `mmsae extract ...` command."
    return argv


def _tiny_overrides(argv: list[str]) -> tuple[list[str], str, str]:
    """Overrides that swap in the tiny model of the command's encoder family, and its hook."""
    spec = TINY[_parse_config(argv).encoder.partition(":")[0]]
    hook = get_encoder(spec).default_hook
    return ["--encoder", spec, "--hooks", hook, "--batch_size", "4", "--device", "cpu"], spec, hook


NAMES = [p.name for p in sorted(CONFIGS.glob("*.yaml"))]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_shipped_config_extracts_fits_and_loads(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = CONFIGS / name
    monkeypatch.chdir(tmp_path)  # the configs' relative paths (activations/, runs/, images) land here
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(images / f"{i}.png")
    data = yaml.safe_load(config.read_text())["data"]
    fit = ["fit", "--config", str(config), "--trainer.max_steps", "2", "--data.tokens", "256"]
    fit += ["--data.batch_size", "64", "--model.out_dir", str(tmp_path / "saes")]
    if isinstance(data["source"], str):  # a store: extract it first, as the config says
        argv = extract_command(config)
        written = _parse_config(argv)
        # The command writes where the config trains from, at the hook it trains on.
        assert (written.out_dir, written.hooks) == (data["source"], [data["hook"]])
        overrides, spec, hook = _tiny_overrides(argv)
        assert extract_main([*argv, *overrides]) == 0
        fit += ["--model.encoder", spec, "--model.hook", hook, "--data.hook", hook]
    assert cli.main(fit) == 0
    saes = [load_sae(p.parent) for p in sorted((tmp_path / "saes").rglob("cfg.json"))]
    assert len(saes) == len(yaml.safe_load(config.read_text())["model"]["saes"])
