"""Concept search over a prebuilt `ConceptIndex`: text/image → images; image → features; feature → images.

`SearchHandlers` holds the logic (plain Python, unit-tested); `build_search_app` wires it into Gradio.
Galleries carry thumbnails rendered on the server from the index's own files, so the browser never
names a path; uploads are read only from Gradio's upload folder or the app's data directories.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import gradio as gr
import matplotlib
import numpy as np
from PIL import Image

from mmsae.apps.common import (
    MODEL_LOCK,
    AppSettings,
    FeatureCatalog,
    InputError,
    as_files,
    banner,
    check_number,
    check_text,
    image_dirs,
    image_file,
    open_app_image,
    shorten,
    thumbnail,
    upload_roots,
    uploaded_image,
    user_errors,
)
from mmsae.index import ConceptIndex

FILTERS = ("off", "with", "without")
Gallery = list[tuple[Image.Image | str, str]]
# Searches hold the model lock only for the query embedding; rendering runs beside other searches.
SEARCH_CONCURRENCY = 4
THUMBNAIL_CACHE = 4096  # gallery thumbnails kept as files (about 50 KB each); the oldest is dropped first


def overlay(image: Image.Image, heat_HW: np.ndarray, size: int = 192, alpha: float = 0.55) -> Image.Image:
    """The image with a feature's [H, W] activation map laid over it (inferno colours, max-normalised)."""
    base = thumbnail(image.convert("RGB"), size)
    heat = np.clip(heat_HW, 0, None)
    heat = heat / heat.max() if heat.max() > 0 else heat
    colored = (matplotlib.colormaps["inferno"](heat)[..., :3] * 255).astype(np.uint8)
    return Image.blend(base, Image.fromarray(colored).resize(base.size, Image.Resampling.BILINEAR), alpha)


class SearchHandlers:
    """What the concept-search app does, independent of its layout."""

    def __init__(self, index: ConceptIndex, settings: AppSettings, n_heatmaps: int = 6):
        self.index, self.settings, self.n_heatmaps = index, settings, n_heatmaps
        self.catalog = FeatureCatalog.from_index(index)
        # The index's own images are trusted (the server built it); uploads come from Gradio's folder.
        self.image_roots = [*settings.data_dirs, *image_dirs(index.paths)]
        self.upload_roots = upload_roots(settings)
        self._thumbnails: dict[int, str] = {}
        self._thumbnails_lock = threading.Lock()

    def _image(self, image_id: int) -> Image.Image:
        return open_app_image(self.index.paths[image_id], self.image_roots, self.settings.max_upload_mb)

    def _thumbnail(self, image_id: int) -> str:
        """The gallery thumbnail of an indexed image as a PNG file, rendered once per image."""
        path = self._thumbnails.get(image_id)
        if path is None or not Path(path).is_file():
            path = image_file(thumbnail(self._image(image_id)))
            with self._thumbnails_lock:  # searches run concurrently
                if len(self._thumbnails) >= THUMBNAIL_CACHE:
                    self._thumbnails.pop(next(iter(self._thumbnails)))
                self._thumbnails[image_id] = path
        return path

    def _gallery(self, hits: list[Any], what: str) -> Gallery:
        return [(self._thumbnail(h.id), f"{h.id}: {what} {h.score:.3f}") for h in hits]

    def search(
        self, text: str, image: str | None, k: int, filter_mode: str, filter_text: str
    ) -> tuple[Gallery, list[int], str]:
        """Text or image query (an uploaded file) → (gallery, image ids, status line)."""
        limits = self.settings.limits
        if filter_mode not in FILTERS:
            raise InputError(f"Unknown filter {shorten(filter_mode)}: use one of {', '.join(FILTERS)}.")
        k = check_number(k, "Results", 1, limits.results, integer=True)
        text = check_text(text, "The text query", limits.text_chars)
        features = self.catalog.resolve(filter_text or "") if filter_mode != "off" else []
        if filter_mode != "off" and not features:
            raise InputError(f"Filter '{filter_mode}' needs features: type feature numbers or concept words.")
        with_f, without_f = (features, []) if filter_mode == "with" else ([], features)
        if image:  # decoded before taking the model lock: a large upload does not hold the model
            query = open_app_image(image, self.upload_roots, self.settings.max_upload_mb)
            with MODEL_LOCK:
                hits = self.index.search_image(query, k, with_f, without_f)
            source = "the uploaded image"
        elif text:
            with MODEL_LOCK:
                hits = self.index.search_text(text, k, with_f, without_f)
            source = shorten(text)
        else:
            raise InputError("Type a text query or upload an image.")
        status = f"{len(hits)} images for {source}"
        if features:
            status += f", {filter_mode} " + ", ".join(self.catalog.label(f) for f in features)
        return self._gallery(hits, "cos"), [h.id for h in hits], status

    def image_features(
        self, image_id: int, k: int = 10
    ) -> tuple[Image.Image, list[list[Any]], Gallery, list[int]]:
        """An indexed image → (its picture, feature table, heatmap gallery, feature ids)."""
        image_id = check_number(image_id, "Image id", -(2**62), 2**62, integer=True)
        if not 0 <= image_id < len(self.index):
            raise InputError(f"Image {image_id} is not in the index (ids 0..{len(self.index) - 1}).")
        k = check_number(k, "Features", 1, self.settings.limits.results, integer=True)
        picture = self._image(image_id)
        with MODEL_LOCK:
            feats = self.index.features_of(image_id, k=k)
            heat_maps = self._heat_maps(image_id, [f.feature for f in feats[: self.n_heatmaps]])
        heatmaps = (
            [overlay(picture, heat_HW) for heat_HW in heat_maps]
            if heat_maps is not None
            else [thumbnail(picture, 192) for _ in feats[: self.n_heatmaps]]
        )
        table = [[f.feature, f.name, round(f.activation, 4), round(f.contribution, 4)] for f in feats]
        gallery = [
            (img, f"{self.catalog.label(f.feature)} ({f.contribution:.0%})")
            for img, f in zip(heatmaps, feats)
        ]
        return thumbnail(picture, 384), table, gallery, [f.feature for f in feats[: len(gallery)]]

    def _heat_maps(self, image_id: int, features: list[int]) -> list[np.ndarray] | None:
        """[H, W] maps of `features` (under the model lock); None for hooks without a patch grid."""
        try:
            return [self.index.heatmap(image_id, f) for f in features]
        except ValueError:
            return None

    def feature_images(self, feature: Any, k: int) -> tuple[Gallery, list[int], str]:
        """A feature → (its top images, their ids, a title with its name candidates)."""
        f = self.catalog.parse(feature)
        hits = self.index.images_of(
            f, check_number(k, "Results", 1, self.settings.limits.results, integer=True)
        )
        names = ", ".join(c.name for c in self.index.names[f]) or "unnamed"
        n_on = len(self.index.codes.images_with(f))
        title = f"Feature #{f}: {names}. Fires on {n_on} of {len(self.index)} images."
        return self._gallery(hits, "act"), [h.id for h in hits], title

    @staticmethod
    def pick(ids: list[int], evt: gr.SelectData) -> int:
        """Gallery click → the id of the clicked item."""
        return int(ids[evt.index])


