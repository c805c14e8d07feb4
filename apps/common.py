"""What every mmsae app shares: safe image input, a model lock, and launching on localhost only."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from gradio.utils import get_upload_folder
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
MAX_UPLOAD_MB = 10
MAX_PIXELS = 40_000_000  # well above any photo, far below a decompression bomb

# PIL raises DecompressionBombError above 2× this; set it explicitly rather than trusting the default.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class InputError(ValueError):
    """Bad user input: shown to the user as is (gr.Error), never a stack trace."""


@dataclass
class AppSettings:
    host: str = "127.0.0.1"
    port: int | None = None
    data_dirs: list[Path] = field(default_factory=list)
    """The only directories whose files the app may open or serve."""
    max_upload_mb: int = MAX_UPLOAD_MB

    def launch_kwargs(self) -> dict[str, Any]:
        return {
            "server_name": self.host,
            "server_port": self.port,
            "max_file_size": f"{self.max_upload_mb}mb",
            "allowed_paths": [str(d) for d in self.data_dirs],
        }


def inside(path: str | Path, roots: list[Path]) -> Path:
    """Resolve `path` and refuse it unless it lies inside one of `roots` (no '..' or symlink escapes)."""
    resolved = Path(path).resolve()
    for root in roots:
        if resolved.is_relative_to(root.resolve()):
            return resolved
    raise InputError(f"Refusing to open {path}: it is outside the app's data directories.")


def load_image(value: Any, roots: list[Path], max_mb: int = MAX_UPLOAD_MB) -> Image.Image:
    """An RGB image from a Gradio value (PIL image, numpy array or file path inside `roots`)."""
    if value is None:
        raise InputError("No image given: upload one or pick one from the gallery.")
    if isinstance(value, Image.Image):
        img = value
    elif isinstance(value, np.ndarray):
        if value.ndim not in (2, 3) or value.size > MAX_PIXELS * 4:
            raise InputError(f"Unsupported image array of shape {value.shape}.")
        img = Image.fromarray(value.astype(np.uint8))
    else:
        path = inside(value, roots)
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise InputError(f"{path.name}: not an image file (allowed: {', '.join(IMAGE_SUFFIXES)}).")
        if path.stat().st_size > max_mb * 2**20:
            raise InputError(f"{path.name} is larger than {max_mb} MB.")
        try:
            with Image.open(path) as im:
                im.load()
                img = im.copy()
        except Image.DecompressionBombError as e:
            raise InputError(f"{path.name} has too many pixels (limit {MAX_PIXELS:,}).") from e
        except OSError as e:
            raise InputError(f"{path.name} could not be read as an image ({e}).") from e
    if img.width * img.height > MAX_PIXELS:
        raise InputError(f"Image has {img.width * img.height:,} pixels (limit {MAX_PIXELS:,}).")
    return img.convert("RGB")


# One forward at a time on a shared model: Gradio runs handlers in worker threads.
MODEL_LOCK = threading.Lock()


def upload_roots(settings: AppSettings) -> list[Path]:
    """Where browser uploads may be read from: the data directories and Gradio's own upload folder."""
    return [*settings.data_dirs, Path(get_upload_folder())]


def image_dirs(paths: list[str]) -> list[Path]:
    """The distinct folders holding `paths`, outermost only (a common prefix could widen to '/')."""
    dirs = sorted({Path(p).resolve().parent for p in paths}, key=lambda d: len(d.parts))
    kept: list[Path] = []
    for d in dirs:
        if not any(d.is_relative_to(k) for k in kept):
            kept.append(d)
    return kept


def thumbnail(image: Image.Image, size: int = 256) -> Image.Image:
    """A copy no larger than size×size: galleries ship thumbnails, never originals."""
    small = image.copy()
    small.thumbnail((size, size))
    return small


def for_display(image: Image.Image, min_side: int = 256) -> Image.Image:
    """Tiny generations (test models sample 32×32) enlarged with nearest pixels, so they are visible."""
    scale = -(-min_side // min(image.size))
    return image if scale <= 1 else image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a handler for Gradio: bad input becomes a gr.Error message, not a stack trace.

    functools.wraps keeps the signature, so Gradio still sees a `progress=gr.Progress()` parameter."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ValueError, KeyError, IndexError, FileNotFoundError) as e:  # InputError is a ValueError
            raise gr.Error(str(e).strip("'\"")) from e

    return wrapper


@dataclass
class FeatureCatalog:
    """Feature names of an SAE and search over them: by id, by name substring, or semantically."""

    names: list[str]
    """One name per latent ('' when unnamed)."""
    semantic: Callable[[str, int], list[int]] | None = None
    """Optional text → nearest features (e.g. the concept index's CLIP-space search)."""

    @classmethod
    def unnamed(cls, n_latents: int) -> FeatureCatalog:
        return cls([""] * n_latents)

    @classmethod
    def from_index(cls, index: Any) -> FeatureCatalog:
        """Names and CLIP-space search of a `ConceptIndex`."""
        names = [cands[0].name if cands else "" for cands in index.names]
        return cls(names, lambda text, k: [hit.feature for hit in index.search_features(text, k)])

    def __len__(self) -> int:
        return len(self.names)

    def label(self, feature: int) -> str:
        name = self.names[feature]
        return f"#{feature} {name}" if name else f"#{feature}"

    def choices(self, features: list[int]) -> list[tuple[str, str]]:
        """Dropdown choices (label, value) for `features`."""
        return [(self.label(f), str(f)) for f in features]

    def find(self, query: str, k: int = 20) -> list[int]:
        """Features matching `query`: an id, names containing it, then semantic neighbours."""
        query = query.strip()
        if not query:
            return list(range(min(k, len(self))))
        if query.lstrip("#").isdigit():
            return [self.parse(query)]
        low = query.lower()
        found = [i for i, name in enumerate(self.names) if low in name.lower()][:k]
        if self.semantic is not None and len(found) < k:
            found += [f for f in self.semantic(query, k) if f not in found][: k - len(found)]
        return found

    def parse(self, value: Any) -> int:
        """A feature id from a dropdown value, a number or a label like '#12 cat'."""
        text = str(value).strip().lstrip("#").split(" ", 1)[0]
        try:
            feature = int(float(text))
        except ValueError:
            raise InputError(f"{value!r} is not a feature: give its number, e.g. 12 or '#12'.") from None
        if not 0 <= feature < len(self):
            raise InputError(f"Feature {feature} does not exist: this SAE has features 0..{len(self) - 1}.")
        return feature

    def resolve(self, text: str) -> list[int]:
        """Comma-separated ids or concept words → features (a word takes its best match)."""
        features = []
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            matches = self.find(part, k=1)
            if not matches:
                raise InputError(f"No feature matches {part!r}: type a feature number or another word.")
            features.append(matches[0])
        return features


# Default of a handler's `progress` parameter: Gradio then shows the tqdm bars of the work it runs.
TRACK_TQDM = gr.Progress(track_tqdm=True)


def launch(demo: Any, settings: AppSettings, block: bool = True) -> tuple[Any, str, Any]:
    """Serve `demo` with the settings' host/port/limits; 127.0.0.1 unless a host was given explicitly."""
    return demo.queue().launch(**settings.launch_kwargs(), prevent_thread_lock=not block)
