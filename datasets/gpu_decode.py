"""JPEG decoding and an encoder's preprocessing on the device (nvJPEG on CUDA), for batches of files.

Why: PIL decode + resize in CPU loader workers delivers ~2k images/s against a 10–30k images/s bf16 ViT
forward on an H100 (docs/benchmarks.md). Here workers only read file bytes; the main process decodes a
whole batch with `torchvision.io.decode_jpeg(..., device=...)` and resizes, crops and normalises it with
the parameters of the encoder's own torchvision pipeline (`DevicePreprocess.from_transform`).

Agreement with the PIL path (measured on the scikit-image photos, JPEG quality 90, in uint8 levels of the
un-normalised pixels): CPU decoding (libjpeg-turbo) is bit-identical to PIL's; the float resize differs
from PIL's, which rounds to uint8 between its horizontal and vertical passes, by ≤ 6 levels at sharp edges
and ≤ 0.2 level on average; `MAX_LEVELS` / `MEAN_LEVELS` bound these differences. nvJPEG's IDCT and
chroma upsampling are not libjpeg's: the CUDA test allows twice the tolerance (not yet measured here).
A store is deterministic for a given device type; CPU and CUDA decoding may differ in the last bits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import functional as F

from mmsae.datasets.batched_resize import resize_crop
from mmsae.datasets.images import ExampleDataset, ImageCaptions, ImageFolder, ImageList
from mmsae.datasets.pixels import RGB_STEPS, unit_normalize

JPEG_START, JPEG_END = b"\xff\xd8\xff", b"\xff\xd9"
MAX_LEVELS, MEAN_LEVELS = 8.0, 0.5  # device vs PIL pixels, in uint8 levels (see the module docstring)


@dataclass(frozen=True)
class EncodedJpeg:
    """A file's bytes ([N] uint8), read by a loader worker, to be decoded on the device."""

    data: Tensor


