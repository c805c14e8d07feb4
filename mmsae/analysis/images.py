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
from mmsae.sae import SAE, SparseCodes

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

    `acts.meta['example_id']` must be relative to the batch (0..n_examples−1). Pooling counts every
    token, with 0 where a feature is off: the max of an example's codes is the largest (signed codes:
    negative only if the feature is on, negative, at every token), the mean divides by its tokens.
    TopK-style codes are pooled from their N·k (token, feature) pairs, never as a dense [N, n] tensor.
    """
    if pool not in ("max", "mean"):
        raise ValueError(f"Unknown pooling {pool!r}; use 'max' or 'mean'.")
    device = sae.W_dec.device
    codes = sae.encode(acts.acts_ND.to(device=device, dtype=sae.W_dec.dtype))
    ids_N = acts.meta["example_id"].to(device)
    tokens_E = torch.zeros(n_examples, device=device).index_add_(
        0, ids_N, torch.ones(len(ids_N), device=device)
    )
    if not isinstance(codes, SparseCodes):
        return _pool_dense(codes.float(), ids_N, tokens_E, pool)
    vals_P = codes.values.float().flatten()
    # Flat (example, feature) cell of every pair: fixed-size scatters, no wait for the device.
    cell_P = (ids_N[:, None] * sae.n_features + codes.indices).flatten()
    out_En = torch.zeros(n_examples, sae.n_features, device=device)
    if pool == "mean":
        return out_En.view(-1).index_add_(0, cell_P, vals_P).view_as(out_En) / tokens_E.clamp_min(1)[:, None]
    best_En = torch.full_like(out_En, -torch.inf).view(-1).scatter_reduce_(0, cell_P, vals_P, "amax")
    on_En = torch.zeros_like(out_En).view(-1).index_add_(0, cell_P, torch.ones_like(vals_P))
    best_En, on_En = best_En.view_as(out_En), on_En.view_as(out_En)
    # A feature off at some token of the example pools with that token's 0.
    everywhere = (on_En == tokens_E[:, None]) & (tokens_E[:, None] > 0)
    return torch.where(everywhere, best_En, best_En.clamp_min(0))


def _pool_dense(codes_Nn: Tensor, ids_N: Tensor, tokens_E: Tensor, pool: str) -> Tensor:
    out_En = codes_Nn.new_zeros(len(tokens_E), codes_Nn.shape[1])
    if pool == "max":
        index = ids_N[:, None].expand_as(codes_Nn)
        return out_En.scatter_reduce_(0, index, codes_Nn, "amax", include_self=False)
    return out_En.index_add_(0, ids_N, codes_Nn) / tokens_E.clamp_min(1)[:, None]


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
