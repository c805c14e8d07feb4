"""`mmsae.train(...)`: the one-call API, the same `SAEModule` the CLI runs."""

from __future__ import annotations

import tempfile
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from mmsae.sae import SAE
from mmsae.trainer.data import SAEDataModule
from mmsae.trainer.module import SAEModule, SAESpec


def default_precision() -> str:
    """bf16 autocast where it is fast (CUDA), full fp32 elsewhere."""
    return "bf16-mixed" if torch.cuda.is_available() else "32-true"


def train(
    data: Any,
    sae: str = "topk",
    n_latents: int = 4096,
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
    **sae_kwargs: Any,
) -> SAE:
    """Train one SAE on `data` and return it, input scale folded in (it acts on raw activations).

    `data` is anything `mmsae.trainer.data.as_source` accepts (tensor, array, memmap, iterable of batches,
    activation store or its path, {'synthetic': {...}}). `sae_kwargs` are options of the architecture
    (e.g. aux_k=256). With `out_dir`, the SAE is written to `out_dir/<hook or 'sae'>/`, TensorBoard/CSV logs
    and a resumable checkpoint every `checkpoint_every` steps go there too (rerun to resume); without it
    nothing is written. `cuda_graphs` replays each step as one CUDA graph (None: wherever possible; see
    `SAEModule`); `stage` keeps the data (a store: its shuffle buffer) on the GPU (None: when it fits in a
    quarter of the free memory; see `SAEDataModule`).
    """
    L.seed_everything(seed, verbose=False)
    datamodule = SAEDataModule(data, tokens=tokens, batch_size=batch_size, hook=hook, seed=seed, stage=stage)
    spec = SAESpec(arch=sae, n_latents=n_latents, k=k, lr=lr, options=sae_kwargs)
    module = SAEModule(
        [spec],
        d_in=datamodule.d_in,
        hook=hook,
        encoder=encoder,
        warmup_steps=warmup_steps,
        out_dir=out_dir,
        cuda_graphs=cuda_graphs,
    )
    with tempfile.TemporaryDirectory() as scratch:
        logging = out_dir is not None
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
                CSVLogger(out_dir, name="", version="csv"),
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
        trainer.fit(module, datamodule=datamodule, ckpt_path="last" if logging else None, weights_only=True)
    return module.folded_sae(0)
