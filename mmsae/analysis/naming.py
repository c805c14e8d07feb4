"""Concept naming: each feature's direction in CLIP space, compared with CLIP text embeddings of a vocabulary.

Two routes to a feature's CLIP-space direction:
- the SAE reads CLIP's final image embedding (hook 'visual'): its decoder atoms already live there;
- any other hook (inner CLIP layer, timm ViT, UNet): the activation-weighted mean of the CLIP
  embeddings of the feature's top-activating images.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mmsae.analysis.images import ImageLike, batched, embed_images, stack_pixels
from mmsae.analysis.stats import FeatureStats
from mmsae.argorder import encoder_and_sae
from mmsae.datasets.images import open_image
from mmsae.encoders.base import Encoder
from mmsae.encoders.capabilities import ImageEmbedder, TextEmbedder, require
from mmsae.sae import SAE

DEFAULT_VOCAB = Path(__file__).resolve().parent.parent / "data" / "vocab.txt"
FINAL_EMBEDDING_HOOK = "visual"


@dataclass
class NameCandidate:
    name: str
    score: float
    """Cosine between the feature's CLIP-space direction and the text embedding."""


def load_vocabulary(path: str | os.PathLike | None = None) -> list[str]:
    """One concept per line ('#' comments and blank lines ignored, duplicates dropped); default: mmsae's."""
    path = Path(path) if path is not None else DEFAULT_VOCAB
    if not path.is_file():
        raise FileNotFoundError(
            f"Vocabulary file {path} does not exist: give a text file with one concept per line."
        )
    words = [w.strip() for w in path.read_text(encoding="utf-8").splitlines()]
    vocab = list(dict.fromkeys(w for w in words if w and not w.startswith("#")))
    if not vocab:
        raise ValueError(f"Vocabulary file {path} has no concepts: put one concept per line.")
    return vocab


def require_text_tower(clip: Encoder) -> TextEmbedder:
    return require(
        clip,
        TextEmbedder,
        what="Naming and text queries",
        hint="Pass a CLIP encoder, e.g. get_encoder('clip:ViT-B-32/openai').",
    )


@torch.no_grad()
def text_embeddings(
    clip: Encoder, texts: Sequence[str], template: str = "a photo of {}.", batch_size: int = 256
) -> Tensor:
    """Unit CLIP text embeddings [V, E] of `template.format(text)`."""
    text_tower = require_text_tower(clip)
    if not texts:
        raise ValueError("No texts to embed.")
    chunks = [
        text_tower.encode_text([template.format(t) for t in chunk], normalize=True).float().cpu()
        for chunk in batched(list(texts), batch_size)
    ]
    return torch.cat(chunks)


def atom_directions(clip: Encoder, sae: SAE) -> Tensor | None:
    """Unit decoder atoms [n, E] when the SAE sits on `clip`'s final image embedding, else None."""
    clip, sae = encoder_and_sae(clip, sae, "atom_directions")
    embed_dim = clip.embed_dim if isinstance(clip, ImageEmbedder) else None
    on_final = sae.cfg.hook == FINAL_EMBEDDING_HOOK and sae.d_in == embed_dim
    if not on_final or (sae.cfg.encoder is not None and sae.cfg.encoder != clip.id):
        return None
    W = sae.W_dec.detach().float().cpu()
    return W / W.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def image_concept_vectors(values_Kn: Tensor, ids_Kn: Tensor, embeds_NE: Tensor) -> Tensor:
    """Activation-weighted mean of each feature's top images' unit embeddings, normalised, [n, E].

    `ids_Kn` index rows of `embeds_NE` (−1 = empty slot); features without images get a zero row.
    """
    w = torch.where(ids_Kn >= 0, values_Kn.float().clamp_min(0), 0.0)  # [K, n]
    e = embeds_NE.float()[ids_Kn.clamp_min(0)]  # [K, n, E]
    v = (w[..., None] * e).sum(0)
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def rank_names(
    directions_nE: Tensor, text_VE: Tensor, vocab: Sequence[str], top: int = 5
) -> list[list[NameCandidate]]:
    """The `top` vocabulary entries by cosine for each feature; empty for all-zero (dead) directions."""
    if directions_nE.shape[-1] != text_VE.shape[-1]:
        raise ValueError(
            f"Feature directions have E={directions_nE.shape[-1]} but text embeddings E={text_VE.shape[-1]}:"
            " both must come from the same CLIP model."
        )
    sims = directions_nE.float() @ text_VE.float().T
    scores, idx = sims.topk(min(top, len(vocab)), dim=-1)
    live = directions_nE.norm(dim=-1) > 0
    return [
        [NameCandidate(vocab[j], float(s)) for s, j in zip(sc.tolist(), ix.tolist())] if ok else []
        for sc, ix, ok in zip(scores, idx, live.tolist())
    ]


@torch.no_grad()
def name_features(
    clip: Encoder,
    sae: SAE,
    vocab: Sequence[str] | None = None,
    stats: FeatureStats | None = None,
    images: Sequence[ImageLike] | None = None,
    top: int = 5,
    batch_size: int = 32,
) -> list[list[NameCandidate]]:
    """Name candidates for every feature of `sae`.

    SAEs on CLIP's final embedding use their atoms; others need `stats` from a pass over `images`
    (stats example ids index `images`), whose top images are embedded with `clip`.
    """
    clip, sae = encoder_and_sae(clip, sae, "name_features")
    vocab = list(vocab) if vocab is not None else load_vocabulary()
    text_VE = text_embeddings(clip, vocab)
    directions = atom_directions(clip, sae)
    if directions is None:
        if stats is None or images is None:
            raise ValueError(
                f"The SAE reads hook {sae.cfg.hook!r}, not {clip.id}'s final embedding: pass the "
                "FeatureStats of a pass over `images` and the images, to name features by their "
                "top-activating images."
            )
        directions = image_concept_vectors(
            stats.top_values.cpu(),
            stats.top_ids.cpu(),
            _embed_subset(clip, images, stats.top_ids, batch_size),
        )
    return rank_names(directions, text_VE, vocab, top)


def _embed_subset(clip: Encoder, images: Sequence[ImageLike], ids: Tensor, batch_size: int) -> Tensor:
    """Embeddings [N, E] with rows filled only for the images in `ids` (others stay zero)."""
    wanted = np.unique(ids[ids >= 0].cpu().numpy())
    if len(wanted) and wanted.max() >= len(images):
        raise ValueError(
            f"Stats refer to example {wanted.max()} but only {len(images)} images were given: "
            "pass the same collection the stats were computed on."
        )
    out: Tensor | None = None
    for chunk in batched(wanted, batch_size):
        emb = embed_images(clip, stack_pixels(clip, [open_image(images[i]) for i in chunk])).cpu()
        if out is None:
            out = torch.zeros(len(images), emb.shape[-1])
        out[torch.as_tensor(chunk)] = emb
    if out is None:
        out = torch.zeros(len(images), clip.embed_dim if isinstance(clip, ImageEmbedder) else 1)
    return out