def describe_index(index: ConceptIndex) -> str:
    """The page's subtitle: what the index holds, in words."""
    meta = index.meta
    embedder = "" if meta["embedder"] == meta["encoder"] else f"; search embeddings from `{meta['embedder']}`"
    return (
        f"{len(index):,} images, {index.sae.n_features:,} SAE features on `{meta['encoder']}` "
        f"at `{meta['hook']}`{embedder}."
    )


def build_search_app(index: ConceptIndex, settings: AppSettings | None = None) -> gr.Blocks:
    """The concept-search Blocks for a loaded index (with its encoder/embedder for new queries)."""
    settings = settings or AppSettings()
    h = SearchHandlers(index, settings)
    with gr.Blocks(title="mmsae concept search", **AppSettings.blocks_kwargs()) as demo:
        banner(settings)
        gr.Markdown(f"## Concept search\n{describe_index(index)}", elem_id="search-subtitle")
        with gr.Row():
            with gr.Column(scale=2):
                text = gr.Textbox(label="Text query", placeholder="a photo of a cat", elem_id="search-text")
                image = uploaded_image(
                    label="…or an image query",
                    sources=["upload", "clipboard"],
                    height=160,
                    elem_id="search-image",
                )
            with gr.Column(scale=1):
                k = gr.Slider(1, settings.limits.results, value=12, step=1, label="Results")
                filter_mode = gr.Radio(list(FILTERS), value="off", label="Concept filter")
                filter_text = gr.Textbox(label="Filter features (numbers or concept words, comma-separated)")
                go = gr.Button("Search", variant="primary", elem_id="search-go")
        status = gr.Markdown(elem_id="search-status")
        results = gr.Gallery(label="Results", columns=6, height=300, elem_id="search-gallery")
        result_ids = gr.State([])
        with gr.Row():
            image_id = gr.Number(label="Image id (click a result)", precision=0, elem_id="search-image-id")
            picture = gr.Image(label="Image", interactive=False, height=240)
            table = gr.Dataframe(
                headers=["feature", "name", "activation", "contribution"],
                label="Top features",
                interactive=False,
                elem_id="search-features",
            )
        heatmaps = gr.Gallery(
            label="Where its features fire (click one for its top images)",
            columns=6,
            height=220,
            elem_id="search-heatmaps",
        )
        heatmap_ids = gr.State([])
        feature = gr.Textbox(label="Feature (click a heatmap, or type a number)", elem_id="search-feature")
        feature_title = gr.Markdown()
        top_images = gr.Gallery(
            label="Top images of the feature", columns=6, height=220, elem_id="search-feature-images"
        )
        top_ids = gr.State([])

        search_event = dict(
            fn=user_errors(as_files(h.search)),
            inputs=[text, image, k, filter_mode, filter_text],
            outputs=[results, result_ids, status],
        )
        go.click(**search_event, api_name="search", concurrency_limit=SEARCH_CONCURRENCY)
        text.submit(**search_event, api_name=False)
        show_features = dict(
            fn=user_errors(as_files(h.image_features)),
            inputs=[image_id],
            outputs=[picture, table, heatmaps, heatmap_ids],
        )
        image_id.submit(**show_features, api_name="image_features")
        results.select(h.pick, [result_ids], [image_id], api_name="pick_result").then(
            **show_features, api_name=False
        )
        top_images.select(h.pick, [top_ids], [image_id], api_name="pick_top_image").then(
            **show_features, api_name=False
        )
        show_images = dict(
            fn=user_errors(as_files(h.feature_images)),
            inputs=[feature, k],
            outputs=[top_images, top_ids, feature_title],
        )
        feature.submit(**show_images, api_name="feature_images")
        heatmaps.select(h.pick, [heatmap_ids], [feature], api_name="pick_feature").then(
            **show_images, api_name=False
        )
    return demo


__all__ = ["SearchHandlers", "build_search_app", "describe_index", "overlay"]
