"""Concept unlearning (SAeUron) on a diffusion UNet: type a concept, see its features, compare samples.

(On an image classifier the app unlearns a class instead: `mmsae.apps.unlearn_classifier`.)

A concept becomes a few templated prompts; the bundled demo prompts that do not mention it are the
"other" prompts. `select_features` picks the concept's features per timestep at the chosen percentile
(cached per concept and percentile, it samples every prompt once); `Unlearner` then samples with them
suppressed, next to a bare sample from the same seed.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import gradio as gr
from PIL import Image

from mmsae.apps.common import (
    MODEL_LOCK,
    TRACK_TQDM,
    AppSettings,
    FeatureCatalog,
    InputError,
    as_files,
    banner,
    check_number,
    check_text,
    for_display,
    user_errors,
)
from mmsae.datasets.images import PromptList
from mmsae.encoders.base import Encoder
from mmsae.encoders.capabilities import Classifier, Sampler, require
from mmsae.intervene.unlearn import SampleConfig, Unlearner, UnlearnSelection, select_features
from mmsae.sae import SAE

CONCEPT_TEMPLATES = ("{}", "a photo of a {}", "a painting of a {}", "a {} in a city street")
MAX_CONCEPT_CHARS = 60
MAX_MULTIPLIER = 100.0
CACHED_SELECTIONS = 16  # each holds per-timestep feature lists; the oldest is dropped beyond this


@dataclass
class UnlearnAppConfig:
    steps: int | None = None
    """Sampling steps for selection and generation; None = the encoder's own default."""
    guidance_scale: float = 7.5
    n_other_prompts: int = 8


class UnlearnHandlers:
    """Feature selection (cached) and side-by-side generation for one UNet encoder and SAE."""

    def __init__(
        self,
        encoder: Encoder,
        sae: SAE,
        settings: AppSettings,
        catalog: FeatureCatalog | None = None,
        cfg: UnlearnAppConfig | None = None,
    ):
        self.sampler = require(encoder, Sampler, what="Concept unlearning")
        self.encoder, self.sae, self.settings = encoder, sae, settings
        self.catalog = catalog or FeatureCatalog.unnamed(sae.cfg.n_features)
        self.cfg = cfg or UnlearnAppConfig()
        self.steps = self.cfg.steps or self.sampler.sampling.num_inference_steps
        self.other_prompts = PromptList.bundled("demo").prompts
        self._selections: OrderedDict[tuple[str, float], UnlearnSelection] = OrderedDict()

    def sampling(self, seed: Any = 0) -> SampleConfig:
        return SampleConfig(
            self.steps,
            self.cfg.guidance_scale,
            check_number(seed, "Seed", 0, self.settings.limits.seed, True),
        )

    def selection(self, concept: str, percentile: float) -> UnlearnSelection:
        """The concept's features at `percentile`, selected once per (concept, percentile)."""
        concept = check_text(
            concept, "The concept", MAX_CONCEPT_CHARS, "Type a concept to unlearn, e.g. 'cat'."
        ).lower()
        percentile = check_number(percentile, "Percentile", 0, 100)
        if not 0 < percentile < 100:
            raise InputError(f"Percentile {percentile:g} must lie strictly between 0 and 100.")
        key = (concept, percentile)
        if key in self._selections:
            self._selections.move_to_end(key)
        else:
            others = [p for p in self.other_prompts if concept not in p.lower()][: self.cfg.n_other_prompts]
            with MODEL_LOCK:
                self._selections[key] = select_features(
                    self.encoder,
                    self.sae,
                    {concept: [t.format(concept) for t in CONCEPT_TEMPLATES]},
                    others,
                    float(percentile),
                    sampling=self.sampling(),
                )
            while len(self._selections) > CACHED_SELECTIONS:
                self._selections.popitem(last=False)
        return self._selections[key]

    def describe(self, concept: str, percentile: float) -> tuple[list[list[str]], str]:
        """(rows 'timestep | features', summary) of the concept's selected features."""
        chosen = self.selection(concept, percentile).concepts[concept.strip().lower()]
        percentile = float(percentile)
        rows = [
            [str(t), ", ".join(self.catalog.label(f) for f in fs) or "–"]
            for t, fs in sorted(chosen.features.items(), reverse=True)
        ]
        distinct = sorted({f for fs in chosen.features.values() for f in fs})
        if not distinct:
            return rows, f"No feature passes percentile {percentile:g}: lower it."
        return rows, f"{len(distinct)} feature(s) over {len(rows)} timesteps at percentile {percentile:g}."

    # `progress` is never called: its presence makes Gradio mirror the selection's tqdm bars.
    def select(
        self, concept: str, percentile: float, progress: gr.Progress = TRACK_TQDM
    ) -> tuple[list[list[str]], str]:
        return self.describe(concept, percentile)

    def generate(
        self,
        concept: str,
        prompt: str,
        percentile: float,
        multiplier: float,
        seed: int,
        progress: gr.Progress = TRACK_TQDM,
    ) -> tuple[Image.Image, Image.Image, list[list[str]], str]:
        """(sample without, sample with unlearning, feature table, summary), both from `seed`."""
        prompt = check_text(
            prompt, "The prompt", self.settings.limits.text_chars, "Type a prompt to generate from."
        )
        multiplier = check_number(multiplier, "Multiplier", -MAX_MULTIPLIER, MAX_MULTIPLIER)
        if multiplier >= 0:
            raise InputError(f"Multiplier {multiplier:g} must be negative (SAeUron uses −1 … −30).")
        sampling = self.sampling(seed)
        selection = self.selection(concept, percentile)
        rows, summary = self.describe(concept, percentile)
        unlearner = Unlearner(self.encoder, self.sae, selection, [concept.strip().lower()], multiplier)
        with MODEL_LOCK:
            before = self.sampler.sample(
                [prompt],
                num_inference_steps=sampling.num_inference_steps,
                guidance_scale=sampling.guidance_scale,
                seed=sampling.seed,
            )
            after = unlearner.generate([prompt], sampling)
        return for_display(before[0]), for_display(after[0]), rows, summary


