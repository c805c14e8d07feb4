"""`make demo`'s pipeline end to end, on a tiny CLIP so it runs in the suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmsae import load_sae
from mmsae.apps.cli import build_parser
from mmsae.demo import main


def test_demo_pipeline_writes_sae_index_report_and_prints_app_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hook = "visual.transformer.resblocks.1"
    assert (
        main(
            [
                "--encoder",
                "clip:tiny",
                "--hook",
                hook,
                "--crops",
                "16",
                "--tokens",
                "4096",
                "--n-features",
                "64",
                "--k",
                "4",
                "--batch-size",
                "128",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    sae = load_sae(tmp_path / "sae" / hook)
    assert (sae.cfg.hook, sae.cfg.encoder, sae.cfg.normalization) == (hook, "clip:tiny", "folded")
    assert (tmp_path / "index").is_dir() and (tmp_path / "report" / "summary.png").stat().st_size > 0
    assert len(list((tmp_path / "report").glob("feature_*.html"))) == 4
    command = capsys.readouterr().out.rsplit("Open the concept-search app with:\n", 1)[1].split()
    assert command[:3] == [".venv/bin/mmsae", "app", "search"]
    args = build_parser().parse_args(command[2:])  # the printed command is one the app CLI accepts
    assert Path(args.index) == tmp_path / "index"


def test_demo_on_the_zoo_classifier_prints_logit_names_steering_and_a_class_query(
    zoo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--encoder", "timm:mobilenetv2_100", "--crops", "32", "--tokens", "4096", "--n-features", "64"]
    assert main([*args, "--k", "8", "--batch-size", "32", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    sae = load_sae(tmp_path / "sae" / "global_pool")
    assert (sae.cfg.encoder, sae.cfg.hook) == ("timm:mobilenetv2_100", "global_pool")
    assert "by their effect on the ImageNet logits" in out and "logit names" in out
    assert "query 'espresso' →" in out and "(pretrained encoder)" in out
    assert len(list((tmp_path / "report").glob("feature_*.html"))) == 4
    command = out.rsplit("Open the concept-search app with:\n", 1)[1].split()
    assert "--random-init" not in command and command[command.index("--model") + 1] == "timm:mobilenetv2_100"
