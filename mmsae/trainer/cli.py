"""LightningCLI over `SAEModule` + `SAEDataModule` (the `fit` and `validate` commands of `mmsae`)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LightningCLI

from mmsae.trainer.data import SAEDataModule
from mmsae.trainer.module import SAEModule


class SAECLI(LightningCLI):
    """`mmsae fit|validate`; run resumes with `--ckpt_path last` (needs a ModelCheckpoint with save_last)."""

    def __init__(self, **kwargs: Any):
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
        self.trainer.fit(
            model,
            datamodule=datamodule,
            ckpt_path=ckpt_path,
            weights_only=True if weights_only is None else weights_only,
        )

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
