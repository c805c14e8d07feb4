"""A Gradio image editor (the painted steering mask) whose every image is opened by the project's image path.

gr.ImageEditor decodes its images with PIL before the handler runs, so a non-image, a truncated file or a
decompression bomb failed there with Gradio's generic error, and a 16-bit image was clipped to white. The
browser also sends the editor's images as blobs after every stroke (`accept_blobs`), kept until an event
uses them, with no bound on their number, size or layer index. `mask_editor` replaces both on the
instance: images arrive as bytes or uploaded files, are bounded in bytes and pixels, are opened by
`open_image`, and any refusal names the field (background, layer n, composite) and the reason.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from fastapi import HTTPException
from gradio.components.base import server
from gradio.data_classes import FileData

from mmsae.apps.common import AppSettings, InputError, read_error, upload_path, upload_roots
from mmsae.datasets.images import ImageReadError, open_image

MAX_LAYERS = 8
MAX_MASK_PIXELS = 2048 * 2048
"""Per image: a mask is interpolated to the feature grid, so more detail is never used."""
PENDING_MB = 128
"""Blobs waiting for an event, all users together; the oldest edits are dropped beyond this."""
KINDS = ("background", "layer", "composite")


@dataclass
class PendingEdit:
    """The images of one editor state uploaded by the browser (one per stroke), until an event reads them."""

    background: bytes | None = None
    layers: dict[int, bytes] = field(default_factory=dict)
    composite: bytes | None = None

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in (self.background, self.composite, *self.layers.values()) if b)


class PendingEdits:
    """The browser's blob uploads by edit id, thread-safe, bounded in total bytes (oldest dropped)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._edits: OrderedDict[str, PendingEdit] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, edit_id: str, kind: str, index: int | None, data: bytes) -> None:
        with self._lock:
            edit = self._edits.setdefault(edit_id, PendingEdit())
            self._edits.move_to_end(edit_id)
            if kind == "layer":
                edit.layers[index or 0] = data
            else:
                setattr(edit, kind, data)
            total = sum(e.nbytes for e in self._edits.values())
            while total > self.max_bytes and len(self._edits) > 1:
                _, dropped = self._edits.popitem(last=False)
                total -= dropped.nbytes

    def pop(self, edit_id: str) -> PendingEdit | None:
        with self._lock:
            return self._edits.pop(edit_id, None)


@dataclass
class EditorReader:
    """Opens the editor's images as RGBA arrays, bounded, with messages naming the field."""

    field: str
    roots: list[Path]
    max_mb: int
    max_pixels: int

    def image(self, source: FileData | bytes | None, part: str) -> np.ndarray | None:
        if source is None:
            return None
        name = f"{self.field}'s {part}"
        try:
            if isinstance(source, bytes):
                if len(source) > self.max_mb * 2**20:
                    raise InputError(f"larger than {self.max_mb} MB.")
                try:
                    return np.asarray(open_image(io.BytesIO(source), self.max_pixels, alpha=True))
                except ImageReadError as e:  # a blob has no file name: the field names it
                    raise InputError(f"{e.reason}.") from e
            path = upload_path(source.path, self.roots, self.max_mb)
            try:
                return np.asarray(open_image(path, self.max_pixels, alpha=True))
            except ImageReadError as e:
                raise read_error(e) from e
        except FileNotFoundError as e:  # its message holds the server-side path
            raise gr.Error(f"{name}: the uploaded file is gone: upload it again.") from e
        except InputError as e:
            raise gr.Error(f"{name}: {e}") from e

    def value(self, background: Any, layers: list[Any], composite: Any) -> dict[str, Any]:
        """The handler's value, as gr.ImageEditor(type="numpy") gives it; layers must share one size."""
        if len(layers) > MAX_LAYERS:
            raise gr.Error(
                f"{self.field} has {len(layers)} layers; at most {MAX_LAYERS} layers are accepted."
            )
        arrays = [self.image(layer, f"layer {i + 1}") for i, layer in enumerate(layers)]
        shapes = [a.shape[:2] for a in arrays if a is not None]
        for i, shape in enumerate(shapes[1:], start=2):
            if shape != shapes[0]:
                raise gr.Error(
                    f"{self.field}'s layer {i} is {shape[1]}×{shape[0]} but layer 1 is "
                    f"{shapes[0][1]}×{shapes[0][0]}: all layers must have one size."
                )
        return {
            "background": self.image(background, "background"),
            "layers": [a for a in arrays if a is not None],
            "composite": self.image(composite, "composite"),
        }


def mask_editor(
    settings: AppSettings, field: str = "The mask", max_pixels: int = MAX_MASK_PIXELS, **kwargs: Any
) -> gr.ImageEditor:
    """A gr.ImageEditor(type="numpy") whose images are read by `EditorReader`; `field` names it in messages.

    The instance's methods are replaced rather than subclassing: Gradio writes a .pyi stub beside the
    source file of every Component subclass."""
    editor = gr.ImageEditor(**kwargs)
    if editor.type != "numpy" or editor.image_mode != "RGBA":
        raise ValueError("mask_editor gives RGBA numpy arrays: leave type and image_mode unset.")
    reader = EditorReader(field, upload_roots(settings), settings.max_upload_mb, max_pixels)
    pending = PendingEdits(PENDING_MB * 2**20)

    def preprocess(payload: Any) -> dict[str, Any] | None:
        if payload is None:
            return None
        if payload.id is None:
            return reader.value(payload.background, list(payload.layers), payload.composite)
        edit = pending.pop(payload.id)
        if edit is None:
            raise gr.Error(f"{field}'s upload has expired (too many edits were pending): paint it again.")
        layers = [edit.layers[i] for i in sorted(edit.layers)]
        return reader.value(edit.background, layers, edit.composite)

    @server
    def accept_blobs(data: Any) -> None:
        """One image of an edit, as the browser posts it (multipart: id, type, index and one file)."""
        form, files = getattr(data, "data", None), getattr(data, "files", None)
        if not isinstance(form, dict) or not isinstance(files, list) or len(files) != 1:
            raise HTTPException(400, "Send one image file per request as multipart form data.")
        kind, edit_id, blob = form.get("type"), str(form.get("id", "")), files[0][1]
        if kind not in KINDS or not 0 < len(edit_id) <= 64:
            raise HTTPException(400, f"The type must be one of {KINDS}, with an id of 1 to 64 characters.")
        index = None
        if kind == "layer":
            index = str(form.get("index", ""))
            if not index.isdigit() or int(index) >= MAX_LAYERS:
                raise HTTPException(
                    400, f"{field} accepts layers 0…{MAX_LAYERS - 1}, not layer {index[:20]!r}."
                )
        if len(blob) > settings.max_upload_mb * 2**20:
            raise HTTPException(413, f"{field}'s {kind} is larger than {settings.max_upload_mb} MB.")
        pending.put(edit_id, kind, None if index is None else int(index), blob)

    editor.preprocess = preprocess  # type: ignore[method-assign]
    editor.accept_blobs = accept_blobs  # type: ignore[method-assign]
    return editor


__all__ = ["MAX_LAYERS", "MAX_MASK_PIXELS", "EditorReader", "PendingEdits", "mask_editor"]