@dataclass(frozen=True)
class DevicePreprocess:
    """Resize → centre crop → [0, 1] → normalise, on uint8 [3, H, W] images of any size on any device."""

    resize: int | list[int]  # torchvision semantics: an int (or [int]) sets the shorter side
    interpolation: T.InterpolationMode
    max_size: int | None
    crop: list[int] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_transform(cls, transform: Any) -> DevicePreprocess:
        """Read the parameters of a torchvision `Compose` (timm's and open_clip's eval pipelines)."""
        if not isinstance(transform, T.Compose):
            raise ValueError(
                f"decode='device' reproduces a torchvision Compose pipeline, got "
                f"{type(transform).__name__}; use decode='pil' for this encoder."
            )
        resize = crop = normalize = None
        to_unit = False
        for step in transform.transforms:
            name = getattr(step, "__name__", type(step).__name__)
            if isinstance(step, T.Resize) and resize is None and not to_unit:
                resize = step
            elif isinstance(step, T.CenterCrop) and crop is None and not to_unit:
                crop = step
            elif isinstance(step, T.ToTensor):
                to_unit = True
            elif isinstance(step, T.Normalize) and to_unit and normalize is None:
                normalize = step
            elif name not in RGB_STEPS or getattr(step, "mode", "RGB") != "RGB":  # decode_jpeg made RGB
                raise ValueError(
                    f"decode='device' cannot reproduce the step {step!r} of this encoder's "
                    "preprocessing (it handles Resize, CenterCrop, ToTensor, Normalize); use "
                    "decode='pil'."
                )
        if resize is None or normalize is None:
            raise ValueError(
                f"decode='device' needs a Resize and a Normalize after ToTensor in {transform}; "
                "use decode='pil'."
            )
        mean, std = (tuple(torch.as_tensor(v).tolist()) for v in (normalize.mean, normalize.std))
        return cls(
            resize.size,
            resize.interpolation,
            resize.max_size,
            None if crop is None else list(crop.size),
            mean,
            std,
        )

    def __call__(self, images: Sequence[Tensor]) -> Tensor:
        """uint8 [3, H_i, W_i] images (sizes may differ) → normalised float32 pixels [B, 3, H, W].

        Antialiased bicubic/bilinear resizes with a crop inside every resized image run batched
        (`mmsae.datasets.batched_resize`): image by image, the per-call host cost, not the GPU, bounded the
        batch. Otherwise per image the cast and the resize, called straight into the ATen ops. Clamp,
        rounding and normalisation run once on the stacked batch."""
        batched = self._batched(images)
        if batched is not None:
            return unit_normalize(batched.clamp_(0, 255).round_(), self.mean, self.std)
        resized = [self._resize(image_CHW.unsqueeze(0).float()) for image_CHW in images]
        if self.crop is not None:
            resized = [self._center_crop(x_1CHW) for x_1CHW in resized]
        # PIL returns uint8: clamp the bicubic overshoot and round as it does
        x_BCHW = torch.cat(resized).clamp_(0, 255).round_()
        return unit_normalize(x_BCHW, self.mean, self.std)

    def _batched(self, images: Sequence[Tensor]) -> Tensor | None:
        """The batch resized and cropped by `resize_crop`; None where that path does not apply (another
        interpolation, no crop and sizes that differ, a crop past a resized image: torchvision pads)."""
        mode = self.interpolation.value
        if mode not in ("bicubic", "bilinear") or not images:
            return None
        sizes = [tuple(self.resized_size(*x.shape[-2:])) for x in images]
        if self.crop is None:
            if len(set(sizes)) > 1:
                return None
            crop = sizes[0]
        else:
            crop = tuple(self.crop) if len(self.crop) == 2 else (self.crop[0], self.crop[0])
        if any(h < crop[0] or w < crop[1] for h, w in sizes):
            return None
        # torchvision's `center_crop` offsets (Python's round, as there)
        tops = [(round((h - crop[0]) / 2.0), round((w - crop[1]) / 2.0)) for h, w in sizes]
        return resize_crop(images, sizes, tops, crop, mode)

    def _resize(self, x_1CHW: Tensor) -> Tensor:
        """torchvision's tensor `Resize`, without its per-call Python: the antialiased ATen ops directly."""
        size = self.resized_size(x_1CHW.shape[-2], x_1CHW.shape[-1])
        if size == list(x_1CHW.shape[-2:]):  # torchvision leaves an image of the target size as is
            return x_1CHW
        mode = self.interpolation.value
        if mode == "bicubic":
            return torch.ops.aten._upsample_bicubic2d_aa(x_1CHW, size, False)
        if mode == "bilinear":
            return torch.ops.aten._upsample_bilinear2d_aa(x_1CHW, size, False)
        return torch.nn.functional.interpolate(x_1CHW, size=size, mode=mode)

    def _center_crop(self, x_1CHW: Tensor) -> Tensor:
        """torchvision's `center_crop` (same offsets), a view where the image is at least the crop's size."""
        crop_h, crop_w = self.crop if len(self.crop) == 2 else (self.crop[0], self.crop[0])
        h, w = x_1CHW.shape[-2:]
        if crop_h > h or crop_w > w:
            return F.center_crop(x_1CHW, self.crop)  # pads
        top, left = round((h - crop_h) / 2.0), round((w - crop_w) / 2.0)
        return x_1CHW[..., top : top + crop_h, left : left + crop_w]

    def resized_size(self, height: int, width: int) -> list[int]:
        """The output size of torchvision's `Resize(self.resize, max_size=self.max_size)` for an image."""
        if not isinstance(self.resize, int) and len(self.resize) == 2:
            return list(self.resize)
        size = self.resize if isinstance(self.resize, int) else self.resize[0]
        short, long = sorted((height, width))
        new_short, new_long = size, int(size * long / short)
        if self.max_size is not None and new_long > self.max_size:
            new_short, new_long = int(self.max_size * new_short / new_long), self.max_size
        return [new_short, new_long] if height <= width else [new_long, new_short]

    def check_matches(self, transform: Callable[[Any], Tensor], image: Any) -> None:
        """Raise if this differs on average from the PIL `transform` of a PIL RGB `image` by more than
        `MEAN_LEVELS`. The mean, not the max: on a synthetic pattern with sharp edges PIL's intermediate
        rounding alone reaches 15 levels at single pixels, while a wrong size, interpolation or mean/std
        moves the average by ≥ 1 level."""
        expected_CHW = transform(image)
        got_CHW = self([torch.from_numpy(np.array(image)).permute(2, 0, 1)])[0]
        if got_CHW.shape != expected_CHW.shape:
            raise ValueError(
                f"decode='device' gives pixels {tuple(got_CHW.shape)}, the encoder's transform "
                f"{tuple(expected_CHW.shape)}; use decode='pil'."
            )
        levels = (got_CHW - expected_CHW).abs() * torch.tensor(self.std).view(3, 1, 1) * 255
        if levels.mean() > MEAN_LEVELS:
            raise ValueError(
                f"decode='device' differs from the encoder's transform by {levels.mean():.2f} "
                f"uint8 levels on average (tolerance {MEAN_LEVELS}); use decode='pil'."
            )


