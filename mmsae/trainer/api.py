"""`mmsae.train(...)`: the one-call API, the same `SAEModule` the CLI runs."""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from mmsae.legacy_names import legacy_kwargs
from mmsae.sae import SAE
from mmsae.trainer.data import SAEDataModule
from mmsae.trainer.module import SAEModule, SAESpec
from mmsae.trainer.state import resume_point


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing metrics.csv is continued, not deleted."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))


class ResumableCSVLogger(CSVLogger):
    """A `CSVLogger` whose reruns into the same version append to its metrics.csv (Lightning's would delete
    it), so a resumed run keeps the whole history: rows of steps retrained after a kill appear twice."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def default_precision() -> str:
    """bf16 autocast where it is fast (CUDA), full fp32 elsewhere."""
    return "bf16-mixed" if torch.cuda.is_available() else "32-true"


@legacy_kwargs
def train(
    data: Any,
    sae: str = "topk",
    n_features: int = 4096,
    k: int | None = None,
    tokens: int = 10_000_000,
    batch_size: int = 4096,
    lr: float | None = None,
    precision: str | None = None,
    out_dir: str | None = None,
    devices: int | str = "auto",
    hook: str | None = None,
    encoder: str | None = None,
    seed: int = 0,
    warmup_steps: int = 1000,
    checkpoint_every: int = 1000,
    cuda_graphs: bool | None = None,
    stage: bool | None = None,
    steps_per_iteration: int | None = None,
    **sae_kwargs: Any,
) -> SAE:
    """Train one SAE on `data` and return it, input scale folded in (it acts on raw activations).

    `data` is anything `mmsae.trainer.sources.as_source` accepts (tensor, array, memmap, iterable of batches,
    activation store or its path, {'synthetic': {...}}). `sae_kwargs` are options of the architecture
    (e.g. aux_k=256). With `out_dir`, the SAE is written to `out_dir/<hook or 'sae'>/`, TensorBoard/CSV logs
    and a resumable checkpoint every `checkpoint_every` steps and at the end go there too (rerun with the same
    settings to resume, from the newest readable checkpoint where a kill truncated last.ckpt: the CSV log
    keeps growing; a finished run trains nothing, leaves its files as they are and returns its SAE; other
    settings are refused by name); without it nothing is written.
    `cuda_graphs` replays each step as one CUDA graph (None: wherever possible; see `SAEModule`); `stage`
    keeps the data (a store: whole, else its shuffle buffer) on the GPU (None: when it fits in a quarter of
    the free memory; see `SAEDataModule`). `steps_per_iteration` optimizer steps run per Lightning loop
    iteration (None: up to 16 with CUDA graphs, dividing `checkpoint_every` and the logging period; see
    `SAEModule`).
    """
    L.seed_everything(seed, verbose=False)
    datamodule = SAEDataModule(data, tokens=tokens, batch_size=batch_size, hook=hook, seed=seed, stage=stage)
    spec = SAESpec(arch=sae, n_features=n_features, k=k, lr=lr, options=sae_kwargs)
    module = SAEModule(
        [spec],
        d_in=datamodule.d_in,
        hook=hook,
        encoder=encoder,
        warmup_steps=warmup_steps,
        out_dir=out_dir,
        cuda_graphs=cuda_graphs,
        steps_per_iteration=steps_per_iteration,
    )
    with tempfile.TemporaryDirectory() as scratch:
        logging = out_dir is not None
        resume = resume_point(Path(out_dir) / "checkpoints" / "last.ckpt") if logging else None
        trainer = L.Trainer(
            max_epochs=1,
            devices=devices,
            precision=precision or default_precision(),
            default_root_dir=out_dir or scratch,
            num_sanity_val_steps=0,
            enable_model_summary=False,
            # Fixed (unversioned) directories, so a rerun with the same out_dir finds last.ckpt and resumes.
            logger=[
                TensorBoardLogger(out_dir, name="", version="tensorboard"),
                ResumableCSVLogger(out_dir, name="", version="csv"),
            ]
            if logging
            else False,
            enable_checkpointing=logging,
            callbacks=[
                ModelCheckpoint(
                    f"{out_dir}/checkpoints", every_n_train_steps=checkpoint_every, save_last=True
                )
            ]
            if logging
            else None,
        )
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    return module.folded_sae(0)
