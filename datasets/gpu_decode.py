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

from mmsae.datasets.images import ExampleDataset, ImageCaptions, ImageFolder
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
        """uint8 [3, H_i, W_i] images (sizes may differ) → normalised float32 pixels [B, 3, H, W]."""
        size = [self.resize] if isinstance(self.resize, int) else list(self.resize)
        out = []
        for image_CHW in images:  # one kernel per image: the sources have different sizes
            x_CHW = F.resize(image_CHW.float(), size, self.interpolation, self.max_size, antialias=True)
            # PIL returns uint8: clamp the bicubic overshoot and round as it does
            x_CHW = x_CHW.clamp_(0, 255).round_()
            out.append(x_CHW if self.crop is None else F.center_crop(x_CHW, self.crop))
        return unit_normalize(torch.stack(out), self.mean, self.std)

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


def image_files(dataset: ExampleDataset) -> list[Path]:
    """The image file of every item, for data sets that are files on disk."""
    if isinstance(dataset, ImageFolder):
        return dataset.paths
    if isinstance(dataset, ImageCaptions):
        return dataset.images
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
