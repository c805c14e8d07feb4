"""The `mmsae` command: LightningCLI fit/validate on the shipped configs, --print_config, lazy subcommands."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_trainer_reruns import count_steps

from mmsae import cli
from mmsae.checkpoint import load_sae

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Shrink the synthetic benchmark to a few CPU steps.
SMALL = [
    "--data.batch_size",
    "256",
    "--data.tokens",
    "768",
    "--model.init_batches",
    "1",
    "--model.saes",
    '[{"arch": "topk", "n_features": 512, "k": 8}]',
]


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ["fit", "validate", "extract", "index", "app", "steer", "unlearn"]:
        assert f"  {command} " in out
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_print_config_parses_every_shipped_config(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["fit", "--config", str(CONFIGS / config), "--print_config"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["model"]["saes"] and resolved["data"]["source"]
    assert resolved["trainer"]["max_epochs"] == 1


def test_fit_fast_dev_run_writes_the_sae(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the config's relative run directory lands here
    argv = [
        "fit",
        "--config",
        str(CONFIGS / "synthetic_topk.yaml"),
        "--trainer.fast_dev_run",
        "1",
        "--model.out_dir",
        str(tmp_path / "saes"),
        *SMALL,
    ]
    assert cli.main(argv) == 0
    sae = load_sae(tmp_path / "saes" / "sae")
    assert (sae.cfg.d_in, sae.cfg.n_features, sae.cfg.k, sae.cfg.training_tokens) == (256, 512, 8, 256)
    assert sae.cfg.normalization == "folded"


def test_fit_logs_saves_config_then_validate_and_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = [
        "--config",
        str(CONFIGS / "synthetic_topk.yaml"),
        *SMALL,
        "--data.val_tokens",
        "512",
        "--trainer.log_every_n_steps",
        "1",
    ]
    assert cli.main(["fit", *config]) == 0
    run = tmp_path / "runs" / "synthetic_topk" / "version_0"
    saved = yaml.safe_load((run / "config.yaml").read_text())  # SaveConfigCallback: the resolved config
    assert saved["data"]["tokens"] == 768 and saved["model"]["saes"][0]["n_features"] == 512
    assert list(run.glob("events.out.tfevents.*"))
    csv_dir = tmp_path / "runs" / "synthetic_topk" / "csv"
    rows = list(csv.DictReader((csv_dir / "version_0" / "metrics.csv").open()))
    fvu = [float(r["train/sae/fvu"]) for r in rows if r.get("train/sae/fvu")]
    assert fvu and all(0 <= v < 2 for v in fvu)
    assert load_sae(run / "saes" / "sae").cfg.training_tokens == 768
    last = tmp_path / "runs" / "synthetic_topk" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    assert cli.main(["validate", *config, "--ckpt_path", str(last)]) == 0
    val_rows = list(csv.DictReader((csv_dir / "version_1" / "metrics.csv").open()))
    assert 0 < float(val_rows[-1]["val/sae/fvu"]) < 2 and float(val_rows[-1]["val/sae/l0"]) <= 8
    # Resuming a finished run from `last` trains no further steps and still succeeds.
    assert cli.main(["fit", *config, "--ckpt_path", "last"]) == 0


def test_external_subcommands_dispatch_lazily(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "fake_cli.py").write_text(
        "calls = []\ndef cli_main(argv):\n    calls.append(argv)\n    return 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.EXTERNAL_COMMANDS, "extract", ("fake_cli", False, "x"))
    monkeypatch.setitem(cli.EXTERNAL_COMMANDS, "steer", ("fake_cli", True, "x"))
    assert cli.main(["extract", "--hook", "blocks.3"]) == 3
    assert cli.main(["steer", "--feature", "7"]) == 3
    assert sys.modules["fake_cli"].calls == [["--hook", "blocks.3"], ["steer", "--feature", "7"]]

    monkeypatch.setitem(cli.EXTERNAL_COMMANDS, "index", ("mmsae.no_such_module", False, "x"))
    assert cli.main(["index", "build"]) == 2
    assert "cannot import mmsae.no_such_module" in capsys.readouterr().err


def _counted_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], list[int]]:
    """`mmsae fit` args for 5 steps with checkpoints every 2 into tmp_path/ckpt, resuming from `last`, and
    the list that records each trained step."""
    steps = count_steps(monkeypatch)
    monkeypatch.chdir(tmp_path)
    checkpoint = (
        "{class_path: ModelCheckpoint, init_args: {dirpath: ckpt, every_n_train_steps: 2, save_last: true}}"
    )
    args = [
        "fit",
        "--model.saes=[{arch: topk, n_features: 32, k: 4}]",
        "--model.warmup_steps=2",
        f"--model.out_dir={tmp_path / 'saes'}",
        "--data.source={synthetic: {d: 16, n_directions: 64, mean_active: 3}}",
        "--data.tokens=320",
        "--data.batch_size=64",
        "--trainer.max_epochs=1",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.callbacks=[{checkpoint}]",
        "--ckpt_path=last",
    ]
    return args, steps


def test_fit_rerun_of_a_finished_run_from_last_trains_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """last.ckpt is written at the end too, so rerunning the finished command with `--ckpt_path last` resumes
    at step 5 and trains nothing (it retrained step 4 and rewrote the SAE)."""
    from mmsae.trainer.cli import SAECLI

    args, steps = _counted_fit(tmp_path, monkeypatch)
    SAECLI(args=args, save_config_callback=None)
    assert steps == [0, 1, 2, 3, 4]
    exported = sorted((tmp_path / "saes" / "sae").iterdir())
    before = [(p.read_bytes(), p.stat().st_mtime_ns) for p in exported]
    SAECLI(args=args, save_config_callback=None)
    assert steps == [0, 1, 2, 3, 4]
    assert [(p.read_bytes(), p.stat().st_mtime_ns) for p in exported] == before


def test_fit_from_a_truncated_last_resumes_from_the_newest_readable_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill while last.ckpt was written leaves it truncated: `--ckpt_path last` resumes from the periodic
    checkpoint of step 4 beside it, as `mmsae.train` does (it stopped with an error)."""
    from mmsae.trainer.cli import SAECLI

    args, steps = _counted_fit(tmp_path, monkeypatch)
    SAECLI(args=args, save_config_callback=None)
    last = tmp_path / "ckpt" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.warns(UserWarning, match=r"last\.ckpt is truncated or corrupt.*epoch=0-step=4\.ckpt"):
        SAECLI(args=args, save_config_callback=None)
    assert steps == [0, 1, 2, 3, 4, 4]
    assert torch.load(last, weights_only=True)["global_step"] == 5  # rewritten whole
