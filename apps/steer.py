"""Image steering: pick SAE features by name, set their strength, compare the model's output before/after.

CLIP/timm/LLaVA: an image is steered with saev's rule, f_i := s × max activation of feature i (error
term kept); CLIP shows zero-shot labels, timm its top classes, LLaVA its answer. Diffusion: a prompt is
sampled twice from one seed, adding s × max_i × W_dec[i] (sdxl-unbox), optionally only under a painted
mask and inside a timestep window. `SteerHandlers` is the logic, `build_steer_app` the Gradio layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gradio as gr
import numpy as np
import torch
from PIL import Image
from torch import Tensor

from mmsae.analysis.images import list_images, stack_pixels
from mmsae.apps.common import (
    MODEL_LOCK,
    AppSettings,
    FeatureCatalog,
    InputError,
    as_files,
    banner,
    check_number,
    check_text,
    for_display,
    open_app_image,
    shorten,
    upload_roots,
    uploaded_image,
    user_errors,
    words,
)
from mmsae.apps.editor import mask_editor
from mmsae.datasets.images import PromptList
from mmsae.encoders.base import Encoder
from mmsae.encoders.capabilities import Classifier, Sampler, TextEmbedder
from mmsae.intervene import Direction, Edit, SetMax, Splice, max_activations
from mmsae.intervene.intervention import schedule_length
from mmsae.intervene.steer import steer_diffusion, steer_image, steer_llava
from mmsae.sae import SAE

N_SLOTS = 3  # features steered at once; each has its own strength slider
MAX_STRENGTH = 10.0
CALIBRATION_IMAGES = 64
CALIBRATION_PROMPTS = 4
DEFAULT_LABELS = "cat, dog, person, car, building, food, plant"
LLAVA_CALIBRATION_PROMPT = "Describe the image."


def mask_from_editor(value: Any) -> Tensor | None:
    """[H, W] mask in {0, 1} from a Gradio image-editor value (painted = 1); None when nothing is painted."""
    if value is None:
        return None
    layers = [np.asarray(layer) for layer in (value.get("layers") or []) if layer is not None]
    painted = [layer[..., 3] > 0 for layer in layers if layer.ndim == 3 and layer.shape[-1] == 4]
    if not painted or not np.any(painted):
        return None
    return torch.from_numpy(np.any(painted, axis=0).astype(np.float32))


class SteerHandlers:
    """Steering logic for one encoder and one SAE; max activations are measured once, lazily."""

    def __init__(
        self,
        encoder: Encoder,
        sae: SAE,
        settings: AppSettings,
        catalog: FeatureCatalog | None = None,
        max_acts: Tensor | None = None,
        calibration: Sequence[str] | None = None,
    ):
        self.encoder, self.sae, self.settings = encoder, sae, settings
        self.catalog = catalog or FeatureCatalog.unnamed(sae.cfg.n_features)
        self.upload_roots = upload_roots(settings)
        self._max_acts = max_acts
        self.calibration = list(calibration) if calibration is not None else self._default_calibration()
        self.is_diffusion = isinstance(encoder, Sampler)

    def _default_calibration(self) -> list[str]:
        """Images of the data directories (image models) or the bundled demo prompts (diffusion)."""
        if isinstance(self.encoder, Sampler):
            return PromptList.bundled("demo").prompts[:CALIBRATION_PROMPTS]
        return [str(p) for d in self.settings.data_dirs for p in list_images(d)][:CALIBRATION_IMAGES]

    def max_acts(self) -> Tensor:
        """Per-feature maximum activation over the calibration set (the unit of the strength sliders).

        Measured once, under the model lock; call it before taking the lock, never while holding it."""
        if self._max_acts is not None:
            return self._max_acts
        pils = (
            []
            if self.is_diffusion
            else [open_app_image(p, self.settings.data_dirs) for p in self.calibration]
        )
        with MODEL_LOCK:
            if self._max_acts is None:
                self._max_acts = self._measure(pils)
        return self._max_acts

    def _measure(self, pils: list[Image.Image]) -> Tensor:
        if not self.calibration:
            raise InputError(
                "Strengths are multiples of each feature's maximum activation, measured on "
                "images: start the app with --data-dir <folder of images> (or --index)."
            )
        if self.is_diffusion:
            batches: list[Any] = [self.calibration]
        else:
            batches = [self._batch(pils[i : i + 16]) for i in range(0, len(pils), 16)]
        return max_activations(self.encoder, self.sae, batches).cpu()

    def _batch(self, pils: list[Image.Image]) -> Any:
        if self.encoder.family == "llava":
            return (pils, LLAVA_CALIBRATION_PROMPT)
        return stack_pixels(self.encoder, pils)

    def find_features(self, query: str) -> tuple[dict, ...]:
        """Name search → new choices for every feature dropdown."""
        choices = self.catalog.choices(self.catalog.find(query or ""))
        if not choices:
            raise InputError(f"No feature matches {shorten(query)}.")
        return tuple(gr.update(choices=choices) for _ in range(N_SLOTS))

    def edits(self, slots: Sequence[Any]) -> list[Edit]:
        """(feature, strength) pairs from the slots → edits; empty feature slots are ignored."""
        if len(slots) > 2 * N_SLOTS:
            raise InputError(f"At most {N_SLOTS} features are steered at once.")
        pairs = [
            (self.catalog.parse(f), check_number(s, f"Strength {i + 1}", -MAX_STRENGTH, MAX_STRENGTH))
            for i, (f, s) in enumerate(zip(slots[::2], slots[1::2]))
            if f not in (None, "")
        ]
        if not pairs:
            raise InputError("Pick at least one feature to steer (search features by name above).")
        max_acts = self.max_acts()
        dead = [f for f, _ in pairs if max_acts[f] <= 0]
        if dead:
            raise InputError(
                f"Feature(s) {dead} never fired on the calibration data, so their maximum "
                "activation is 0 and steering them does nothing: pick other features."
            )
        if self.is_diffusion:
            return [Direction(f, s * float(max_acts[f])) for f, s in pairs]
        return [SetMax(f, s) for f, s in pairs]

    def steer_image(
        self, image: Any, labels: str, *slots: Any
    ) -> tuple[dict[str, float], dict[str, float], str]:
        """CLIP/timm: (labels before, labels after, summary)."""
        clip = isinstance(self.encoder, TextEmbedder)
        limits = self.settings.limits
        names = words(labels, "Zero-shot labels", limits.labels, limits.word_chars) if clip else []
        if clip and len(names) < 2:
            raise InputError("Give at least two comma-separated labels for CLIP's zero-shot classification.")
        pil = open_app_image(image, self.upload_roots, self.settings.max_upload_mb)
        edits, max_acts = self.edits(slots), self.max_acts()
        with MODEL_LOCK:
            r = steer_image(self.encoder, self.sae, [pil], edits, labels=names or None, max_acts=max_acts)
        if clip:
            before = dict(zip(names, r.probs_before_BL[0].tolist()))
            after = dict(zip(names, r.probs_after_BL[0].tolist()))
        else:
            names = self.encoder.class_names if isinstance(self.encoder, Classifier) else None
            before, after = top_classes(r.before_BE[0], names=names), top_classes(r.after_BE[0], names=names)
        summary = f"Cosine(before, after) of the model output: {float(r.cosine_B[0]):.4f}"
        return before, after, summary

    def steer_llava(self, image: Any, prompt: str, max_new_tokens: int, *slots: Any) -> tuple[str, str]:
        """LLaVA: (answer before, answer after) from greedy generation."""
        limits = self.settings.limits
        prompt = check_text(
            prompt, "The prompt", limits.text_chars, "Type a prompt for LLaVA, e.g. 'Describe the image.'"
        )
        n_new = check_number(max_new_tokens, "Max new tokens", 1, limits.new_tokens, integer=True)
        pil = open_app_image(image, self.upload_roots, self.settings.max_upload_mb)
        edits, max_acts = self.edits(slots), self.max_acts()
        with MODEL_LOCK:
            r = steer_llava(self.encoder, self.sae, [pil], prompt, edits, n_new, max_acts=max_acts)
        return r.before[0], r.after[0]

    def steer_diffusion(
        self, prompt: str, seed: int, steps: int, t_low: int, t_high: int, mask: Any, *slots: Any
    ) -> tuple[Image.Image, Image.Image]:
        """Diffusion: (sample without, sample with steering), same seed."""
        limits = self.settings.limits
        prompt = check_text(prompt, "The prompt", limits.text_chars, "Type a prompt to generate from.")
        seed = check_number(seed, "Seed", 0, limits.seed, integer=True)
        steps = check_number(steps, "Steps", 1, limits.steps, integer=True)
        n = schedule_length(self.encoder) or 1000
        low = check_number(t_low, "Timestep window: from", 0, n - 1, integer=True)
        high = check_number(t_high, "Timestep window: to", low, n - 1, integer=True)
        edits = self.edits(slots)
        window = None if (low, high) == (0, n - 1) else (low, high)
        splice = Splice(self.sae, edits, spatial_mask=mask_from_editor(mask), timesteps=window)
        with MODEL_LOCK:
            r = steer_diffusion(self.encoder, splice, [prompt], seed=seed, num_inference_steps=steps)
        return for_display(r.before[0]), for_display(r.after[0])


def top_classes(logits: Tensor, k: int = 5, names: Sequence[str] | None = None) -> dict[str, float]:
    """A classifier's top-k classes with probabilities, for gr.Label (by name when `names` are known)."""
    probs = logits.float().softmax(-1)
    values, idx = probs.topk(min(k, len(probs)))
    label = (lambda i: names[i]) if names else (lambda i: f"class {i}")
    return {label(i): float(v) for v, i in zip(values.tolist(), idx.tolist())}


