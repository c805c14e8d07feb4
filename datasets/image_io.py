"""The project's one way to open an image: a file or PIL image → fully decoded 8-bit RGB, or an
`ImageReadError` naming the file, the reason and the fix."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DraftSize = int | tuple[int, int]
# PIL's own hard limit (2 × Image.MAX_IMAGE_PIXELS): larger files are decompression bombs, not photos.
MAX_IMAGE_PIXELS = 2 * 89_478_485
# Modes with 8 bits per channel: PIL's convert("RGB") is exact for them.
EIGHT_BIT_MODES = tuple("1 L LA La P PA RGB RGBA RGBa RGBX CMYK YCbCr LAB HSV".split())  # noqa: SIM905
# Modes without a fixed value range: scaled by the narrowest standard range that holds every pixel.
_OPEN_RANGES = {"F": (1.0, 255.0, 65535.0), "I": (255.0, 65535.0)}


class ImageReadError(ValueError):
    """An image that cannot be opened; the message names the source, the reason and the fix."""

    def __init__(self, source: str, reason: str, fix: str = "Fix or remove the file."):
        super().__init__(f"{source}: {reason}. {fix}")
        self.source, self.reason = source, reason


def to_rgb(image: Image.Image, source: str = "image") -> Image.Image:
    """An 8-bit RGB copy of `image`, scaling high-bit-depth modes instead of clipping them.

    8-bit modes convert as PIL does. 16-bit modes (I;16, I;16B, ...) map their full range 0..65535
    onto 0..255. Modes without a fixed range, 32-bit integers (I) and floats (F), take the narrowest
    of [0, 1] (floats only), [0, 255] and [0, 65535] that holds every pixel, else the image's own
    min..max. No value is ever clipped; NaN or infinite pixels are refused.
    """
    mode = image.mode
    if mode in EIGHT_BIT_MODES:
        return image.convert("RGB")
    if not (mode.startswith("I;16") or mode in _OPEN_RANGES):
        raise ImageReadError(
            source, f"image mode {mode!r} is not supported", "Save it as 8- or 16-bit grayscale or RGB."
        )
    values = np.asarray(image).astype(np.float64)
    if not np.isfinite(values).all():
        raise ImageReadError(source, "has NaN or infinite pixel values", "Replace them with finite values.")
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    ranges = (65535.0,) if mode.startswith("I;16") else _OPEN_RANGES[mode]
    top = next((r for r in ranges if lo >= 0 and hi <= r), None)
    low, span = (0.0, top) if top is not None else (lo, max(hi - lo, 1e-12))
    gray = np.rint((values - low) / span * 255.0).astype(np.uint8)
    return Image.fromarray(gray, "L").convert("RGB")


def open_image(
    source: str | Path | BinaryIO | Image.Image,
    max_pixels: int = MAX_IMAGE_PIXELS,
    draft_size: DraftSize | None = None,
    alpha: bool = False,
) -> Image.Image:
    """The project's one way to open an image: a file (path or open binary file, or a PIL image) → fully
    decoded 8-bit RGB.

    Refuses, with an `ImageReadError` naming the file: missing files, non-images, truncated files,
    images of more than `max_pixels` pixels (checked from the header, before decoding), and modes
    that cannot be scaled to 8 bit (see `to_rgb`).

    `draft_size` lets a JPEG decode at 1/2, 1/4 or 1/8 scale in the DCT (much faster) while staying at
    least that large: an int is the least shorter side (what a following `Resize(int)` needs), a pair the
    least (width, height). Other formats ignore it. A resize after it then differs from one after a full
    decode by the two downscaling filters (bounded in tests/test_perf_inputs.py).

    `alpha` gives 8-bit RGBA instead, keeping the image's transparency (an image without any is opaque):
    what a painted mask layer needs."""
    convert = _to_rgba if alpha else to_rgb
    if isinstance(source, Image.Image):
        _check_pixels("image", source.size, max_pixels)
        return convert(source)
    name = str(source) if isinstance(source, (str, Path)) else "image"
    try:
        with Image.open(source) as img:
            _check_pixels(name, img.size, max_pixels)
            if draft_size is not None and img.format == "JPEG":
                (w, h), s = img.size, draft_size
                least = s if isinstance(s, tuple) else (w * s // min(w, h), h * s // min(w, h))
                img.draft("RGB", least)  # the least (width, height) PIL may decode to
            img.load()
            return convert(img, name)
    except ImageReadError:
        raise
    except FileNotFoundError as e:
        raise ImageReadError(name, "no such file", "Check the path.") from e
    except UnidentifiedImageError as e:
        raise ImageReadError(
            name, "not an image file", f"Give an image ({', '.join(IMAGE_EXTENSIONS)})."
        ) from e
    except Image.DecompressionBombError as e:  # PIL's own limit, when set below `max_pixels`
        raise ImageReadError(
            name,
            f"too many pixels: more than the limit of {min(max_pixels, 2 * (Image.MAX_IMAGE_PIXELS or 0)):,} "
            "(a decompression bomb or a huge scan)",
            "Downscale the image.",
        ) from e
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt data, unreadable file
        raise ImageReadError(name, f"cannot be decoded ({type(e).__name__}: {e})") from e


def _to_rgba(image: Image.Image, source: str = "image") -> Image.Image:
    """`to_rgb` with the image's transparency kept as an alpha channel."""
    if image.mode in EIGHT_BIT_MODES and ("A" in image.getbands() or "transparency" in image.info):
        return image.convert("RGBA")
    return to_rgb(image, source).convert("RGBA")


def _check_pixels(source: str, size: tuple[int, int], max_pixels: int) -> None:
    if size[0] * size[1] > max_pixels:
        raise ImageReadError(
            source,
            f"too many pixels: {size[0]}×{size[1]} = {size[0] * size[1]:,}, more than the limit of "
            f"{max_pixels:,} (a decompression bomb or a huge scan)",
            "Downscale the image.",
        )


__all__ = [
    "EIGHT_BIT_MODES",
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "DraftSize",
    "ImageReadError",
    "open_image",
    "to_rgb",
]
