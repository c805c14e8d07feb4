"""Training metrics reach the loggers without a host sync (`mmsae.trainer.logs`): each row under the step its
metrics were computed at, none lost at the end of a run or across a resume, and on CUDA no logging step
reads the GPU."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from mmsae.datasets.synthetic import SyntheticActivations
from mmsae.trainer import SAEDataModule, SAEModule, SAESpec
from mmsae.trainer.api import ResumableCSVLogger

D, BATCH = 16, 32
NEEDS_CUDA = "needs CUDA; CPU twin: test_rows_hold_the_metrics_of_the_step_they_are_labelled_with"


def data() -> torch.Tensor:
    return SyntheticActivations(d=D, n_directions=64, mean_active=3, seed=0).sample(2048) * 3.0


def spy_metrics(monkeypatch: pytest.MonkeyPatch) -> dict[int, dict[str, torch.Tensor]]:
    """{step: the metrics `SAEModule._step` returned at it}, for the steps that made metrics."""
    made: dict[int, dict[str, torch.Tensor]] = {}
    real = SAEModule._step

    def step(self: SAEModule, batch_BD: torch.Tensor, metrics: bool = True) -> dict[str, torch.Tensor]:
        at = self.global_step
        logs = real(self, batch_BD, metrics=metrics)
        if logs:
            made[at] = {k: v.detach().clone() for k, v in logs.items()}
        return logs

    monkeypatch.setattr(SAEModule, "_step", step)
    return made


def loggers(out: Path) -> list[L.pytorch.loggers.Logger]:
    """What `mmsae.train(out_dir=...)` attaches."""
    return [TensorBoardLogger(out, name="", version="tb"), ResumableCSVLogger(out, name="", version="csv")]


def run(
    out: Path, steps: int, ckpt_path: str | None = None, val_tokens: int = 0, **trainer_kw: Any
) -> tuple[SAEModule, L.Trainer]:
    """`steps` steps logging every 10 into out/csv (and TensorBoard); features die, so AuxK's metric comes
    and goes between logging steps."""
    L.seed_everything(0)
    spec = SAESpec(n_features=32, k=2, options={"dead_tokens": 4 * BATCH, "aux_k": 8})
    module = SAEModule([spec], warmup_steps=3)
    kw = {"enable_progress_bar": False, "enable_checkpointing": False, "precision": "32-true", **trainer_kw}
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=loggers(out),
        log_every_n_steps=10,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kw,
    )
    datamodule = SAEDataModule(data(), tokens=steps * BATCH, batch_size=BATCH, val_tokens=val_tokens)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    return module, trainer


def rows(out: Path) -> list[dict[str, str]]:
    with open(out / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def check_rows(out: Path, made: dict[int, dict[str, torch.Tensor]]) -> list[dict[str, str]]:
    """Every logging step has one row, under its step, holding exactly the metrics made at that step (and
    its epoch): none labelled with a later step, none carrying another step's value."""
    written = rows(out)
    assert [int(r["step"]) for r in written] == sorted(made)
    for r in written:
        metrics = made[int(r["step"])]
        expected = {k: float(v) for k, v in metrics.items()} | {"train/skipped_rows": 0.0, "epoch": 0.0}
        assert {k: float(v) for k, v in r.items() if k != "step" and v != ""} == expected, r["step"]
    return written


def test_rows_hold_the_metrics_of_the_step_they_are_labelled_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = spy_metrics(monkeypatch)
    _, trainer = run(tmp_path, steps=115)  # the last logging step, 110, is 5 steps before the end
    assert sorted(made) == list(range(0, 115, 10))
    written = check_rows(tmp_path, made)
    auxk = [bool(r["train/sae/auxk"]) for r in written]
    assert any(auxk) and not all(auxk)  # AuxK's metric comes and goes: a stale value would show
    # What Lightning's loggers were given is what the trainer holds: the last logging step's metrics.
    last = made[110]
    assert trainer.logged_metrics.keys() >= last.keys() and trainer.callback_metrics.keys() >= last.keys()
    for key, value in last.items():
        assert float(trainer.logged_metrics[key]) == float(trainer.callback_metrics[key]) == float(value)
    # The progress bar shows the latest value already on the host when it was set: step 100's.
    assert trainer.progress_bar_metrics["fvu"] == float(made[100]["train/sae/fvu"])
    assert trainer.global_step == 115


