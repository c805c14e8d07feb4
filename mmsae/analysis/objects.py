"""Real photos by name, and hand-drawn object boxes on some of them, to measure where features fire.

A photo is named by a spec: "skimage:NAME" (a scikit-image photo, "skimage:motorcycle_left" included),
"foolbox:imagenet:I" (foolbox's ImageNet sample I) or "interior:I" (interior photo I). `PhotoList` turns
specs into a data set (e.g. the base of `RandomCrops`); `OBJECT_BOXES` holds one box per object, in the
photo's own pixels, drawn by hand around the whole visible object (thin parts such as a dog's tail and an
eagle's wing tips may fall outside).

`box_coverage` pushes a box through the encoder's own preprocessing (resize, centre crop), so it gives,
for every patch the model sees, the fraction of the patch that lies inside the box.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, cached_property

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from mmsae.datasets.images import SKIMAGE_PHOTOS, Example, ExampleDataset, SkimagePhotos
from mmsae.encoders.base import Encoder


@dataclass(frozen=True)
class ObjectBox:
    """One object in one photo: `box` = (x0, y0, x1, y1) in the photo's pixels, x1/y1 exclusive."""

    photo: str
    label: str
    box: tuple[int, int, int, int]


# Drawn by hand on the full-size photos (foolbox samples are 512×512). Chelsea's cat is not here: it fills
# the whole square the model sees, so no feature could be judged against background there.
OBJECT_BOXES: tuple[ObjectBox, ...] = (
    ObjectBox("skimage:coffee", "cup", (170, 15, 425, 305)),
    ObjectBox("skimage:astronaut", "astronaut", (20, 15, 365, 512)),
    ObjectBox("skimage:astronaut", "space shuttle model", (355, 0, 470, 285)),
    ObjectBox("skimage:rocket", "rocket", (300, 125, 345, 410)),
    ObjectBox("skimage:motorcycle_left", "motorcycle", (92, 95, 685, 455)),
    ObjectBox("foolbox:imagenet:0", "dog", (115, 55, 315, 455)),
    ObjectBox("foolbox:imagenet:6", "car", (100, 130, 420, 340)),
    ObjectBox("foolbox:imagenet:7", "car", (35, 150, 510, 390)),
    ObjectBox("foolbox:imagenet:9", "bottle cap", (30, 80, 465, 465)),
    ObjectBox("foolbox:imagenet:17", "eagle", (0, 120, 512, 365)),
    ObjectBox("foolbox:imagenet:19", "beetle", (100, 135, 435, 395)),
)
# The scikit-image photos of scenes and objects (the others are textures, microscopy, text and charts).
SKIMAGE_SCENES = ("astronaut", "camera", "chelsea", "coffee", "rocket", "motorcycle_left")


def real_photo_specs(n_foolbox: int = 20, n_interior: int = 39) -> list[str]:
    """Specs of the real photos: the scikit-image scenes, the first `n_foolbox` of foolbox's 20 ImageNet
    samples and the first `n_interior` of the 39 interior photos."""
    specs = [f"skimage:{n}" for n in SKIMAGE_SCENES]
    specs += [f"foolbox:imagenet:{i}" for i in range(n_foolbox)]
    return specs + [f"interior:{i}" for i in range(n_interior)]


@cache
def _photo_set(name: str) -> ExampleDataset:
    from mmsae.datasets.photos import FoolboxSamples, InteriorPhotos

    return FoolboxSamples("imagenet") if name == "foolbox:imagenet" else InteriorPhotos()


def load_photo(spec: str) -> Image.Image:
    """The RGB photo named by `spec` (see the module docstring)."""
    kind, _, rest = spec.partition(":")
    if kind == "skimage" and rest in ("motorcycle_left", "motorcycle_right"):
        import skimage.data

        left, right, _ = skimage.data.stereo_motorcycle()  # bundled with scikit-image: no download
        return Image.fromarray(left if rest == "motorcycle_left" else right).convert("RGB")
    if kind == "skimage" and rest in SKIMAGE_PHOTOS:
        image = SkimagePhotos([rest])[0].image
    elif spec.startswith(("foolbox:imagenet:", "interior:")) and spec.rpartition(":")[2].isdigit():
        name, _, index = spec.rpartition(":")
        photos = _photo_set(name)
        if int(index) >= len(photos):
            raise ValueError(f"Photo {spec!r}: {name} has {len(photos)} photos (0..{len(photos) - 1}).")
        image = photos[int(index)].image
    else:
        raise ValueError(
            f"Unknown photo spec {spec!r}: use skimage:NAME (NAME in {', '.join(SKIMAGE_PHOTOS)}, "
            "motorcycle_left, motorcycle_right), foolbox:imagenet:I or interior:I."
        )
    assert image is not None  # image data sets always carry an image
    return image


class PhotoList(ExampleDataset):
    """Real photos named by specs, in the given order (a base for `RandomCrops`)."""

    def __init__(self, specs: Sequence[str]):
        if not specs:
            raise ValueError("PhotoList needs at least one photo spec.")
        self.specs = list(specs)

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, index: int) -> Example:
        self._check_index(index)
        return Example(index, image=load_photo(self.specs[index]))

    def source(self, index: int) -> str:
        return self.specs[index]

    @cached_property
    def _fingerprint(self) -> str:
        digest = hashlib.sha256(b"photo-list")
        for i, spec in enumerate(self.specs):
            digest.update(spec.encode() + b"\0")
            digest.update(np.asarray(self[i].image).tobytes())
        return digest.hexdigest()

    def fingerprint(self) -> str:
        return self._fingerprint

    def describe(self) -> str:
        return f"PhotoList({len(self)} photos)"


def _check_box(obj: ObjectBox, size: tuple[int, int]) -> None:
    x0, y0, x1, y1 = obj.box
    W, H = size
    if not (0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H):
        raise ValueError(
            f"Box {obj.box} of {obj.label!r} in {obj.photo} does not fit its {W}×{H} photo: give "
            "(x0, y0, x1, y1) with 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height."
        )


def _unit_pixels(encoder: Encoder, image: Image.Image) -> torch.Tensor:
    """The encoder's preprocessing of `image`, mapped back to [0, 1] per channel, [C, H, W].

    Black and white images of the same size give the affine map of the normalisation, so no mean/std
    needs to be known."""
    black = encoder.transform(Image.new("RGB", image.size))
    white = encoder.transform(Image.new("RGB", image.size, "white"))
    return ((encoder.transform(image) - black) / (white - black)).clamp(0, 1).float().cpu()


def model_view(encoder: Encoder, image: Image.Image) -> Image.Image:
    """The photo as the model sees it (after its resize and crop): the canvas heatmaps are drawn on."""
    pixels_CHW = _unit_pixels(encoder, image)
    return Image.fromarray((pixels_CHW.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


@torch.no_grad()
def box_coverage(encoder: Encoder, image: Image.Image, obj: ObjectBox, grid: tuple[int, int]) -> np.ndarray:
    """Fraction of each patch of an [H, W] `grid` inside the object box after the encoder's preprocessing.

    The box is drawn as a white mask and preprocessed exactly like the photo (same resize and crop), then
    averaged over each patch; so the result holds for any resize/crop policy the encoder uses.
    """
    _check_box(obj, image.size)
    mask = Image.new("RGB", image.size)
    ImageDraw.Draw(mask).rectangle([obj.box[0], obj.box[1], obj.box[2] - 1, obj.box[3] - 1], fill="white")
    inside_HW = _unit_pixels(encoder, mask)[0]
    return F.adaptive_avg_pool2d(inside_HW[None, None], grid)[0, 0].numpy()
