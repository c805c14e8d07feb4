"""The concept index's input path: image collections → pixels for the encoder and the embedder, by batch.

It is extraction's input path (`mmsae.inputs.input_batches`): DataLoader workers read and preprocess the
images (`IndexConfig.num_workers`), with its decode modes (`IndexConfig.decode`: "pil", "draft" or
"device") and the uint8 hand-off to the device. An embedder with the encoder's preprocessing on the same
device reuses the encoder's pixels; another one gets its own input path over the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mmsae.datasets.images import ImageList
from mmsae.encoders.base import Encoder
from mmsae.inputs import InputBatch, input_batches, probe_image


@dataclass
class IndexBatch:
    indices: list[int]  # positions in the collection of the readable images, in order
    pixels: Tensor | None  # for the encoder, on its device
    embed_pixels: Tensor | None  # for the embedder, on its device
    skipped: list[dict[str, Any]] = field(default_factory=list)  # {index, source, reason} per unreadable


def same_pixels(encoder: Encoder, embedder: Encoder) -> bool:
    """Whether the embedder reads the encoder's pixels: same preprocessing (steps and their output on a
    test pattern) on the same device."""
    if embedder is encoder:
        return True
    if encoder.device != embedder.device or repr(encoder.image_pipeline) != repr(embedder.image_pipeline):
        return False
    probe = probe_image()
    return torch.equal(encoder.transform(probe), embedder.transform(probe))


def index_batches(
    encoder: Encoder,
    embedder: Encoder,
    images: ImageList,
    batch_size: int,
    num_workers: int = 0,
    decode: str = "pil",
) -> Iterator[IndexBatch]:
    """Pixels of `images` for the encoder and the embedder, `batch_size` images at a time."""
    batches = [list(range(s, min(s + batch_size, len(images)))) for s in range(0, len(images), batch_size)]
    own = input_batches(encoder, images, batches, "image", num_workers, decode)
    if same_pixels(encoder, embedder):
        for b in own:
            yield IndexBatch(b.indices, _pixels(b), _pixels(b), b.skipped)
        return
    other = input_batches(embedder, images, batches, "image", num_workers, decode)
    for a, b in zip(own, other):
        yield _aligned(a, b)


def _pixels(batch: InputBatch) -> Tensor | None:
    if batch.inputs is not None and not isinstance(batch.inputs, Tensor):
        raise TypeError(f"Expected image pixels, got {type(batch.inputs).__name__}.")
    return batch.inputs


def _aligned(a: InputBatch, b: InputBatch) -> IndexBatch:
    """One batch read twice: the images both reads could decode (a file may fail in one decode mode only)."""
    both = sorted(set(a.indices) & set(b.indices))
    skipped = {err["index"]: err for err in [*a.skipped, *b.skipped]}
    if not both:
        return IndexBatch([], None, None, list(skipped.values()))
    pixels, embed_pixels = _rows(_pixels(a), a.indices, both), _rows(_pixels(b), b.indices, both)
    return IndexBatch(both, pixels, embed_pixels, list(skipped.values()))


def _rows(pixels: Tensor | None, indices: Sequence[int], keep: Sequence[int]) -> Tensor | None:
    """The rows of `pixels` (one per index) of the indices in `keep`."""
    if pixels is None or len(keep) == len(indices):
        return pixels
    where = {i: r for r, i in enumerate(indices)}
    return pixels[[where[i] for i in keep]]
