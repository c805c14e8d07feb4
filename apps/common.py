"""What every mmsae app shares: safe image input, bounded user input, a model lock, localhost serving.

Every user-controlled size is bounded (`Limits`): text lengths, label and feature counts, result counts,
steps, seeds; a value past its bound is refused with a message naming the field and the bound, so no
single request can hold the shared model for long. Uploads arrive as file paths (`uploaded_image`; the
mask editor's images as files or bytes, `mmsae.apps.editor`) and are opened through the project's one
image path (`mmsae.datasets.images.open_image`).
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import io
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from gradio.utils import get_upload_folder
from PIL import Image

from mmsae.datasets.images import ImageReadError, open_image, to_rgb

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_UPLOAD_MB = 10
MAX_PIXELS = 40_000_000  # well above any photo, far below a decompression bomb
MAX_MESSAGE_CHARS = 400
FILE_LIFETIME_S = 3600
"""Uploads and result images are deleted this long after they were written (checked every tenth of it),
so a server that runs for weeks does not fill its disk with them."""
ECHO_CHARS = 60

# Uploads are opened by `open_image` with MAX_PIXELS, checked from the header before decoding; this also
# caps any decode that bypassed it: PIL refuses more than 2 × this.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class InputError(ValueError):
    """Bad user input: shown to the user as is (gr.Error), never a stack trace."""


@dataclass(frozen=True)
class Limits:
    """Bounds of every user-controlled size; each keeps the slowest request to about a second on CPU
    with the tiny models (and a few on real ones), so one user cannot hold the shared model."""

    text_chars: int = 500
    """Text queries and prompts (CLIP reads 77 tokens; the rest would only cost time)."""
    word_chars: int = 60
    """One label, concept or feature search word."""
    labels: int = 32
    """Zero-shot labels per steering request (one CLIP text batch)."""
    filter_features: int = 16
    """Features in a search filter."""
    results: int = 64
    """Images or features per result gallery or table."""
    steps: int = 100
    """Diffusion sampling steps."""
    new_tokens: int = 128
    """LLaVA answer length."""
    seed: int = 2**32 - 1


@dataclass
class AppSettings:
    host: str = "127.0.0.1"
    port: int | None = None
    data_dirs: list[Path] = field(default_factory=list)
    """The only directories whose files the app may open or serve."""
    max_upload_mb: int = MAX_UPLOAD_MB
    limits: Limits = field(default_factory=Limits)
    random_weights: bool = False
    """The model runs with random weights (`--random-init`): the apps show a warning banner."""

    @staticmethod
    def blocks_kwargs() -> dict[str, Any]:
        """`gr.Blocks` arguments: Gradio's copies of uploads and results expire after FILE_LIFETIME_S."""
        return {"delete_cache": (FILE_LIFETIME_S // 10, FILE_LIFETIME_S)}

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


def open_app_image(value: Any, roots: list[Path], max_mb: int = MAX_UPLOAD_MB) -> Image.Image:
    """An RGB image from a Gradio value (PIL image, numpy array or file path inside `roots`)."""
    if value is None:
        raise InputError("No image given: upload one or pick one from the gallery.")
    try:
        if isinstance(value, Image.Image):
            return open_image(value, MAX_PIXELS)
        if isinstance(value, np.ndarray):
            if value.ndim not in (2, 3) or value.size > MAX_PIXELS * 4:
                raise InputError(f"Unsupported image array of shape {value.shape}.")
            # 16-bit and float arrays keep their values: to_rgb scales them, a cast to uint8 would wrap
            array = value.astype(np.float32) if value.dtype == np.float64 else value
            return to_rgb(Image.fromarray(array))
        return open_image(upload_path(value, roots, max_mb), MAX_PIXELS)
    except ImageReadError as e:
        raise read_error(e) from e
    except (TypeError, ValueError) as e:  # an array PIL cannot represent
        if isinstance(e, InputError):
            raise
        raise InputError(f"Unsupported image array ({e}).") from e


def upload_path(value: str | Path, roots: list[Path], max_mb: int = MAX_UPLOAD_MB) -> Path:
    """The image file `value`, refused unless it lies inside `roots`, has an image suffix and ≤ max_mb."""
    path = inside(value, roots)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise InputError(f"{path.name}: not an image file (allowed: {', '.join(IMAGE_SUFFIXES)}).")
    if path.stat().st_size > max_mb * 2**20:
        raise InputError(f"{path.name} is larger than {max_mb} MB.")
    return path


def read_error(e: ImageReadError) -> InputError:
    """The user's message for an unreadable image: its reason, after the file's name only (the
    server-side path in `e`'s message is not the user's business)."""
    name = Path(e.source).name if e.source != "image" else "The image"
    return InputError(f"{name}: {e.reason}.")


def uploaded_image(**kwargs: Any) -> gr.Image:
    """A gr.Image whose upload reaches the handler as the uploaded file's path, unopened.

    gr.Image opens every upload with PIL before the handler runs, so a non-image or a decompression
    bomb failed there with Gradio's generic error; here the handler's `open_app_image` gives the reason.
    The instance's `preprocess` is replaced rather than subclassing gr.Image: Gradio writes a .pyi
    stub beside the source file of every Component subclass."""
    image = gr.Image(type="filepath", **kwargs)

    def path_of(payload: Any) -> str | None:
        if payload is None:
            return None
        if payload.path is None:  # a data URL: gr.Image would decode it with PIL right here
            raise gr.Error("Send the image as a file upload.")
        return str(payload.path)

    image.preprocess = path_of  # type: ignore[method-assign]
    return image


def shorten(text: Any, n: int = ECHO_CHARS) -> str:
    """`text` quoted for a message, cut to about n characters: messages never echo a huge input."""
    text = str(text)
    return repr(text) if len(text) <= n else repr(text[:n]) + f"… ({len(text):,} characters)"


def check_text(value: Any, field: str, max_chars: int, required: str | None = None) -> str:
    """`value` stripped; refused when longer than max_chars (or empty when `required` says how to fill it)."""
    text = "" if value is None else str(value)
    if len(text) > max_chars:
        raise InputError(f"{field} has {len(text):,} characters; the limit is {max_chars:,}: shorten it.")
    text = text.strip()
    if required is not None and not text:
        raise InputError(required)
    return text


def check_number(value: Any, field: str, low: float, high: float, integer: bool = False) -> Any:
    """`value` as a finite number (int when `integer`) within [low, high], else a message naming `field`."""
    shown = shorten(value) if isinstance(value, str) else shorten(value).strip("'")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"{field} must be a number, got {shown}.") from None
    if not math.isfinite(number) or not low <= number <= high:
        bounds = f"{int(low)}…{int(high)}" if integer else f"{low:g}…{high:g}"
        raise InputError(f"{field} must lie within {bounds}, got {shown}.")
    if integer:
        if number != int(number):
            raise InputError(f"{field} must be a whole number, got {shown}.")
        return int(number)
    return number


def words(text: Any, field: str, max_words: int, max_chars: int) -> list[str]:
    """Comma-separated entries of `text`, each bounded, at most `max_words` of them."""
    raw = check_text(text, field, max_words * (max_chars + 2))
    parts = [w.strip() for w in raw.split(",") if w.strip()]
    if len(parts) > max_words:
        raise InputError(f"{field} has {len(parts)} entries; the limit is {max_words}: remove some.")
    long = next((w for w in parts if len(w) > max_chars), None)
    if long is not None:
        raise InputError(f"{field}: {shorten(long)} is longer than {max_chars} characters.")
    return parts


# One forward at a time on a shared model: Gradio runs handlers in worker threads, and a steering edit
# hooks the model itself, so a concurrent forward would be steered too. Decoding, validation and
# rendering happen outside it.
MODEL_LOCK = threading.Lock()


def banner(settings: AppSettings) -> None:
    """A visible warning when the model runs with random weights (inside a gr.Blocks context)."""
    if settings.random_weights:
        gr.Markdown(
            "**⚠ Random weights (`--random-init`)**: the model was not loaded from trained weights, so "
            "its outputs, feature names and search results are meaningless; this shows the interface only.",
            elem_id="random-weights-banner",
        )


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
            # str(KeyError) is the repr of its key; its message is args[0]. Quotes inside are kept.
            message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
            if len(message) > MAX_MESSAGE_CHARS:
                message = message[:MAX_MESSAGE_CHARS] + f"… ({len(message):,} characters)"
            raise gr.Error(message) from e

    return wrapper


_output_dir: Path | None = None
_next_prune = 0.0
_files_lock = threading.Lock()


def image_file(image: Image.Image) -> str:
    """`image` as a PNG file named by its content, written atomically, in this process's output folder.

    Handlers' images reach Gradio as such files: Gradio would write a returned PIL image in place, under a
    name of its own content hash, so two users receiving the same image at once could be served a file
    that is being rewritten (a truncated response). A file path is copied atomically instead. Gradio
    serves its own copy, so files older than FILE_LIFETIME_S are removed as new ones are written."""
    global _output_dir
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    with _files_lock:  # a prune in another thread must not remove a file this call hands out
        if _output_dir is None:
            _output_dir = Path(tempfile.mkdtemp(prefix="mmsae-app-"))
            atexit.register(shutil.rmtree, _output_dir, ignore_errors=True)
        _prune_outputs(_output_dir)
        path = _output_dir / f"{hashlib.sha256(data).hexdigest()[:32]}.png"
        try:
            os.utime(path)  # written before: it lives another FILE_LIFETIME_S from now
        except FileNotFoundError:
            fd, staging = tempfile.mkstemp(dir=_output_dir, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(staging, path)
    return str(path)


def _prune_outputs(folder: Path) -> None:
    """Remove the files in `folder` older than FILE_LIFETIME_S, at most once per tenth of it."""
    global _next_prune
    now = time.time()
    if now < _next_prune:
        return
    _next_prune = now + FILE_LIFETIME_S / 10
    for path in folder.iterdir():
        if path.stat().st_mtime < now - FILE_LIFETIME_S:
            path.unlink()


def as_files(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a handler so the PIL images in its outputs (also inside lists and tuples) become `image_file`s."""

    def convert(value: Any) -> Any:
        if isinstance(value, Image.Image):
            return image_file(value)
        if isinstance(value, (list, tuple)):
            return type(value)(convert(v) for v in value)
        return value

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return convert(fn(*args, **kwargs))

    return wrapper


@dataclass
class FeatureCatalog:
    """Feature names of an SAE and search over them: by id, by name substring, or semantically."""

    names: list[str]
    """One name per feature ('' when unnamed)."""
    semantic: Callable[[str, int], list[int]] | None = None
    """Optional text → nearest features (e.g. the concept index's CLIP-space search)."""

    @classmethod
    def unnamed(cls, n_features: int) -> FeatureCatalog:
        return cls([""] * n_features)

    @classmethod
    def from_index(cls, index: Any) -> FeatureCatalog:
        """Names and CLIP-space search of a `ConceptIndex`."""
        names = [cands[0].name if cands else "" for cands in index.names]

        def semantic(text: str, k: int) -> list[int]:
            with MODEL_LOCK:  # a CLIP text forward: never concurrent with a steering edit on the model
                return [hit.feature for hit in index.search_features(text, k)]

        return cls(names, semantic)

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
        query = check_text(query, "The feature search", Limits.text_chars)
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
            feature = int(float(text[:32]))
        except (ValueError, OverflowError):
            raise InputError(
                f"{shorten(value)} is not a feature: give its number, e.g. 12 or '#12'."
            ) from None
        if not 0 <= feature < len(self):
            raise InputError(f"Feature {feature} does not exist: this SAE has features 0..{len(self) - 1}.")
        return feature

    def resolve(self, text: str, max_features: int = Limits.filter_features) -> list[int]:
        """Comma-separated ids or concept words → features (a word takes its best match)."""
        features = []
        for part in words(text, "The feature list", max_features, Limits.word_chars):
            matches = self.find(part, k=1)
            if not matches:
                raise InputError(
                    f"No feature matches {shorten(part)}: type a feature number or another word."
                )
            features.append(matches[0])
        return features


# Default of a handler's `progress` parameter: Gradio then shows the tqdm bars of the work it runs.
TRACK_TQDM = gr.Progress(track_tqdm=True)


def launch(demo: Any, settings: AppSettings, block: bool = True) -> tuple[Any, str, Any]:
    """Serve `demo` with the settings' host/port/limits; 127.0.0.1 unless a host was given explicitly."""
    return demo.queue().launch(**settings.launch_kwargs(), prevent_thread_lock=not block)
