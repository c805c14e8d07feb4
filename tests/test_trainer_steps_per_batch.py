"""Several optimizer steps per Lightning loop iteration (`SAEModule(steps_per_iteration=K)`): a run with K > 1
trains, logs, checkpoints and resumes exactly as with K = 1; K is chosen where it pays and checked."""

from __future__ import annotations

import csv
import itertools
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from mmsae.datasets.synthetic import SyntheticActivations
from mmsae.trainer import SAEDataModule, SAEModule, SAESpec
from mmsae.trainer.data import ArraySource, IterableSource, TokenBudget
from mmsae.trainer.iterations import block_sizes, choose_steps_per_iteration

D, BATCH, STEPS = 16, 32, 18  # 18 steps: blocks of 4 end with a short one
LOG_EVERY, CKPT_EVERY = 4, 8


def data() -> torch.Tensor:
    return SyntheticActivations(d=D, n_directions=64, mean_active=3, seed=0).sample(1024) * 3.0


def run(
    tmp_path: Path, steps_per_iteration: int | None, ckpt_path: str | None = None, **trainer_kw: Any
) -> tuple[SAEModule, L.Trainer]:
    """A run where features die within its 18 steps (AuxK then acts and its size changes), logging every 4
    steps into tmp_path/csv and checkpointing every 8 into tmp_path/ckpt."""
    L.seed_everything(0)
    spec = SAESpec(n_features=32, k=2, options={"dead_tokens": 4 * BATCH, "aux_k": 8})
    module = SAEModule([spec], warmup_steps=3, steps_per_iteration=steps_per_iteration)
    checkpoint = ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=CKPT_EVERY, save_top_k=-1)
    trainer = L.Trainer(
        **{
            "max_epochs": 1,
            "accelerator": "cpu",
            "logger": CSVLogger(tmp_path, name="", version="csv"),
            "log_every_n_steps": LOG_EVERY,
            "callbacks": [checkpoint],
            "enable_progress_bar": False,
            "enable_model_summary": False,
            **trainer_kw,
        }
    )
    datamodule = SAEDataModule(data(), tokens=STEPS * BATCH, batch_size=BATCH)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    return module, trainer


def assert_same_state(got: tuple[SAEModule, L.Trainer], expected: tuple[SAEModule, L.Trainer]) -> None:
    """Bit for bit: weights, input scale, dead clocks, token count and Adam's moments."""
    (module, trainer), (module_ref, trainer_ref) = got, expected
    assert trainer.global_step == trainer_ref.global_step == STEPS
    for key, value in module_ref.state_dict().items():
        assert torch.equal(module.state_dict()[key], value), key
    state, state_ref = (t.optimizers[0].state_dict()["state"] for t in (trainer, trainer_ref))
    for i in state_ref:
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[i][name], state_ref[i][name]), (i, name)
    assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr() == (
        trainer_ref.lr_scheduler_configs[0].scheduler.get_last_lr()
    )


def logged_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- blocks of batches
def test_block_sizes_end_on_multiples_of_k() -> None:
    assert block_sizes(0, 10, 4) == [4, 4, 2]
    assert block_sizes(8, 10, 4) == [2]
    assert block_sizes(5, 10, 4) == [3, 2]  # a resume at step 5 rejoins the block ends at 8
    assert block_sizes(10, 10, 4) == [] and block_sizes(0, 3, 1) == [1, 1, 1]


@pytest.mark.parametrize("make_source", [ArraySource, lambda x: IterableSource(list(x.split(24)))])
@pytest.mark.parametrize(("rank", "world", "start"), [(0, 1, 0), (1, 2, 0), (0, 1, 3), (1, 2, 5)])
def test_blocks_hold_the_batches_of_one_per_item(make_source, rank: int, world: int, start: int) -> None:
    x = torch.arange(200 * 3, dtype=torch.float32).view(200, 3)
    source = make_source(x)
    single = list(TokenBudget(source, 8, 11, seed=1, rank=rank, world_size=world, start=start))
    budget = TokenBudget(
        source, 8, 11, seed=1, rank=rank, world_size=world, start=start, steps_per_iteration=4
    )
    blocks = list(budget)
    assert len(budget) == 3 and all(isinstance(block, list) for block in blocks)
    assert [len(b) for b in blocks] == block_sizes(start, 11, 4)
    flat = list(itertools.chain.from_iterable(blocks))
    assert len(flat) == len(single) == 11 - start
    assert all(torch.equal(a, b) for a, b in zip(flat, single))