class Crash(L.Callback):
    """Stops the run with an error just before step `at` (a kill right after a checkpoint)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.at:
            raise RuntimeError("killed")


def test_a_resumed_run_appends_the_rows_an_uninterrupted_one_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = spy_metrics(monkeypatch)
    run(tmp_path / "full", steps=55)
    full = check_rows(tmp_path / "full", made)
    assert [int(r["step"]) for r in full] == [0, 10, 20, 30, 40, 50]
    # Killed right after the checkpoint of step 25: step 20's row was still on its way to the host then.
    checkpoint = ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=25, save_top_k=-1)
    with pytest.raises(RuntimeError, match="killed"):
        run(tmp_path / "resumed", steps=55, callbacks=[checkpoint, Crash(25)], enable_checkpointing=True)
    assert [int(r["step"]) for r in rows(tmp_path / "resumed")] == [0, 10, 20]
    run(tmp_path / "resumed", steps=55, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=25.ckpt"))
    assert rows(tmp_path / "resumed") == full


def test_rows_stay_in_step_order_around_a_validation(tmp_path: Path) -> None:
    run(tmp_path, steps=55, val_tokens=4 * BATCH)  # validates once, after the last step
    written = rows(tmp_path)
    assert [int(r["step"]) for r in written] == [0, 10, 20, 30, 40, 50, 54]
    assert written[-1]["val/sae/fvu"] and not written[-1]["train/sae/fvu"]


class NoSyncWindow(L.Callback):
    """Makes any host sync an error from the loop iteration that starts at step `start` to the end of the
    one that reaches step `stop`: Lightning's loop, logging steps and progress bar included."""

    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop, self.steps_checked = start, stop, 0

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self.start <= trainer.global_step < self.stop and torch.cuda.get_sync_debug_mode() == 0:
            torch.cuda.set_sync_debug_mode("error")
            self.first = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.stop and torch.cuda.get_sync_debug_mode() != 0:
            torch.cuda.set_sync_debug_mode("default")
            self.steps_checked = trainer.global_step - self.first


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NEEDS_CUDA)
def test_logging_steps_never_sync_on_cuda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With loggers and the progress bar on, no step from 20 to 100 reads the GPU, logging steps (every 10)
    included. The dead-feature window is longer than the run, and the host-side dead count is refreshed every
    100 steps: that read is `mmsae.trainer.state`'s matter, outside this window."""
    logged: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []
    real = SAEModule._log_train

    def log_train(self: SAEModule, logs: dict[str, torch.Tensor]) -> None:
        # Clones on the device (a graph replay overwrites its outputs): recording them reads nothing back.
        logged.append((self._step_t.clone(), {k: v.detach().clone() for k, v in logs.items()}))
        real(self, logs)

    monkeypatch.setattr(SAEModule, "_log_train", log_train)
    L.seed_everything(0)
    spec = SAESpec(n_features=256, k=8, options={"dead_tokens": 10**12})
    module = SAEModule([spec], warmup_steps=3, cuda_graphs=True)
    window = NoSyncWindow(20, 100)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        logger=loggers(tmp_path),
        log_every_n_steps=10,
        callbacks=[window],
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    x = SyntheticActivations(d=64, n_directions=512, mean_active=4, seed=0).sample(120 * 256)
    try:
        trainer.fit(module, datamodule=SAEDataModule(x, tokens=120 * 256, batch_size=256), weights_only=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert window.steps_checked >= 80 and trainer.global_step == 120
    assert module._graphed is not None and module._graphed.replays > 0
    assert isinstance(trainer.progress_bar_metrics["fvu"], float)
    # The rows are still those of the steps that made the metrics, with their values.
    made = {int(step): metrics for step, metrics in logged}
    written = rows(tmp_path)
    assert [int(r["step"]) for r in written] == sorted(made) == list(range(0, 120, 10))
    for r in written:
        for key, value in made[int(r["step"])].items():
            assert float(r[key]) == float(value), (r["step"], key)