def build_unlearn_app(
    encoder: Encoder,
    sae: SAE,
    settings: AppSettings | None = None,
    catalog: FeatureCatalog | None = None,
    cfg: UnlearnAppConfig | None = None,
) -> gr.Blocks:
    """The unlearning Blocks: concepts of a diffusion UNet, or classes of an image classifier."""
    settings = settings or AppSettings()
    if not isinstance(encoder, Sampler) and isinstance(encoder, Classifier):
        from mmsae.apps.unlearn_classifier import build_classifier_unlearn_app

        return build_classifier_unlearn_app(encoder, sae, settings, catalog)
    h = UnlearnHandlers(encoder, sae, settings, catalog, cfg)
    with gr.Blocks(title="mmsae concept unlearning", **AppSettings.blocks_kwargs()) as demo:
        banner(settings)
        gr.Markdown(
            f"## Concept unlearning on {encoder.id} at `{sae.cfg.hook}`\n"
            "Features are selected per timestep (SAeUron); where one fires above its mean it is "
            "set to its concept mean × multiplier."
        )
        with gr.Row():
            concept = gr.Textbox(label="Concept", value="cat", elem_id="unlearn-concept")
            percentile = gr.Slider(90, 99.999, value=99.99, step=0.001, label="Percentile")
            multiplier = gr.Slider(-30, -0.5, value=-5, step=0.5, label="Multiplier")
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", value="a photo of a cat", elem_id="unlearn-prompt")
            seed = gr.Number(0, precision=0, label="Seed")
        with gr.Row():
            select = gr.Button("Show features", elem_id="unlearn-select")
            generate = gr.Button("Generate", variant="primary", elem_id="unlearn-generate")
        summary = gr.Markdown(elem_id="unlearn-summary")
        with gr.Row():
            before = gr.Image(label="Without unlearning", height=300, elem_id="unlearn-before")
            after = gr.Image(label="With unlearning", height=300, elem_id="unlearn-after")
        table = gr.Dataframe(
            headers=["timestep", "features"],
            label="Selected features",
            interactive=False,
            elem_id="unlearn-features",
        )
        select.click(user_errors(h.select), [concept, percentile], [table, summary], api_name="select")
        generate.click(
            user_errors(as_files(h.generate)),
            [concept, prompt, percentile, multiplier, seed],
            [before, after, table, summary],
            api_name="generate",
        )
    return demo


__all__ = ["CONCEPT_TEMPLATES", "UnlearnAppConfig", "UnlearnHandlers", "build_unlearn_app"]