# ----------------------------------------------------------------------------- training
def test_k_steps_per_iteration_train_log_and_checkpoint_as_one(tmp_path: Path) -> None:
    one = run(tmp_path / "k1", 1)
    four = run(tmp_path / "k4", 4)
    assert one[0]._steps_per_iteration == 1 and four[0]._steps_per_iteration == 4
    assert four[1].num_training_batches == 5  # 18 steps in Lightning iterations of 4, 4, 4, 4, 2
    assert_same_state(four, one)
    assert four[0].clocks[0].tokens_since_fired.max() >= 4 * BATCH  # features died: AuxK acted
    # Same rows (steps, values) in the log, same checkpoint steps.
    rows = logged_rows(tmp_path / "k4")
    assert rows == logged_rows(tmp_path / "k1") and len(rows) >= 4
    assert (
        sorted(p.name for p in (tmp_path / "k4" / "ckpt").iterdir())
        == sorted(p.name for p in (tmp_path / "k1" / "ckpt").iterdir())
        == ["epoch=0-step=16.ckpt", "epoch=0-step=8.ckpt"]
    )


def test_resume_mid_run_with_k_continues_exactly(tmp_path: Path) -> None:
    full = run(tmp_path / "full", 4)
    mid = tmp_path / "full" / "ckpt" / "epoch=0-step=8.ckpt"
    state = torch.load(mid, weights_only=True)
    assert state["global_step"] == 8 and state["SAEDataModule"] == {"batches_done": 8}
    assert state["mmsae_steps_per_iteration"] == 4
    assert_same_state(run(tmp_path / "resumed", 4, str(mid)), full)
    # None keeps the checkpoint's K (Lightning's progress in it counts iterations of 4).
    resumed = run(tmp_path / "auto", None, str(mid))
    assert resumed[0]._steps_per_iteration == 4
    assert_same_state(resumed, full)
    with pytest.raises(
        ValueError, match=r"trained with steps_per_iteration=4 .*resume with steps_per_iteration=4"
    ):
        run(tmp_path / "other", 2, str(mid))


def test_checkpoints_of_one_step_per_iteration_resume_with_one(tmp_path: Path) -> None:
    """A checkpoint without the entry (earlier versions) counted one step per iteration."""
    full = run(tmp_path / "full", 1)
    mid = tmp_path / "full" / "ckpt" / "epoch=0-step=8.ckpt"
    state = torch.load(mid, weights_only=True)
    del state["mmsae_steps_per_iteration"]
    torch.save(state, tmp_path / "old.ckpt")
    resumed = run(tmp_path / "resumed", None, str(tmp_path / "old.ckpt"))
    assert resumed[0]._steps_per_iteration == 1
    assert_same_state(resumed, full)


# ----------------------------------------------------------------------------- choice and checks
def trainer(**kw: Any) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, **kw)


def test_automatic_k_divides_the_logging_and_checkpoint_periods() -> None:
    def auto(graphs: bool = True, blocks: bool = True, **kw: Any) -> int:
        return choose_steps_per_iteration(None, trainer(**kw), graphs, blocks)

    every = lambda n: [ModelCheckpoint(every_n_train_steps=n)]
    assert auto(log_every_n_steps=50, callbacks=every(1000)) == 10
    assert auto(log_every_n_steps=64, enable_checkpointing=False) == 16
    assert auto(log_every_n_steps=48, callbacks=every(20)) == 4
    assert auto(log_every_n_steps=50, max_steps=1003) == 1
    assert auto(log_every_n_steps=0, enable_checkpointing=False) == 16
    assert auto(graphs=False, log_every_n_steps=50) == 1  # eager steps: the loop is a small share
    assert auto(blocks=False, log_every_n_steps=50) == 1  # another loader: no blocks
    assert auto(log_every_n_steps=50, val_check_interval=10) == 1


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "4"])
def test_bad_steps_per_iteration_is_refused(value: Any) -> None:
    with pytest.raises(ValueError, match="must be a positive integer or None"):
        SAEModule([SAESpec(n_features=32, k=2)], steps_per_iteration=value)


