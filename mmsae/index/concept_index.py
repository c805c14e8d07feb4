"""`ConceptIndex`: search an image collection by text, image or SAE feature.

It holds, for every image: a unit CLIP embedding (FAISS, dense search), the SAE's codes pooled
over the image's tokens (sparse, CSR + inverted lists), its path; and for every feature: a
CLIP-space direction and a name. The SAE is saved inside the index; the encoders are not (they
are large): `load` takes them and checks their ids against the ones recorded at build time.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from mmsae import kernels
from mmsae.analysis.heatmap import feature_heatmaps
from mmsae.analysis.images import (
    ImageLike,
    embed_images,
    list_images,
    pooled_codes,
    require_image_embedder,
    stack_pixels,
)
from mmsae.analysis.naming import (
    NameCandidate,
    atom_directions,
    image_concept_vectors,
    load_vocabulary,
    rank_names,
    require_text_tower,
    text_embeddings,
)
from mmsae.argorder import warn_order
from mmsae.checkpoint import load_sae
from mmsae.datasets.images import ImageList, ImageReadError, open_image
from mmsae.encoders.base import Encoder
from mmsae.encoders.capabilities import TextEmbedder
from mmsae.index import classifier as clf
from mmsae.index.ann import build_ann, describe
from mmsae.index.codes import SparseCodeStore
from mmsae.index.config import (
    FeatureContribution,
    FeatureHit,
    ImageHit,
    IndexConfig,
    check_k,
    config_from_dict,
)
from mmsae.index.files import FORMAT_VERSION, read_meta, read_parts, require_index_dir, write_index
from mmsae.index.inputs import index_batches
from mmsae.index.search import allowed_images, nearest_images
from mmsae.sae import SAE


class ConceptIndex:
    """Build with `ConceptIndex.build`, reopen with `ConceptIndex.load`; never constructed directly."""

    def __init__(
        self,
        *,
        sae: SAE,
        meta: dict[str, Any],
        paths: list[str],
        embeddings_NE: np.ndarray,
        codes: SparseCodeStore,
        ann: Any,
        names: list[list[NameCandidate]],
        encoder: Encoder | None = None,
        embedder: Encoder | None = None,
    ):
        self.sae, self.meta, self.paths = sae.eval(), meta, paths
        self.embeddings_NE, self.codes, self.ann = embeddings_NE, codes, ann
        self.names = names
        self.encoder, self.embedder = encoder, embedder
        self.cfg = config_from_dict(meta["config"])
        self._path_to_id = {p: i for i, p in enumerate(paths)}
        self._directions_nE: Tensor | None = None
        self._reference_BTD: Tensor | None = None  # classifier-backed: the base of the logit effects
        self.skipped: list[str] = []

    # ================================================================== building
    @classmethod
    def build(
        cls,
        encoder: Encoder,
        sae: SAE,
        images: Sequence[ImageLike] | str | os.PathLike,
        embedder: Encoder | None = None,
        cfg: IndexConfig | None = None,
        vocab: Sequence[str] | None = None,
    ) -> ConceptIndex:
        """Index `images` (paths, PIL images or a folder) with `sae` reading `encoder`.

        `embedder` (a CLIP encoder; default `encoder` when it is one) gives the search embeddings,
        the text queries and the feature names (`vocab`, default: mmsae's vocabulary). An encoder with a
        classifier head and no CLIP embedder makes a classifier-backed index (see index/classifier.py).
        """
        if isinstance(images, Encoder) and not isinstance(encoder, Encoder):  # (images, sae, encoder)
            warn_order("ConceptIndex.build")
            encoder, images = images, encoder
        cfg = cfg or IndexConfig()
        embedder = embedder or encoder
        if not clf.is_classifier_embedder(embedder):
            require_image_embedder(embedder)
        hook = cfg.hook or sae.cfg.hook or encoder.default_hook
        if sae.cfg.encoder is not None and sae.cfg.encoder != encoder.id:
            raise ValueError(
                f"The SAE was trained on {sae.cfg.encoder!r} activations but the encoder is "
                f"{encoder.id!r}: pass get_encoder({sae.cfg.encoder!r})."
            )
        if hook not in encoder.hook_points():
            raise ValueError(f"Hook {hook!r} is not a hook point of {encoder.id}; set IndexConfig.hook.")
        items = list_images(images) if isinstance(images, (str, os.PathLike)) else list(images)
        if not items:
            raise ValueError(
                "The image collection is empty: give image paths, PIL images or a folder with images."
            )
        meta = {
            "format_version": FORMAT_VERSION,
            "encoder": encoder.id,
            "embedder": embedder.id,
            "hook": hook,
            "d_in": sae.d_in,
            "n_features": sae.n_features,
            "embed_dim": None,
            "config": asdict(cfg),
        }
        index = cls(
            sae=sae,
            meta=meta,
            paths=[],
            embeddings_NE=np.zeros((0, 0), np.float32),
            codes=SparseCodeStore.empty(sae.n_features),
            ann=None,
            names=[],
            encoder=encoder,
            embedder=embedder,
        )
        index._append(items)
        if len(index) == 0:
            raise ValueError(
                f"None of the {len(items)} images could be read (skipped: {index.skipped[:3]} …)."
            )
        index.ann = build_ann(index.embeddings_NE, cfg.ann)
        index.meta["ann"] = describe(index.ann)
        index.name_features(vocab)
        return index

    def add(self, images: Sequence[ImageLike] | str | os.PathLike) -> int:
        """Append images (incremental; the FAISS index keeps its kind). Returns how many were added."""
        items = list_images(images) if isinstance(images, (str, os.PathLike)) else list(images)
        if not items:
            raise ValueError("No images to add.")
        n_before = len(self)
        self._append(items)
        new = self.embeddings_NE[n_before:]
        if len(new):
            self.ann.add(np.ascontiguousarray(new))
            self._directions_nE = None  # image-derived directions change with the collection
        return len(self) - n_before

    @torch.no_grad()
    def _append(self, items: list[ImageLike]) -> None:
        encoder, embedder = self._need_encoder(), self._need_embedder()
        hook, cfg = self.meta["hook"], self.cfg
        chunks: list[Tensor] = []
        first_id, collection = len(self), ImageList(items)
        batches = index_batches(encoder, embedder, collection, cfg.batch_size, cfg.num_workers, cfg.decode)
        n_batches = -(-len(items) // cfg.batch_size)
        with kernels.encoding(cfg.encode):  # weights quantised once per build
            for batch in tqdm(batches, total=n_batches, desc="indexing", unit="batch"):
                self._skip(batch.skipped, collection, first_id)
                if batch.pixels is None or batch.embed_pixels is None:
                    continue
                n = len(batch.indices)
                acts = encoder.activations(batch.pixels, [hook], tokens=cfg.tokens)[hook]
                self.sae.check_input(acts.acts_ND)
                self.codes.append(pooled_codes(self.sae, acts, n, cfg.pool), cfg.max_codes_per_image)
                # Copied to pinned host memory without waiting for the device; waited for once at the end.
                chunks.append(self._embed(batch.embed_pixels).to("cpu", non_blocking=True))
                if self._reference_BTD is None and acts.acts_ND.shape[0] % n == 0:
                    refs = acts.acts_ND.view(n, -1, acts.acts_ND.shape[-1])[: clf.REFERENCE_IMAGES]
                    self._reference_BTD = refs.float().cpu()
                self.paths.extend(_label(collection, i, first_id) for i in batch.indices)
        if embedder.device.type == "cuda":
            torch.cuda.current_stream(embedder.device).synchronize()
        if chunks:
            new = torch.cat(chunks).numpy().astype(np.float32)
            self.embeddings_NE = (
                new if self.embeddings_NE.size == 0 else np.concatenate([self.embeddings_NE, new])
            )
            self.meta["embed_dim"] = int(new.shape[1])
        self._path_to_id = {p: i for i, p in enumerate(self.paths)}

    def _skip(self, skipped: list[dict[str, Any]], collection: ImageList, first_id: int) -> None:
        """Record unreadable images, or fail on the first one unless `skip_unreadable`."""
        for err in sorted(skipped, key=lambda e: e["index"]):
            if not self.cfg.skip_unreadable:
                raise ImageReadError(
                    err["source"],
                    err["reason"],
                    "Fix or remove the file, or build with IndexConfig(skip_unreadable=True) to leave it "
                    "out.",
                )
            self.skipped.append(_label(collection, err["index"], first_id))

    def _embed(self, pixels_BCHW: Tensor) -> Tensor:
        embedder = self._need_embedder()
        if clf.is_classifier_embedder(embedder):
            return clf.classifier_embeddings(embedder, pixels_BCHW)
        return embed_images(embedder, pixels_BCHW)

    @property
    def classifier_backed(self) -> bool:
        """Names and text queries come from a classifier's classes, not from a CLIP text tower."""
        return self.embedder is not None and clf.is_classifier_embedder(self.embedder)

    # ================================================================== features
    def feature_directions(self) -> Tensor:
        """Unit CLIP-space direction of every feature [n, E] (zero rows for features never on)."""
        if self._directions_nE is None:
            directions = atom_directions(self.embedder, self.sae) if self.embedder is not None else None
            if directions is None:
                values, ids = self.codes.top_per_feature(self.cfg.concept_images)
                directions = image_concept_vectors(values, ids, torch.from_numpy(self.embeddings_NE))
            self._directions_nE = directions
        return self._directions_nE

    def name_features(self, vocab: Sequence[str] | None = None) -> None:
        """(Re)compute name candidates for every feature from `vocab` (default: mmsae's vocabulary)."""
        embedder = self._need_embedder()
        if clf.is_classifier_embedder(embedder):
            if self._reference_BTD is None:
                raise RuntimeError(
                    "Logit names are computed while building a classifier-backed index; rebuild it with "
                    "ConceptIndex.build to rename its features."
                )
            self.names = clf.classifier_names(
                self.sae, embedder, self._reference_BTD, self.meta["hook"], self.cfg.names_per_feature
            )
            return
        if not isinstance(embedder, TextEmbedder):
            self.names = [[] for _ in range(self.sae.n_features)]
            return
        vocab = list(vocab) if vocab is not None else load_vocabulary()
        text_VE = text_embeddings(embedder, vocab)
        self.names = rank_names(self.feature_directions(), text_VE, vocab, self.cfg.names_per_feature)

    def feature_name(self, feature: int) -> str:
        self._check_feature(feature)
        return self.names[feature][0].name if self.names[feature] else ""

    # ================================================================== queries
    def __len__(self) -> int:
        return len(self.paths)

    def __contains__(self, path: object) -> bool:
        """Whether an image path is in the index (queries by such a path need no model)."""
        return isinstance(path, (str, os.PathLike)) and os.fspath(path) in self._path_to_id

    def search_text(
        self, text: str, k: int = 10, with_features: Sequence[int] = (), without_features: Sequence[int] = ()
    ) -> list[ImageHit]:
        """Images closest to a text, optionally only those with/without given features on.

        Classifier-backed: the text names a class; images rank by the codes of the features named it."""
        if self.classifier_backed:
            return self._search_class(text, k, with_features, without_features)
        return self._search(self._text_vector(text), k, with_features, without_features)

    def search_image(
        self,
        image: ImageLike | int,
        k: int = 10,
        with_features: Sequence[int] = (),
        without_features: Sequence[int] = (),
    ) -> list[ImageHit]:
        """Images closest to an image (indexed id or path, new file, or PIL image)."""
        return self._search(self._image_vector(image), k, with_features, without_features)

    def search_features(self, text: str, k: int = 10) -> list[FeatureHit]:
        """Features whose CLIP-space direction is closest to a text (through the CLIP text tower).

        Classifier-backed: the features whose logit names include the class the text names (score =
        logit change), those with it as first name first."""
        check_k(k)
        if self.classifier_backed:
            return [FeatureHit(j, self.feature_name(j), s) for j, s in self._class_features(text)[:k]]
        directions = self.feature_directions()
        sims = directions @ torch.from_numpy(self._text_vector(text))
        sims = sims.masked_fill(
            directions.norm(dim=-1) == 0, -torch.inf
        )  # never-on features have no direction
        scores, idx = sims.topk(min(k, len(sims)))
        return [
            FeatureHit(int(j), self.feature_name(int(j)), float(s))
            for s, j in zip(scores, idx)
            if s > -torch.inf
        ]

    def features_of(self, image: ImageLike | int, k: int = 10) -> list[FeatureContribution]:
        """An image's strongest features with their share of the reconstruction."""
        check_k(k)
        features, values = self._codes_of(image)
        norms = self.sae.W_dec.detach().float().norm(dim=-1).cpu().numpy()[features]
        weight = np.abs(values) * norms
        total = max(float(weight.sum()), 1e-12)
        order = np.argsort(-weight, kind="stable")[:k]
        return [
            FeatureContribution(
                int(features[i]),
                self.feature_name(int(features[i])),
                float(values[i]),
                float(weight[i] / total),
            )
            for i in order
        ]

    def images_of(self, feature: int, k: int = 10) -> list[ImageHit]:
        """The images where `feature` is strongest (pooled activation as score)."""
        check_k(k)
        self._check_feature(feature)
        ids, vals = self.codes.column(feature)
        return [ImageHit(int(i), self.paths[i], float(v)) for i, v in zip(ids[:k], vals[:k])]

    def heatmap(self, image: ImageLike | int, feature: int) -> np.ndarray:
        """[H, W] activation of `feature` over the image's patches (needs the encoder)."""
        return feature_heatmaps(
            self._need_encoder(), self.sae, [self._as_image(image)], feature, hook=self.meta["hook"]
        )[0]

    # ------------------------------------------------------------------ query helpers
    def _search(
        self, query_E: np.ndarray, k: int, with_features: Sequence[int], without_features: Sequence[int]
    ) -> list[ImageHit]:
        check_k(k)
        allowed = self._allowed(with_features, without_features)
        hits = nearest_images(self.ann, self.embeddings_NE, query_E, k, allowed, self.cfg.ann.exact_below)
        return [ImageHit(i, self.paths[i], s) for i, s in hits]

    def _class_features(self, text: str) -> list[tuple[int, float]]:
        class_name = clf.match_class(text, self.embedder.class_names)
        return clf.class_features(self.names, class_name, self.cfg.names_per_feature)

    def _search_class(
        self, text: str, k: int, with_features: Sequence[int], without_features: Sequence[int]
    ) -> list[ImageHit]:
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}.")
        class_name = clf.match_class(text, self.embedder.class_names)
        allowed = self._allowed(with_features, without_features)
        hits = clf.images_of_class(self.codes, self.names, class_name, self.cfg.names_per_feature, k, allowed)
        return [ImageHit(i, self.paths[i], s) for i, s in hits]

    def _allowed(self, with_features: Sequence[int], without_features: Sequence[int]) -> np.ndarray | None:
        for f in (*with_features, *without_features):
            self._check_feature(f)
        return allowed_images(self.codes, len(self), with_features, without_features)

    def _text_vector(self, text: str) -> np.ndarray:
        embedder = self._need_embedder()
        require_text_tower(embedder)
        return text_embeddings(embedder, [text], template="{}")[0].numpy()

    def _image_vector(self, image: ImageLike | int) -> np.ndarray:
        known = self._known_id(image)
        if known is not None:
            return self.embeddings_NE[known]
        embedder = self._need_embedder()
        return self._embed(stack_pixels(embedder, [open_image(image)]))[0].cpu().numpy()

    @torch.no_grad()
    def _codes_of(self, image: ImageLike | int) -> tuple[np.ndarray, np.ndarray]:
        known = self._known_id(image)
        if known is not None:
            return self.codes.row(known)
        encoder, hook = self._need_encoder(), self.meta["hook"]
        acts = encoder.activations(
            stack_pixels(encoder, [open_image(image)]), [hook], tokens=self.cfg.tokens
        )[hook]
        codes = pooled_codes(self.sae, acts, 1, self.cfg.pool)[0].cpu()
        nz = codes.nonzero().flatten()
        return nz.numpy(), codes[nz].numpy()

    def _known_id(self, image: ImageLike | int) -> int | None:
        if isinstance(image, (int, np.integer)) and not isinstance(image, bool):
            if not 0 <= image < len(self):
                raise IndexError(f"Image id {image} is out of range: the index holds {len(self)} images.")
            return int(image)
        if isinstance(image, (str, os.PathLike)):
            return self._path_to_id.get(os.fspath(image))
        return None

    def _as_image(self, image: ImageLike | int) -> ImageLike:
        known = self._known_id(image)
        return self.paths[known] if known is not None else image

    def _check_feature(self, feature: int) -> None:
        if not 0 <= feature < self.sae.n_features:
            raise IndexError(
                f"Feature {feature} is out of range: the SAE has {self.sae.n_features} features."
            )

    def _need_encoder(self) -> Encoder:
        if self.encoder is None:
            raise RuntimeError(
                f"This query encodes a new image and needs the encoder {self.meta['encoder']!r}: "
                f"ConceptIndex.load(path, encoder=get_encoder({self.meta['encoder']!r}))."
            )
        return self.encoder

    def _need_embedder(self) -> Encoder:
        if self.embedder is None:
            raise RuntimeError(
                f"This query needs the embedding model {self.meta['embedder']!r}: "
                f"ConceptIndex.load(path, embedder=get_encoder({self.meta['embedder']!r}))."
            )
        return self.embedder

    # ================================================================== persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write the index to directory `path`, atomically: readers see the old or the new index, whole."""
        meta = {**self.meta, "n_images": len(self), "skipped": self.skipped}
        parts = {"paths": self.paths, "names": self.names, "embeddings_NE": self.embeddings_NE}
        return write_index(Path(path), meta, **parts, codes=self.codes, ann=self.ann, sae=self.sae)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        encoder: Encoder | None = None,
        embedder: Encoder | None = None,
        sae: SAE | None = None,
        mmap: bool = False,
    ) -> ConceptIndex:
        """Reopen a saved index. Encoders are optional (needed for new images / text) but must match."""
        path = Path(path)
        require_index_dir(path)
        meta = read_meta(path)
        embedder = (
            embedder
            if embedder is not None
            else (encoder if encoder is not None and encoder.id == meta["embedder"] else None)
        )
        for role, enc in (("encoder", encoder), ("embedder", embedder)):
            if enc is not None and enc.id != meta[role]:
                raise ValueError(
                    f"The index at {path} was built with {role} {meta[role]!r}, got {enc.id!r}: "
                    f"pass get_encoder({meta[role]!r})."
                )
        sae = sae if sae is not None else load_sae(path / "sae")
        if (sae.d_in, sae.n_features) != (meta["d_in"], meta["n_features"]):
            raise ValueError(
                f"The index at {path} was built with an SAE of d_in={meta['d_in']}, "
                f"n_features={meta['n_features']}; got d_in={sae.d_in}, n_features={sae.n_features}."
            )
        parts = read_parts(path, meta, sae.n_features, mmap)
        index = cls(sae=sae, meta=meta, **parts, encoder=encoder, embedder=embedder)
        index.skipped = meta.get("skipped", [])
        return index

    def __repr__(self) -> str:
        return (
            f"ConceptIndex({len(self)} images, {self.sae.n_features} features, "
            f"encoder={self.meta['encoder']}, hook={self.meta['hook']}, "
            f"embedder={self.meta['embedder']}, ann={self.meta.get('ann')})"
        )


def _label(collection: ImageList, index: int, first_id: int) -> str:
    """An image's path, or `<image i>` (its id in the index) for an image given in memory."""
    item = collection.images[index]
    return os.fspath(item) if isinstance(item, (str, os.PathLike)) else f"<image {first_id + index}>"
