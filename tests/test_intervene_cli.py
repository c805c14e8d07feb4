"""`mmsae steer ...` / `mmsae unlearn ...` end to end on tiny presets."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from skimage import data

import mmsae
from mmsae.intervene.cli import cli_main


@pytest.fixture()
def cat_png(tmp_path):
    path = tmp_path / "cat.png"
    Image.fromarray(data.chelsea()).save(path)
    return path


def steer_image_argv(sae_dir, image, *extra: str) -> list[str]:
    """`mmsae steer image` on clip:tiny with one set edit, plus `extra` flags."""
    return [
        "steer",
        "image",
        "--encoder",
        "clip:tiny",
        "--sae",
        str(sae_dir),
        "--device",
        "cpu",
        "--image",
        str(image),
        "--edit",
        "set:3=10",
        *extra,
    ]


def test_steer_image_cli(tmp_path, cat_png, capsys):
    sae_dir = tmp_path / "sae"
    mmsae.build_sae("topk", 32, 64, k=4, hook="visual", encoder="clip:tiny").save(sae_dir)
    argv = steer_image_argv(sae_dir, cat_png, "--edit", "dir:5=-2", "--labels", "cat,dog")
    assert cli_main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["label_shift"]) == {"cat", "dog"} and len(report["cosine"]) == 1


def test_steer_cli_bad_input(tmp_path, cat_png, capsys):
    sae_dir = tmp_path / "sae"
    mmsae.build_sae("topk", 32, 64, k=4, hook="visual", encoder="timm:test_vit").save(sae_dir)
    argv = steer_image_argv(sae_dir, cat_png)
    assert cli_main(argv) == 2
    assert "trained on encoder 'timm:test_vit'" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli_main([*argv[:-1], "set:three=10"])


def test_unlearn_cli_select_then_generate(tmp_path, capsys):
    sae_dir = tmp_path / "sae"
    mmsae.build_sae("topk", 8, 32, k=4, hook="up_blocks.0.attentions.1", encoder="unet:tiny").save(sae_dir)
    (tmp_path / "cat.txt").write_text("a cat\n")
    (tmp_path / "other.txt").write_text("a house\n")
    common = ["--encoder", "unet:tiny", "--sae", str(sae_dir), "--device", "cpu"]
    assert (
        cli_main(
            [
                "unlearn",
                "select",
                *common,
                "--concept",
                f"cat={tmp_path / 'cat.txt'}",
                "--other",
                str(tmp_path / "other.txt"),
                "--percentile",
                "90",
                "--steps",
                "1",
            ]
        )
        == 0
    )
    assert (sae_dir / "unlearn_selection.json").is_file()
    out = tmp_path / "out"
    assert (
        cli_main(
            [
                "unlearn",
                "generate",
                *common,
                "--concepts",
                "cat",
                "--prompt",
                "a cat",
                "--steps",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert (out / "before_0.png").is_file() and (out / "after_0.png").is_file()
    assert (
        cli_main(
            [
                "unlearn",
                "generate",
                *common,
                "--concepts",
                "dog",
                "--prompt",
                "a dog",
                "--steps",
                "1",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "Unknown concept" in capsys.readouterr().out