def test_k_that_moves_logs_checkpoints_or_validation_is_refused() -> None:
    def check(k: int, blocks: bool = True, **kw: Any) -> int:
        return choose_steps_per_iteration(k, trainer(**kw), graphs=False, blocks=blocks)

    assert check(5, log_every_n_steps=50, callbacks=[ModelCheckpoint(every_n_train_steps=100)]) == 5
    with pytest.raises(
        ValueError, match=r"=3 does not divide log_every_n_steps=50.*divisor of 50 \(e\.g\. 10\)"
    ):
        check(3, log_every_n_steps=50)
    with pytest.raises(ValueError, match="does not divide every_n_train_steps of checkpoint callback 0=6"):
        check(4, log_every_n_steps=8, callbacks=[ModelCheckpoint(every_n_train_steps=6)])
    with pytest.raises(ValueError, match="does not divide max_steps=30"):
        check(4, log_every_n_steps=8, max_steps=30)
    with pytest.raises(ValueError, match="val_check_interval=10: Lightning counts that interval in loop"):
        check(2, log_every_n_steps=8, val_check_interval=10)
    with pytest.raises(ValueError, match="steps_per_iteration=2 needs an SAEDataModule"):
        check(2, blocks=False, log_every_n_steps=8)


def test_k_with_another_loader_is_refused_when_fitting(tmp_path: Path) -> None:
    module = SAEModule([SAESpec(n_features=32, k=2)], d_in=D, steps_per_iteration=2)
    loader = torch.utils.data.DataLoader(list(data().split(BATCH)), batch_size=None)
    with pytest.raises(ValueError, match="steps_per_iteration=2 needs an SAEDataModule"):
        trainer(max_epochs=1, default_root_dir=tmp_path, log_every_n_steps=2).fit(module, loader)


def test_ddp_ranks_train_blocks_as_single_batches(tmp_path: Path) -> None:
    """strategy='ddp' over gloo, two CPU processes: each rank takes the same K, and K=4 ends where K=1 does
    (the dead clocks are all-reduced every step, inside a block as between blocks)."""
    script = tmp_path / "ddp_run.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys, lightning as L, torch
        from mmsae.trainer import SAEDataModule, SAEModule, SAESpec
        torch.set_num_threads(1)
        L.seed_everything(0)
        k = int(sys.argv[1])
        spec = SAESpec(n_features=64, k=1, options={{"aux_k": 4, "dead_tokens": 256}})
        module = SAEModule([spec], warmup_steps=2, init_batches=2, steps_per_iteration=k)
        trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                            log_every_n_steps=4, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
        trainer.fit(module, datamodule=SAEDataModule(torch.randn(4096, 8), tokens=14 * 64, batch_size=32))
        assert module._steps_per_iteration == k and trainer.global_step == 14
        torch.save(dict(module.state_dict()), f"{tmp_path}/k{{k}}_rank{{trainer.global_rank}}.pt")
    """)
    )
    for k in (1, 4):
        subprocess.run(
            [sys.executable, str(script), str(k)], check=True, timeout=120, capture_output=True, cwd=tmp_path
        )
    states = {
        (k, r): torch.load(tmp_path / f"k{k}_rank{r}.pt", weights_only=True) for k in (1, 4) for r in (0, 1)
    }
    reference = states[1, 0]
    assert reference["tokens_seen"].item() == 14 * 64 and reference["clocks.0.tokens_since_fired"].max() > 0
    for state in states.values():
        for key, value in reference.items():
            assert torch.equal(state[key], value), key
