"""Reruns of `mmsae.train(..., out_dir=...)` into one out_dir: a resume continues the run, another
configuration is refused by name, a finished run is left as it is, a killed one resumes from its last
checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from conftest import ddp_rank_states

import mmsae
from mmsae.checkpoint import load_sae
from mmsae.datasets.synthetic import SyntheticActivations
from mmsae.trainer import SAEModule


def acts(n: int) -> torch.Tensor:
    """Sparse superposition data: 64 features in d=16, ~3 active per token."""
    return SyntheticActivations(d=16, n_directions=64, mean_active=3, seed=0).sample(n)


def small_run(out_dir: Path, **kw) -> mmsae.SAE:
    options = {"n_features": 32, "k": 4, "tokens": 8 * 64, "batch_size": 64, "warmup_steps": 2}
    return mmsae.train(acts(1024), out_dir=str(out_dir), checkpoint_every=4, **{**options, **kw})


# 51 steps: checkpoints every 4 steps end at step 48; metrics every 50 steps: rows of steps 0 and 50.
UNEVEN = {"tokens": 51 * 32, "batch_size": 32}


def count_steps(monkeypatch: pytest.MonkeyPatch, kill_at: int | None = None) -> list[int]:
    """The optimizer steps trained from now on (their global_step), in order; `kill_at`: fail at that step
    once, as a kill would stop the run."""
    steps: list[int] = []
    kills = [kill_at]
    train_step = SAEModule._train_step

    def counted(self: SAEModule, batch_BD: torch.Tensor) -> None:
        if self.global_step in kills:
            kills.clear()
            raise RuntimeError("killed")
        steps.append(self.global_step)
        train_step(self, batch_BD)

    monkeypatch.setattr(SAEModule, "_train_step", counted)
    return steps


def written(out_dir: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of the exported SAE and the CSV log: its bytes and modification time."""
    files = [*sorted((out_dir / "sae").iterdir()), out_dir / "csv" / "metrics.csv"]
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}


def assert_same_sae(got: mmsae.SAE, expected: mmsae.SAE) -> None:
    assert got.cfg == expected.cfg
    assert got.state_dict().keys() == expected.state_dict().keys()
    for key, value in expected.state_dict().items():
        assert torch.equal(got.state_dict()[key], value), key


@pytest.mark.parametrize("steps_per_iteration", [None, 2])
def test_rerun_of_a_finished_run_trains_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, steps_per_iteration
) -> None:
    """The run ends 3 steps after its last periodic checkpoint: its last.ckpt is of its end, so a rerun of
    the same command resumes a finished run (it retrained those 3 steps, rewrote the SAE, logged step 50
    again)."""
    steps = count_steps(monkeypatch)
    first = small_run(tmp_path, **UNEVEN, steps_per_iteration=steps_per_iteration)
    assert steps == list(range(51))
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 51
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["epoch=0-step=48.ckpt", "last.ckpt"]  # the periodic checkpoints are as they were
    before = written(tmp_path)
    # Lightning's console logger does not propagate its records: let the rerun's reach caplog.
    monkeypatch.setattr(logging.getLogger("lightning.pytorch"), "propagate", True)
    caplog.set_level(logging.INFO)
    again = small_run(tmp_path, **UNEVEN, steps_per_iteration=steps_per_iteration)
    assert steps == list(range(51))  # no step trained
    assert written(tmp_path) == before  # neither rewritten nor appended to
    assert "the run is already complete" in caplog.text
    assert_same_sae(again, first)
    assert_same_sae(again, load_sae(tmp_path / "sae"))


