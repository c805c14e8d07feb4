"""The installed zoo: real weights load offline and classify real photos; DINOv2 equals its ONNX source.

Thresholds come from measured numbers (benchmarks/bench_zoo.py, docs/benchmarks.md): MobileNetV2 top-1
on foolbox's 20 ImageNet samples is 90 % (threshold 85 %), EfficientNet-Lite0 90 %; DINOv2's
conversion differs from onnxruntime by 2.3e-5 (threshold 1e-3).
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mmsae.datasets import FoolboxSamples, InteriorPhotos, LabeledSkimagePhotos
from mmsae.encoders import get_encoder
from mmsae.encoders.timm import TimmEncoder
from mmsae.zoo import MODELS, WHEELS, read_manifest


def _top_k(
    enc: TimmEncoder, data: FoolboxSamples | LabeledSkimagePhotos
) -> tuple[torch.Tensor, torch.Tensor]:
    probs_BK = enc.classify([data[i].image for i in range(len(data))]).softmax(-1)
    return probs_BK, probs_BK.topk(5).indices


@pytest.fixture(scope="module")
def mobilenet(zoo: Path) -> TimmEncoder:
    return get_encoder("timm:mobilenetv2_100", pretrained=True)


def test_manifest_pins_every_wheel_and_licence(zoo: Path) -> None:
    manifest = read_manifest(zoo)
    for project, wheel in WHEELS.items():
        path = zoo / manifest["wheels"][project]["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == wheel.sha256
    for name in MODELS:
        entry = manifest["models"][name]
        licence = (zoo / entry["file"]).parent / "LICENSE.txt"
        assert (
            entry["wheel_sha256"] == WHEELS[MODELS[name].wheel].sha256 and "Licence:" in licence.read_text()
        )
    assert len(InteriorPhotos()) >= 38 and all(
        (zoo / e["dir"] / "LICENSE.txt").is_file() for e in manifest["photos"].values()
    )


def test_mobilenet_top1_on_foolbox_imagenet(mobilenet: TimmEncoder) -> None:
    data = FoolboxSamples("imagenet")
    _, top5 = _top_k(mobilenet, data)
    labels = torch.tensor(data.labels)
    top1 = (top5[:, 0] == labels).float().mean().item()
    assert top1 >= 0.85 and (top5 == labels[:, None]).any(1).float().mean().item() >= 0.95
    assert mobilenet.data_config["interpolation"] == "bilinear"  # torchvision's recipe, not timm's


def test_real_classifiers_on_scikit_image_photos(mobilenet: TimmEncoder) -> None:
    data = LabeledSkimagePhotos(["chelsea", "coffee", "camera"])
    probs, top5 = _top_k(mobilenet, data)
    names = [mobilenet.class_names[i] for i in top5[:, 0].tolist()]
    assert names == ["Egyptian cat", "espresso", "tripod"] and probs.max(-1).values[1] > 0.9
    lite0 = get_encoder("timm:tf_efficientnet_lite0", pretrained=True)
    probs, top5 = _top_k(lite0, data)
    assert [lite0.class_names[i] for i in top5[:2, 0].tolist()] == ["tiger cat", "espresso"]
    # every top-1 is one of the photo's accepted names
    assert all(int(t) in accepted for t, accepted in zip(top5[:, 0], data.accepted))


def test_dinov2_equals_its_onnx_source(zoo: Path) -> None:
    import onnx  # the zoo extra (part of dev): installing the zoo needed it already

    from mmsae.zoo.convert import onnx_backbone_output

    enc = get_encoder("timm:vit_small_patch14_dinov2", pretrained=True)
    assert enc.image_size == (224, 224) and enc.grid == (16, 16) and not enc.has_classifier
    assert enc.default_hook == "blocks.9"  # before the saliency-tuned last blocks
    model = MODELS["vit_small_patch14_dinov2.zoo_saliency"]
    with zipfile.ZipFile(zoo / "wheels" / WHEELS[model.wheel].filename) as zf:
        graph = onnx.load_model_from_string(zf.read(model.member))
    pixels = np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)
    reference = onnx_backbone_output(graph, pixels)
    acts = enc.activations(torch.from_numpy(pixels), ["norm"])["norm"].acts_ND
    assert float(np.abs(acts.numpy() - reference[0]).max()) <= 1e-3


def test_zoo_tag_and_logits_from_a_real_block(mobilenet: TimmEncoder) -> None:
    tagged = get_encoder("timm:mobilenetv2_100.tv_in1k", pretrained=True)
    assert tagged.model.pretrained_cfg["tag"] == "tv_in1k"
    chelsea = LabeledSkimagePhotos(["chelsea"])[0].image
    pixels = mobilenet.transform(chelsea)[None]
    acts = mobilenet.activations(pixels, ["blocks.5"])["blocks.5"].acts_ND[None]
    logits = mobilenet.logits_from_hook("blocks.5", acts)
    torch.testing.assert_close(logits, tagged.classify(pixels), atol=1e-4, rtol=1e-4)
    assert mobilenet.class_names[int(logits.argmax())] == "Egyptian cat"
