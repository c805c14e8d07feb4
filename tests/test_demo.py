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
                "--n-latents",
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
    assert len(list((tmp_path / "report").glob("latent_*.html"))) == 4
    command = capsys.readouterr().out.rsplit("Open the concept-search app with:\n", 1)[1].split()
    assert command[:3] == [".venv/bin/mmsae", "app", "search"]
    args = build_parser().parse_args(command[2:])  # the printed command is one the app CLI accepts
    assert Path(args.index) == tmp_path / "index"