def test_killed_run_resumes_from_its_last_checkpoint_and_keeps_its_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run killed at step 10 resumes from its checkpoint of step 8 (its log, with the row of step 0, kept)
    and ends as the run that was never stopped: same SAE, same log, then finished for good."""
    full = small_run(tmp_path / "full", **UNEVEN)
    steps = count_steps(monkeypatch, kill_at=10)
    with pytest.raises(RuntimeError, match="killed"):
        small_run(tmp_path / "killed", **UNEVEN)
    assert steps == list(range(10))
    checkpoints = tmp_path / "killed" / "checkpoints"
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 8  # not of step 10
    log = tmp_path / "killed" / "csv" / "metrics.csv"
    assert [line.split(",")[1] for line in log.read_text().splitlines()] == ["step", "0"]
    steps.clear()
    resumed = small_run(tmp_path / "killed", **UNEVEN)
    assert steps == list(range(8, 51))
    assert_same_sae(resumed, full)
    assert log.read_text() == (tmp_path / "full" / "csv" / "metrics.csv").read_text()  # rows of steps 0, 50
    for name in ("cfg.json", "sae.safetensors"):
        saved = (tmp_path / "killed" / "sae" / name).read_bytes()
        assert saved == (tmp_path / "full" / "sae" / name).read_bytes(), name
    small_run(tmp_path / "killed", **UNEVEN)
    assert steps == list(range(8, 51))


def test_rerun_with_another_configuration_is_refused_by_name(tmp_path: Path) -> None:
    small_run(tmp_path)
    for change, named in [
        ({"k": 2}, r"saes\[0\]\.k: checkpoint 4, now 2"),
        ({"lr": 1e-3}, r"saes\[0\]\.lr: checkpoint None, now 0\.001"),
        ({"n_features": 64}, r"saes\[0\]\.n_features: checkpoint 32, now 64"),  # not a raw size mismatch
    ]:
        with pytest.raises(ValueError, match=named) as info:
            small_run(tmp_path, **change)
        assert "another out_dir" in str(info.value) and "last.ckpt" in str(info.value)
    assert load_sae(tmp_path / "sae").cfg.k == 4  # the written SAE still says what trained it
    small_run(tmp_path)  # the same configuration resumes (here: finds the run finished)


def test_fit_cli_resume_with_another_configuration_is_refused(tmp_path: Path) -> None:
    from mmsae.trainer.cli import SAECLI

    checkpoint = f"{{class_path: ModelCheckpoint, init_args: {{dirpath: {tmp_path}, save_last: true}}}}"

    def cli(k: int) -> None:
        args = [
            "fit",
            f"--model.saes=[{{arch: topk, n_features: 32, k: {k}}}]",
            "--model.warmup_steps=2",
            "--data.source={synthetic: {d: 16, n_directions: 64, mean_active: 3}}",
            "--data.tokens=256",
            "--data.batch_size=64",
            "--trainer.accelerator=cpu",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.callbacks=[{checkpoint}]",
            "--ckpt_path=last",
        ]
        SAECLI(args=args, save_config_callback=None)  # writes nothing outside tmp_path

    cli(4)
    with pytest.raises(ValueError, match=r"saes\[0\]\.k: checkpoint 4, now 2"):
        cli(2)


def test_resumable_csv_logger_appends_across_runs(tmp_path: Path) -> None:
    from mmsae.trainer.api import ResumableCSVLogger

    for steps in (range(3), range(3, 5)):
        logger = ResumableCSVLogger(tmp_path, name="", version="csv")
        for step in steps:
            logger.log_metrics({"fvu": 1.0 / (step + 1)} | ({"auxk": 0.5} if step == 4 else {}), step=step)
        logger.save()
    lines = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()
    assert lines[0] == "auxk,fvu,step" and [line.split(",")[-1] for line in lines[1:]] == list("01234")


def test_a_truncated_last_checkpoint_resumes_from_the_newest_readable_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill while last.ckpt was written leaves it truncated: the rerun resumes from the periodic checkpoint
    beside it and ends where the uninterrupted run ended (it stopped with an error that told users to pass a
    ckpt_path, which `mmsae.train` does not take)."""
    first = small_run(tmp_path, **UNEVEN)
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    steps = count_steps(monkeypatch)
    with pytest.warns(UserWarning, match=r"last\.ckpt is truncated or corrupt.*epoch=0-step=48\.ckpt"):
        again = small_run(tmp_path, **UNEVEN)
    assert steps == [48, 49, 50]  # the steps after the periodic checkpoint, trained again
    assert_same_sae(again, first)
    assert torch.load(last, weights_only=True)["global_step"] == 51  # rewritten whole


def test_no_readable_checkpoint_left_is_named_with_the_way_out(tmp_path: Path) -> None:
    small_run(tmp_path)
    for path in (tmp_path / "checkpoints").glob("*.ckpt"):
        path.write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(
        ValueError, match=r"Cannot resume from .*last\.ckpt.*or delete .*checkpoints to start"
    ):
        small_run(tmp_path)


def test_a_gloo_run_closes_its_process_group_before_the_interpreter_exits(tmp_path: Path) -> None:
    """Left to the interpreter's teardown, gloo's group aborted about one CPU DDP run in 25 after the work was
    done (exit status 134). A handler registered before training runs after mmsae's (atexit is last in, first
    out) and records, on each rank, whether the group was still open then."""
    setup = """
        import atexit
        atexit.register(lambda: open("at_exit", "a").write(str(torch.distributed.is_initialized())))
    """
    ddp_rank_states(tmp_path, "SAEModule([SAESpec(n_features=16, k=2)], warmup_steps=1)", 128, setup)
    assert (tmp_path / "at_exit").read_text() == "FalseFalse"