def build_steer_app(
    encoder: Encoder,
    sae: SAE,
    settings: AppSettings | None = None,
    catalog: FeatureCatalog | None = None,
    max_acts: Tensor | None = None,
    calibration: Sequence[str] | None = None,
) -> gr.Blocks:
    """The steering Blocks; the layout follows the encoder family (image models vs diffusion)."""
    settings = settings or AppSettings()
    h = SteerHandlers(encoder, sae, settings, catalog, max_acts, calibration)
    with gr.Blocks(title="mmsae steering", **AppSettings.blocks_kwargs()) as demo:
        banner(settings)
        gr.Markdown(
            f"## Steering {encoder.id} at `{sae.cfg.hook}` ({sae.cfg.n_features} features)\n"
            "Strength = multiple of the feature's maximum activation (−10…10)."
        )
        slots = _feature_slots(h)
        if h.is_diffusion:
            _diffusion_panel(h, slots)
        else:
            _image_panel(h, slots)
    return demo


def _feature_slots(h: SteerHandlers) -> list[gr.components.Component]:
    """The feature search and, per slot, a feature dropdown and its strength slider (interleaved)."""
    first = h.catalog.choices(h.catalog.find(""))
    with gr.Row():
        query = gr.Textbox(label="Search features by name or number", elem_id="steer-feature-search")
        find = gr.Button("Find features")
    slots: list[gr.components.Component] = []
    with gr.Row():
        for i in range(N_SLOTS):
            with gr.Column():
                slots.append(
                    gr.Dropdown(
                        first,
                        value=first[0][1] if i == 0 and first else None,
                        allow_custom_value=True,
                        label=f"Feature {i + 1}",
                        elem_id=f"steer-feature-{i}",
                    )
                )
                slots.append(
                    gr.Slider(-MAX_STRENGTH, MAX_STRENGTH, value=5.0, step=0.5, label=f"Strength {i + 1}")
                )
    find.click(user_errors(h.find_features), [query], slots[::2], api_name="find_features")
    query.submit(user_errors(h.find_features), [query], slots[::2], api_name=False)
    return slots