Item = tuple[int, Any, "dict[str, Any] | None"]


@dataclass(frozen=True)
class PackedJpegs:
    """A batch of loader items whose JPEG bytes travel as one tensor (made by `pack_jpegs` in the worker).

    A DataLoader worker hands every tensor to the main process through a shared-memory segment of its own:
    one per file capped the device path at ~2,400 files/s with 16 workers, one per batch does not."""

    items: list[Item]  # the batch's items, JPEG entries with None in place of their bytes
    jpeg_at: list[int]  # positions of the JPEG entries
    sizes: list[int]  # their byte counts, in order
    blob: Tensor  # their bytes, concatenated

    def unpack(self) -> list[Item]:
        items = list(self.items)
        for p, data in zip(self.jpeg_at, self.blob.split(self.sizes)):
            index, _, error = items[p]
            items[p] = (index, EncodedJpeg(data), error)
        return items


def pack_jpegs(items: list[Item]) -> PackedJpegs:
    """Collate function of the device path's loader (picklable: it runs in the workers)."""
    jpeg_at = [p for p, (_, x, _) in enumerate(items) if isinstance(x, EncodedJpeg)]
    datas = [items[p][1].data for p in jpeg_at]
    blob = torch.cat(datas) if datas else torch.empty(0, dtype=torch.uint8)
    stripped = [(i, None, err) if isinstance(x, EncodedJpeg) else (i, x, err) for i, x, err in items]
    return PackedJpegs(stripped, jpeg_at, [len(d) for d in datas], blob)


def image_files(dataset: ExampleDataset) -> list[Path]:
    """The image file of every item, for data sets that are files on disk."""
    if isinstance(dataset, ImageFolder):
        return dataset.paths
    if isinstance(dataset, ImageCaptions):
        return dataset.images
    if isinstance(dataset, ImageList) and (files := dataset.files()) is not None:
        return files
    raise ValueError(
        f"decode='device' reads image files; {dataset.describe()} does not consist of files "
        "(use an ImageFolder or ImageCaptions data set, or decode='pil')."
    )


def read_jpeg(path: Path) -> EncodedJpeg | None:
    """The bytes of a file that starts and ends with JPEG markers; None for other or truncated files and
    unreadable paths (they take the PIL path, which reports them)."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if not (data.startswith(JPEG_START) and data.endswith(JPEG_END)):
        return None
    return EncodedJpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))


def decode_jpegs(jpegs: Sequence[EncodedJpeg], device: torch.device) -> list[Tensor | None]:
    """uint8 RGB [3, H, W] on `device` per file; None where the decoder rejects one."""
    data = [j.data for j in jpegs]
    if not data:  # a batch without JPEG files (torchvision refuses an empty list)
        return []
    try:  # one batched call (nvJPEG batches on CUDA)
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:  # a bad file fails the whole batch: find it
        out: list[Tensor | None] = []
        for d in data:
            try:
                out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(None)
        return out
