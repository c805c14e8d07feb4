"""Image collections → encoder inputs, SAE codes and embeddings, in bounded-size batches.

Files are read by the data sets' `open_image`, the project's one way to open an image.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from mmsae.datasets.images import IMAGE_EXTENSIONS, open_image
from mmsae.encoders.base import Encoder, TokenActs, TokenMode
from mmsae.encoders.capabilities import ImageEmbedder, require
from mmsae.sae import SAE, as_dense

ImageLike = str | os.PathLike | Image.Image


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under `folder` (recursive, sorted so that ids are reproducible)."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"Image folder {root} does not exist.")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def batched(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def stack_pixels(encoder: Encoder, images: Iterable[Image.Image]) -> Tensor:
    return torch.stack([encoder.transform(im) for im in images]).to(encoder.device)


def token_acts(
    encoder: Encoder, images: Sequence[ImageLike], hook: str, tokens: TokenMode = "all", batch_size: int = 32
) -> Iterator[TokenActs]:
    """Activations of `hook` for a collection, one TokenActs per batch, example ids = collection index."""
    for start in range(0, len(images), batch_size):
        pixels = stack_pixels(encoder, (open_image(p) for p in images[start : start + batch_size]))
        yield encoder.activations(pixels, [hook], tokens=tokens, example_offset=start)[hook]


@torch.no_grad()
def pooled_codes(sae: SAE, acts: TokenActs, n_examples: int, pool: str = "max") -> Tensor:
    """Per-example SAE codes [n_examples, n], max- or mean-pooled over each example's tokens.

    `acts.meta['example_id']` must be relative to the batch (0..n_examples−1).
    """
    if pool not in ("max", "mean"):
        raise ValueError(f"Unknown pooling {pool!r}; use 'max' or 'mean'.")
    device = sae.W_dec.device
    codes_Nn = as_dense(sae.encode(acts.acts_ND.to(device=device, dtype=sae.W_dec.dtype))).float()
    ids = acts.meta["example_id"].to(device)
    out = torch.zeros(n_examples, sae.n_features, device=device)
    index = ids[:, None].expand_as(codes_Nn)
    if pool == "max":
        return out.scatter_reduce_(0, index, codes_Nn, "amax", include_self=False)
    counts = torch.bincount(ids, minlength=n_examples).clamp_min(1)
    return out.index_add_(0, ids, codes_Nn) / counts[:, None]


def require_image_embedder(embedder: Encoder) -> ImageEmbedder:
    return require(
        embedder,
        ImageEmbedder,
        what="Image embeddings",
        hint="Pass a CLIP encoder as the embedder, e.g. embedder=get_encoder('clip:ViT-B-32/openai').",
    )


def embed_images(embedder: Encoder, pixels_BCHW: Tensor) -> Tensor:
    """Unit image embeddings [B, E] from an `ImageEmbedder` (a CLIP encoder)."""
    return require_image_embedder(embedder).encode_image(pixels_BCHW, normalize=True).float()