def _diffusion_panel(h: SteerHandlers, slots: list[gr.components.Component]) -> None:
    """Prompt, sampler settings, timestep window and optional mask → same-seed samples before/after."""
    encoder, limits = h.encoder, h.settings.limits
    n = schedule_length(encoder) or 1000
    with gr.Row():
        with gr.Column():
            prompt = gr.Textbox(label="Prompt", value="a photo of a cat", elem_id="steer-prompt")
            with gr.Row():
                seed = gr.Number(0, precision=0, label="Seed")
                steps = gr.Slider(
                    1, limits.steps, value=encoder.sampling.num_inference_steps, step=1, label="Steps"
                )
            t_low = gr.Slider(0, n - 1, value=0, step=1, label="Timestep window: from")
            t_high = gr.Slider(0, n - 1, value=n - 1, step=1, label="Timestep window: to")
            run = gr.Button("Steer", variant="primary", elem_id="steer-run")
        mask = mask_editor(
            h.settings,
            label="Optional mask: paint where to steer",
            type="numpy",
            canvas_size=(256, 256),
            height=320,
            sources=(),
            brush=gr.Brush(colors=["#ffffff"]),
            elem_id="steer-mask",
        )
    with gr.Row():
        before = gr.Image(label="Original", height=320, elem_id="steer-before")
        after = gr.Image(label="Steered", height=320, elem_id="steer-after")
    run.click(
        user_errors(as_files(h.steer_diffusion)),
        [prompt, seed, steps, t_low, t_high, mask, *slots],
        [before, after],
        api_name="steer",
    )


def _image_panel(h: SteerHandlers, slots: list[gr.components.Component]) -> None:
    """An image (and a LLaVA prompt or CLIP labels) → the model's output before/after."""
    encoder, limits = h.encoder, h.settings.limits
    llava = encoder.family == "llava"
    with gr.Row():
        with gr.Column():
            image = uploaded_image(
                label="Image", sources=["upload", "clipboard"], height=220, elem_id="steer-image"
            )
            if h.calibration:
                gr.Examples([[p] for p in h.calibration[:8]], [image], label="…or pick one")
            if llava:
                prompt = gr.Textbox(label="Prompt", value="Describe the image.", elem_id="steer-prompt")
                max_new = gr.Slider(1, limits.new_tokens, value=20, step=1, label="Max new tokens")
            else:
                labels = gr.Textbox(
                    label="Zero-shot labels (CLIP)",
                    value=DEFAULT_LABELS,
                    visible=isinstance(encoder, TextEmbedder),
                )
            run = gr.Button("Steer", variant="primary", elem_id="steer-run")
        with gr.Column():
            if llava:
                before = gr.Textbox(label="Original answer", elem_id="steer-before")
                after = gr.Textbox(label="Steered answer", elem_id="steer-after")
                run.click(
                    user_errors(h.steer_llava),
                    [image, prompt, max_new, *slots],
                    [before, after],
                    api_name="steer",
                )
            else:
                with gr.Row():
                    before = gr.Label(label="Original", num_top_classes=4, elem_id="steer-before")
                    after = gr.Label(label="Steered", num_top_classes=4, elem_id="steer-after")
                summary = gr.Markdown()
                run.click(
                    user_errors(h.steer_image),
                    [image, labels, *slots],
                    [before, after, summary],
                    api_name="steer",
                )


__all__ = ["SteerHandlers", "build_steer_app", "mask_from_editor", "top_classes"]
