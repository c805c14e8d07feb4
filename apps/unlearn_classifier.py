"""Class unlearning (SAeUron) on an image classifier: type a class, see its features, compare predictions.

The classifier's own top-1 over the app's images (its data directories, or the concept index's) sorts
them: those it calls the class are the concept's images, the rest the "other" images. SAeUron's selection
(`mmsae.intervene.classifier.select_class_features`, cached per class and percentile) picks the class's
features; blocking them is spliced into the classifier's forward (error term kept). The app shows the
top classes of an image with and without unlearning, and how many of the other images keep their top-1.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import gradio as gr
from PIL import Image
from torch import Tensor

from mmsae.analysis.images import list_images
from mmsae.apps.common import (
    MODEL_LOCK,
    AppSettings,
    FeatureCatalog,
    InputError,
    banner,
    check_number,
    check_text,
    open_app_image,
    shorten,
    upload_roots,
    uploaded_image,
    user_errors,
)
from mmsae.encoders.base import Encoder
from mmsae.encoders.capabilities import Classifier, require
from mmsae.index.classifier import match_class
from mmsae.intervene.classifier import STEP, agreement_rate, block_edits, class_probs, select_class_features
from mmsae.intervene.unlearn import UnlearnSelection
from mmsae.sae import SAE

MAX_CONCEPT_CHARS = 60
MAX_MULTIPLIER = 100.0
MAX_IMAGES = 256  # images sorted by the classifier (one forward each, once)
CACHED_SELECTIONS = 16
TOP_CLASSES = 5


def named_top_classes(probs_K: Tensor, class_names: Sequence[str], k: int = TOP_CLASSES) -> dict[str, float]:
    """The k most probable classes by name, for gr.Label."""
    values, idx = probs_K.float().topk(min(k, len(probs_K)))
    return {class_names[i]: float(v) for v, i in zip(values.tolist(), idx.tolist())}


@dataclass
class ClassEffect:
    before_K: Tensor
    """Class probabilities of the image without unlearning."""
    after_K: Tensor
    """... and with the class unlearned."""
    others_kept: float
    """Share of the app's other images (those not classified as the class) whose top-1 is unchanged."""
    n_others: int


class ClassifierUnlearnHandlers:
    """Class selection (cached) and before/after predictions for one classifier and SAE."""

    def __init__(
        self,
        encoder: Encoder,
        sae: SAE,
        settings: AppSettings,
        catalog: FeatureCatalog | None = None,
        images: Sequence[str] | None = None,
    ):
        self.classifier = require(encoder, Classifier, what="Class unlearning")
        self.encoder, self.sae, self.settings = encoder, sae, settings
        self.catalog = catalog or FeatureCatalog.unnamed(sae.cfg.n_features)
        self.upload_roots = upload_roots(settings)
        self.images = (
            list(images)
            if images is not None
            else [str(p) for d in settings.data_dirs for p in list_images(d)][:MAX_IMAGES]
        )
        self._pils: list[Image.Image] | None = None
        self._probs_NK: Tensor | None = None
        self._selections: OrderedDict[tuple[str, float], UnlearnSelection] = OrderedDict()

    def class_name(self, concept: Any) -> str:
        text = check_text(
            concept, "The class", MAX_CONCEPT_CHARS, "Type a class to unlearn, e.g. 'espresso'."
        )
        try:
            return match_class(text, self.classifier.class_names)
        except KeyError as e:
            raise InputError(str(e.args[0])) from None

    def image_probs(self) -> tuple[list[Image.Image], Tensor]:
        """The app's images and the classifier's softmax on them [N, K], computed once."""
        if self._probs_NK is None:
            if not self.images:
                raise InputError(
                    "Unlearning selects a class's features on images: start the app with "
                    "--data-dir <folder of images> (or --index)."
                )
            pils = [open_app_image(p, self.settings.data_dirs) for p in self.images]
            with MODEL_LOCK:
                self._probs_NK = class_probs(self.encoder, pils)
            self._pils = pils
        assert self._pils is not None
        return self._pils, self._probs_NK

    def selection(self, name: str, percentile: float) -> UnlearnSelection:
        """The class's features at `percentile`, selected once per (class, percentile)."""
        key = (name, percentile)
        if key in self._selections:
            self._selections.move_to_end(key)
            return self._selections[key]
        pils, probs_NK = self.image_probs()
        c = self.classifier.class_names.index(name)
        mine = probs_NK.argmax(-1) == c
        if not mine.any() or mine.all():
            raise InputError(
                f"The classifier calls {int(mine.sum())} of the app's {len(pils)} images {name!r}: "
                "selection needs images of the class and others; add photos of it to a data directory."
            )
        concept = [p for p, m in zip(pils, mine.tolist()) if m]
        others = [p for p, m in zip(pils, mine.tolist()) if not m]
        with MODEL_LOCK:
            self._selections[key] = select_class_features(
                self.encoder, self.sae, {name: concept}, others, percentile
            )
        while len(self._selections) > CACHED_SELECTIONS:
            self._selections.popitem(last=False)
        return self._selections[key]

    def describe(self, concept: str, percentile: float) -> tuple[list[list[str]], str]:
        """(rows 'feature | logit name', summary) of the class's selected features."""
        name = self.class_name(concept)
        percentile = check_number(percentile, "Percentile", 0, 100)
        if not 0 < percentile < 100:
            raise InputError(f"Percentile {percentile:g} must lie strictly between 0 and 100.")
        features = self.selection(name, percentile).concepts[name].features[STEP]
        rows = [[str(j), self.catalog.names[j] or "–"] for j in features]
        _, probs_NK = self.image_probs()
        n_mine = int((probs_NK.argmax(-1) == self.classifier.class_names.index(name)).sum())
        if not features:
            return rows, f"No feature of {name!r} passes percentile {percentile:g}: lower it."
        return rows, (
            f"{len(features)} feature(s) of {name!r} at percentile {percentile:g}, selected on the "
            f"{n_mine} image(s) the classifier calls {name!r} against the other {len(probs_NK) - n_mine}."
        )

    def effect(self, name: str, image: Any, percentile: float, multiplier: float) -> ClassEffect:
        """Class probabilities of one image with and without the class unlearned, and how many of the
        other images keep their top-1 class."""
        multiplier = check_number(multiplier, "Multiplier", -MAX_MULTIPLIER, MAX_MULTIPLIER)
        if multiplier >= 0:
            raise InputError(f"Multiplier {multiplier:g} must be negative (SAeUron uses −1 … −30).")
        pil = open_app_image(image, self.upload_roots, self.settings.max_upload_mb)
        edits = block_edits(self.selection(name, percentile), [name], multiplier)
        if not edits:
            raise InputError(
                f"No feature of {shorten(name)} to block at percentile {percentile:g}: lower it."
            )
        pils, probs_NK = self.image_probs()
        other = probs_NK.argmax(-1) != self.classifier.class_names.index(name)
        others = [p for p, o in zip(pils, other.tolist()) if o]
        with MODEL_LOCK:
            before_K = class_probs(self.encoder, [pil])[0]
            after_K = class_probs(self.encoder, [pil], self.sae, edits)[0]
            others_after = class_probs(self.encoder, others, self.sae, edits)
        return ClassEffect(before_K, after_K, agreement_rate(others_after, probs_NK[other]), len(others))

    def predict(
        self, concept: str, image: Any, percentile: float, multiplier: float
    ) -> tuple[dict[str, float], dict[str, float], list[list[str]], str]:
        """(top classes without, with unlearning, feature table, summary) for one image."""
        rows, selected = self.describe(concept, percentile)
        name, names = self.class_name(concept), self.classifier.class_names
        e = self.effect(name, image, float(percentile), multiplier)
        c = names.index(name)
        summary = (
            f"{selected} p({name}) on this image: {float(e.before_K[c]):.3f} → {float(e.after_K[c]):.3f}. "
            f"The other {e.n_others} images keep their top-1 class: {e.others_kept:.0%}."
        )
        return named_top_classes(e.before_K, names), named_top_classes(e.after_K, names), rows, summary


