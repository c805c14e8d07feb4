"""Pixels cross from DataLoader workers to the device as uint8, and become floats there.

Why: an encoder's torchvision pipeline ends in `ToTensor` + `Normalize`, so shipping float32
pixels moves 602 KB per 224² image through shared memory, the pin-memory thread and the host→device
copy: on an H100 host the pinning alone capped a 12-worker loader at ~3.5k images/s (CHANGELOG.md). Cut
before `ToTensor`, workers run the PIL steps (mode, resize, crop) and ship uint8 [3, H, W] (a quarter of
the bytes); `ToTensor`'s scaling and `Normalize` run on the device, with the same fp32 operations in the
same order, so the pixels are bit-identical to the whole pipeline on the host (checked when the hand-off
is built, and on the GPU in the tests).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision import transforms as T
from torchvision.transforms import functional as F

# Steps that make an image RGB (timm's pipeline starts with mmsae's `rgb`, open_clip's with these).
RGB_STEPS = ("rgb", "MaybeConvertMode", "_convert_to_rgb")


def _step_name(step: Any) -> str:
    return getattr(step, "__name__", type(step).__name__)


@dataclass(frozen=True)
class HostPixels:
    """The PIL steps of a pipeline, then uint8 [3, H, W] (picklable: what loader workers run)."""

    steps: T.Compose

    def __call__(self, image: Any) -> Tensor:
        image = self.steps(image)
        if image.mode != "RGB":  # split_pipeline only cuts pipelines that convert to RGB first
            raise ValueError(f"expected an RGB image after {self.steps}, got mode {image.mode!r}.")
        return torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)


@dataclass(frozen=True)
class PixelHandoff:
    """A pipeline cut before `ToTensor`: `host` in the workers, `finish` on the device."""

    host: HostPixels
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    def finish(self, pixels_BCHW: Tensor) -> Tensor:
        """uint8 [B, 3, H, W] on any device → the float32 pixels the whole pipeline gives."""
        if pixels_BCHW.dtype != torch.uint8:
            raise TypeError(f"PixelHandoff.finish takes uint8 pixels, got {pixels_BCHW.dtype}.")
        return unit_normalize(pixels_BCHW.float(), self.mean, self.std)


def unit_normalize(levels: Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> Tensor:
    """float32 pixel levels in [0, 255] [..., 3, H, W] (overwritten) → ToTensor's [0, 1], then Normalize's
    (x − mean) / std when `mean` is given: the same fp32 operations as the torchvision pipeline."""
    # ToTensor divides by 255. A tensor divisor, not the number: CUDA multiplies by the reciprocal of a
    # scalar divisor, which is 1 ulp off the division for some levels.
    x = levels.div_(torch.tensor(255.0, device=levels.device))
    return x if mean is None else F.normalize(x, list(mean), list(std), inplace=True)


def split_pipeline(pipeline: Callable[[Any], Tensor] | None, probe: Any) -> PixelHandoff | None:
    """The uint8 hand-off of a torchvision `Compose` [RGB step, PIL steps..., ToTensor, (Normalize)], or
    None when the pipeline has another shape or the hand-off does not reproduce it bit for bit on `probe`
    (a PIL image); then workers ship the pipeline's own float pixels."""
    if not isinstance(pipeline, T.Compose):
        return None
    steps = list(pipeline.transforms)
    at = next((i for i, s in enumerate(steps) if isinstance(s, T.ToTensor)), None)
    if at is None or not any(_step_name(s) in RGB_STEPS for s in steps[:at]):
        return None
    tail = steps[at + 1 :]
    if len(tail) > 1 or (tail and not isinstance(tail[0], T.Normalize)):
        return None
    mean, std = (
        (None, None)
        if not tail
        else (tuple(torch.as_tensor(v, dtype=torch.float64).tolist()) for v in (tail[0].mean, tail[0].std))
    )
    handoff = PixelHandoff(HostPixels(T.Compose(steps[:at])), mean, std)
    expected = pipeline(probe)
    got = handoff.finish(handoff.host(probe)[None])[0]
    return handoff if got.shape == expected.shape and torch.equal(got, expected) else None


def draft_size_of(pipeline: Callable[[Any], Tensor] | None, margin: int = 2) -> int | tuple[int, int] | None:
    """The least size a JPEG may be decoded at for `pipeline` (`open_image`'s `draft_size`): `margin` × the
    size of the pipeline's first geometric step, a `Resize` without `max_size` (an int → the least shorter
    side; (h, w) → the least (width, height)). None for other pipelines, e.g. a crop before the resize.

    Why a margin: decoding right at the target size leaves the resize nothing to smooth, and libjpeg's
    scaled IDCT then differs from a full decode + antialiased resize by ~1–3 levels on average (up to 57
    on sharp edges, on the scikit-image photos); with the resize still downscaling ≥ 2×, by 0.2–0.7 levels
    on average (tests/test_perf_inputs.py bounds it)."""
    if not isinstance(pipeline, T.Compose):
        return None
    for step in pipeline.transforms:
        if _step_name(step) in RGB_STEPS:
            continue
        if not isinstance(step, T.Resize) or step.max_size is not None:
            return None
        size = [step.size] if isinstance(step.size, int) else list(step.size)
        return margin * int(size[0]) if len(size) == 1 else (margin * int(size[1]), margin * int(size[0]))
    return None
