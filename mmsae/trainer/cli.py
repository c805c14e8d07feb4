"""LightningCLI over `SAEModule` + `SAEDataModule` (the `fit` and `validate` commands of `mmsae`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from jsonargparse import set_loader
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from mmsae.legacy_names import RENAMED, warn_renamed
from mmsae.trainer.data import SAEDataModule
from mmsae.trainer.module import SAEModule
from mmsae.trainer.state import check_readable, resume_point

PARSER_MODE = "mmsae_yaml"


def load_yaml(text: str) -> Any:
    """YAML as LightningCLI reads it, with the renamed keys of SAE specs (configs of earlier versions) under
    their new names and a DeprecationWarning."""
    value = yaml.safe_load(text)
    return _renamed(value)


def _renamed(value: Any) -> Any:
    if isinstance(value, list):
        return [_renamed(v) for v in value]
    if not isinstance(value, dict):
        return value
    out = {}
    for key, v in value.items():
        if key in RENAMED:  # only SAE specs have such keys in a fit config
            warn_renamed(key, RENAMED[key], "mmsae fit config", stacklevel=2)
            key = RENAMED[key]
        out[key] = _renamed(v)
    return out


set_loader(PARSER_MODE, load_yaml, exceptions=(yaml.YAMLError,))


class SAECLI(LightningCLI):
    """`mmsae fit|validate`; run resumes with `--ckpt_path last` (needs a ModelCheckpoint with save_last; its
    last checkpoint is written at the end of training too, so a finished run resumed so trains nothing, and
    where a kill truncated it the run resumes from the newest readable checkpoint beside it)."""

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("parser_kwargs", {"parser_mode": PARSER_MODE})
        super().__init__(SAEModule, SAEDataModule, auto_configure_optimizers=False, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {
            name: skip for name, skip in LightningCLI.subcommands().items() if name in ("fit", "validate")
        }

    # Lightning passes weights_only=None on to torch.load; our checkpoints hold only tensors and
    # primitives, so ask for the safe loader explicitly instead of relying on torch's default.
    def fit(
        self,
        model: SAEModule,
        datamodule: SAEDataModule | None = None,
        ckpt_path: str | None = None,
        weights_only: bool | None = None,
    ) -> None:
        if ckpt_path == "last" and (last := self._last_checkpoint()) is not None:
            ckpt_path = resume_point(last)
        elif ckpt_path is not None:
            check_readable(ckpt_path)
        self.trainer.fit(
            model,
            datamodule=datamodule,
            ckpt_path=ckpt_path,
            weights_only=True if weights_only is None else weights_only,
        )

    def _last_checkpoint(self) -> Path | None:
        """Where `last` is written, for a ModelCheckpoint with a set dirpath (as the shipped configs have)."""
        for callback in self.trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath:
                return Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
        return None

    def validate(
        self,
        model: SAEModule,
        datamodule: SAEDataModule | None = None,
        ckpt_path: str | None = None,
        verbose: bool = True,
        weights_only: bool | None = None,
    ) -> None:
        self.trainer.validate(
            model,
            datamodule=datamodule,
            ckpt_path=ckpt_path,
            verbose=verbose,
            weights_only=True if weights_only is None else weights_only,
        )