def build_classifier_unlearn_app(
    encoder: Encoder,
    sae: SAE,
    settings: AppSettings | None = None,
    catalog: FeatureCatalog | None = None,
    images: Sequence[str] | None = None,
    concept: str = "Egyptian cat",
) -> gr.Blocks:
    settings = settings or AppSettings()
    h = ClassifierUnlearnHandlers(encoder, sae, settings, catalog, images)
    with gr.Blocks(title="mmsae class unlearning", **AppSettings.blocks_kwargs()) as demo:
        banner(settings)
        gr.Markdown(
            f"## Class unlearning on {encoder.id} at `{sae.cfg.hook}`\n"
            "The class's features are selected on the images the classifier calls it (SAeUron); where one "
            "fires above its mean it is set to its class mean × multiplier, with the SAE's error term kept."
        )
        with gr.Row():
            name = gr.Textbox(label="Class", value=concept, elem_id="unlearn-concept")
            percentile = gr.Slider(90, 99.9, value=99.0, step=0.1, label="Percentile")
            multiplier = gr.Slider(-30, -0.5, value=-1, step=0.5, label="Multiplier")
        with gr.Row():
            with gr.Column():
                image = uploaded_image(
                    label="Image", sources=["upload", "clipboard"], height=220, elem_id="unlearn-image"
                )
                if h.images:
                    gr.Examples([[p] for p in h.images[:8]], [image], label="…or pick one")
                run = gr.Button("Unlearn", variant="primary", elem_id="unlearn-generate")
            with gr.Column():
                summary = gr.Markdown(elem_id="unlearn-summary")
                with gr.Row():
                    before = gr.Label(label="Without unlearning", num_top_classes=4, elem_id="unlearn-before")
                    after = gr.Label(label="With unlearning", num_top_classes=4, elem_id="unlearn-after")
        table = gr.Dataframe(
            headers=["feature", "logit name"],
            label="Selected features",
            interactive=False,
            elem_id="unlearn-features",
        )
        run.click(
            user_errors(h.predict),
            [name, image, percentile, multiplier],
            [before, after, table, summary],
            api_name="unlearn",
        )
    return demo


__all__ = ["ClassEffect", "ClassifierUnlearnHandlers", "build_classifier_unlearn_app", "named_top_classes"]
