"""Concept unlearning with SAE features (SAeUron) on a diffusion UNet.

Selection: sample concept prompts and other prompts, record each feature's mean activation per
timestep, normalise each mean vector to sum 1, score = concept − other, keep features scoring above
the `percentile` (and > 0). Sampling: at every step and both CFG halves, where a selected feature
fires above its mean over all prompts, set it to (its mean on the concept) × `multiplier` (< 0),
keeping the SAE error term. The selection is a small JSON beside the SAE.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from mmsae.encoders.base import Encoder
from mmsae.encoders.capabilities import Sampler, require
from mmsae.fileio import atomic_write_bytes
from mmsae.intervene.edits import Edit, EditContext
from mmsae.intervene.fidelity import image_similarity
from mmsae.intervene.intervention import Intervention, Splice, check_compatible, cond_rows, site_edit
from mmsae.intervene.steer import zero_shot_probs
from mmsae.legacy_names import LegacyKwargsMeta, legacy_keys, legacy_kwargs, module_getattr, renamed_from
from mmsae.sae.base import SAE, SparseCodes

SELECTION_NAME = "unlearn_selection.json"


@dataclass
class SampleConfig:
    """How prompts are sampled, for selection and unlearning alike."""

    num_inference_steps: int | None = None
    """None: the encoder's (the model's own unless set: SDXL-Turbo 1 step, SD 50)."""
    guidance_scale: float | None = None
    """None: the encoder's (SDXL-Turbo 0, SD 7.5)."""
    seed: int = 0
    batch_size: int = 4

    def for_encoder(self, encoder: Encoder) -> SampleConfig:
        """These settings with the steps and guidance left None taken from the encoder."""
        own = encoder.sampling
        steps = own.num_inference_steps if self.num_inference_steps is None else self.num_inference_steps
        guidance = own.guidance_scale if self.guidance_scale is None else self.guidance_scale
        return replace(self, num_inference_steps=steps, guidance_scale=guidance)


@renamed_from("features")
@dataclass
class ConceptFeatures(metaclass=LegacyKwargsMeta):
    """Selected features of one concept per timestep, with the means the suppression rule needs."""

    features: dict[int, list[int]]
    mean_concept: dict[int, list[float]]
    mean_all: dict[int, list[float]]


@renamed_from("n_features")
@dataclass
class UnlearnSelection(metaclass=LegacyKwargsMeta):
    hook: str
    encoder: str | None
    n_features: int
    percentile: float
    concepts: dict[str, ConceptFeatures] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """Write atomically; `path` is a file or the SAE directory (then `unlearn_selection.json` in it)."""
        path = Path(path)
        path = path / SELECTION_NAME if path.is_dir() else path
        atomic_write_bytes(path, json.dumps(asdict(self), indent=1).encode())
        return path

    @classmethod
    def load(cls, path: str | Path) -> UnlearnSelection:
        path = Path(path)
        path = path / SELECTION_NAME if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(
                f"No unlearning selection at {path}: run `mmsae unlearn select` (or "
                "mmsae.intervene.unlearn.select_features) first."
            )
        raw = legacy_keys(json.loads(path.read_text()))  # files of earlier versions: old key names
        concepts = {
            name: ConceptFeatures(
                **{key: {int(t): v for t, v in table.items()} for key, table in legacy_keys(c).items()}
            )
            for name, c in raw.pop("concepts").items()
        }
        return cls(**raw, concepts=concepts)

    def check_concepts(self, names: Sequence[str]) -> None:
        unknown = [n for n in names if n not in self.concepts]
        if unknown:
            raise KeyError(
                f"Unknown concept(s) {unknown}: this selection has {sorted(self.concepts)}. "
                "Run select_features for them first."
            )


@legacy_kwargs
def feature_sums(codes: SparseCodes | Tensor, n_features: int) -> Tensor:
    """Σ over tokens of each feature's activation, [n] in fp64 (long runs accumulate many tokens)."""
    if isinstance(codes, SparseCodes):
        sums = torch.zeros(n_features, dtype=torch.float64, device=codes.values.device)
        return sums.index_add_(0, codes.indices.flatten(), codes.values.flatten().double())
    return codes.double().sum(0)


@torch.no_grad()
def timestep_sums(
    encoder: Encoder,
    sae: SAE,
    hook: str,
    prompts: Sequence[str],
    sampling: SampleConfig,
    cond_only: bool = True,
    desc: str = "prompts",
) -> tuple[dict[int, Tensor], dict[int, int]]:
    """Per-timestep feature sums [n] and token counts over sampling runs of `prompts`.

    SAeUron records the conditional CFG half only (`cond_only`)."""
    sampler = require(encoder, Sampler, what="Per-timestep feature statistics")
    sampling = sampling.for_encoder(encoder)
    sums: dict[int, Tensor] = {}
    counts: dict[int, int] = {}

    def record(acts_BTD: Tensor) -> Tensor:
        B, T, D = acts_BTD.shape
        x_BTD = acts_BTD
        if cond_only and sampling.guidance_scale > 1:
            x_BTD = acts_BTD[cond_rows(encoder, hook, B, T).to(acts_BTD.device)]
        x_ND = x_BTD.reshape(-1, D).to(sae.W_dec.dtype)
        t = int(sampler.current_timestep)
        s = feature_sums(sae.encode(x_ND), sae.cfg.n_features)
        sums[t] = sums[t] + s if t in sums else s
        counts[t] = counts.get(t, 0) + x_ND.shape[0]
        return acts_BTD

    with site_edit(encoder, sae, hook, record):  # an SAE on block updates reads out − in
        for start in tqdm(range(0, len(prompts), sampling.batch_size), desc=desc, leave=False):
            sampler.sample(
                list(prompts[start : start + sampling.batch_size]),
                num_inference_steps=sampling.num_inference_steps,
                guidance_scale=sampling.guidance_scale,
                seed=sampling.seed + start,
            )
    return sums, counts


def score_features(mean_concept_n: Tensor, mean_other_n: Tensor) -> Tensor:
    """Normalised mean on concept prompts − normalised mean on other prompts (each mean sums to 1)."""
    return mean_concept_n / mean_concept_n.sum().clamp_min(
        1e-12
    ) - mean_other_n / mean_other_n.sum().clamp_min(1e-12)


def select_features(
    encoder: Encoder,
    sae: SAE,
    concepts: Mapping[str, Sequence[str]],
    other_prompts: Sequence[str],
    percentile: float = 99.99,
    hook: str | None = None,
    sampling: SampleConfig | None = None,
    save_to: str | Path | None = None,
) -> UnlearnSelection:
    """Select each concept's features per timestep. A concept's "other" prompts are `other_prompts` plus
    every other concept's prompts. `save_to` (the SAE directory or a file) writes the JSON atomically."""
    hook = hook or sae.cfg.hook
    if hook is None:
        raise ValueError("The SAE's cfg records no hook point: pass hook='<module path>'.")
    check_compatible(encoder, sae, hook)
    if not 0 < percentile < 100:
        raise ValueError(f"percentile={percentile} must lie strictly between 0 and 100 (SAeUron uses 99.99).")
    if not concepts or any(not p for p in concepts.values()) or not other_prompts:
        raise ValueError("Give every concept at least one prompt, and at least one other (retained) prompt.")
    sampling = (sampling or SampleConfig()).for_encoder(encoder)
    stats = {
        name: timestep_sums(encoder, sae, hook, prompts, sampling, desc=name)
        for name, prompts in concepts.items()
    }
    stats[""] = timestep_sums(encoder, sae, hook, other_prompts, sampling, desc="other prompts")
    timesteps = sorted(stats[""][0])

    def mean_of(names: Sequence[str], t: int) -> Tensor:
        return sum(stats[n][0][t] for n in names) / sum(stats[n][1][t] for n in names)

    selection = UnlearnSelection(hook, sae.cfg.encoder or encoder.id, sae.cfg.n_features, percentile)
    for name in concepts:
        others = [n for n in stats if n != name]
        chosen = ConceptFeatures({}, {}, {})
        for t in timesteps:
            m_concept, m_all = mean_of([name], t), mean_of(list(stats), t)
            score_n = score_features(m_concept, mean_of(others, t))
            threshold = torch.quantile(score_n, percentile / 100)
            features = torch.nonzero((score_n > threshold) & (score_n > 0)).flatten()
            chosen.features[t] = features.tolist()
            chosen.mean_concept[t] = m_concept[features].tolist()
            chosen.mean_all[t] = m_all[features].tolist()
        selection.concepts[name] = chosen
    if save_to is not None:
        selection.save(save_to)
    return selection


@dataclass(frozen=True)
class Suppress(Edit):
    """SAeUron's rule for one feature: where it fires above its all-prompt mean, set mean_concept×multiplier.

    `rules` = ((timestep, mean_concept, mean_all), ...) for the timesteps that selected this feature;
    `recorded` = every timestep of the selection. A sampling timestep maps to the nearest recorded one,
    so a different number of steps than at selection time still works.
    """

    rules: tuple[tuple[int, float, float], ...] = ()
    recorded: tuple[int, ...] = ()
    multiplier: float = -5.0
    op: ClassVar[str] = "suppress"

    def apply(self, f_N: Tensor, ctx: EditContext) -> Tensor:
        if ctx.timestep is None:
            raise RuntimeError("Suppress needs the UNet's current timestep: sample through the encoder.")
        nearest = min(self.recorded, key=lambda t: abs(t - ctx.timestep))
        for t, mean_concept, mean_all in self.rules:
            if t == nearest:
                return torch.where(f_N > mean_all, torch.full_like(f_N, mean_concept * self.multiplier), f_N)
        return f_N


def suppress_edits(selection: UnlearnSelection, concepts: Sequence[str], multiplier: float) -> list[Suppress]:
    """One `Suppress` per selected feature; a feature of two concepts gets the first concept's means."""
    selection.check_concepts(concepts)
    rules: dict[int, dict[int, tuple[int, float, float]]] = {}
    for name in concepts:
        c = selection.concepts[name]
        for t, features in c.features.items():
            for feature, m_c, m_a in zip(features, c.mean_concept[t], c.mean_all[t]):
                rules.setdefault(feature, {}).setdefault(t, (t, m_c, m_a))
    recorded = tuple(sorted({t for name in concepts for t in selection.concepts[name].features}))
    return [
        Suppress(feature, tuple(by_t.values()), recorded, multiplier)
        for feature, by_t in sorted(rules.items())
    ]


class Unlearner:
    """Sample from a UNet with concepts suppressed.

    `Unlearner(encoder, sae, selection, ["cat"]).generate(prompts)`
    """

    def __init__(
        self,
        encoder: Encoder,
        sae: SAE,
        selection: UnlearnSelection | str | Path,
        concepts: Sequence[str] | None = None,
        multiplier: float = -5.0,
    ):
        self.sampler = require(encoder, Sampler, what="Concept unlearning")
        if not isinstance(selection, UnlearnSelection):
            selection = UnlearnSelection.load(selection)
        if selection.n_features != sae.cfg.n_features:
            raise ValueError(
                f"The selection was made for an SAE with {selection.n_features} features, this one has "
                f"{sae.cfg.n_features}: select features with this SAE."
            )
        if not (math.isfinite(multiplier) and multiplier < 0):  # NaN passes `multiplier >= 0`
            raise ValueError(f"multiplier={multiplier} must be negative and finite (SAeUron uses −1 … −30).")
        self.encoder, self.sae, self.selection = encoder, sae, selection
        self.concepts = list(concepts) if concepts is not None else list(selection.concepts)
        self.splice = Splice(sae, suppress_edits(selection, self.concepts, multiplier), hook=selection.hook)
        self.intervention = Intervention(encoder, self.splice)  # validates hook/encoder now, not mid-sampling

    def generate(
        self, prompts: Sequence[str], sampling: SampleConfig | None = None, **sample: Any
    ) -> list[Image.Image]:
        sampling = (sampling or SampleConfig()).for_encoder(self.encoder)
        with self.intervention:
            return self.sampler.sample(
                list(prompts),
                num_inference_steps=sampling.num_inference_steps,
                guidance_scale=sampling.guidance_scale,
                seed=sampling.seed,
                **sample,
            )


def clip_concept_classifier(
    clip: Encoder, concept: str, others: Sequence[str], template: str = "a photo of a {}."
) -> Callable[[list[Image.Image]], Tensor]:
    """A zero-shot CLIP check: does each image look more like `concept` than any of `others`? → bool [B]."""
    from mmsae.intervene.steer import image_outputs, to_pixels

    labels = [concept, *others]

    def classify(images: list[Image.Image]) -> Tensor:
        probs_BL = zero_shot_probs(clip, image_outputs(clip, to_pixels(clip, images)), labels, template)
        return probs_BL.argmax(-1) == 0

    return classify


@dataclass
class UnlearnReport:
    retained_similarity: float
    """Mean similarity of retained-prompt generations with and without unlearning (1 = untouched)."""
    concept_rate_before: float | None = None
    """Share of concept-prompt generations the classifier flags, without / with unlearning."""
    concept_rate_after: float | None = None


def evaluate_unlearning(
    unlearner: Unlearner,
    concept_prompts: Sequence[str],
    retained_prompts: Sequence[str],
    classifier: Callable[[list[Image.Image]], Tensor] | None = None,
    sampling: SampleConfig | None = None,
    similarity_encoder: Encoder | None = None,
) -> UnlearnReport:
    """Retained-prompt image similarity, and with a `classifier` (images → bool [B]) the concept rate."""
    sampling = (sampling or SampleConfig()).for_encoder(unlearner.encoder)
    kw = dict(
        num_inference_steps=sampling.num_inference_steps,
        guidance_scale=sampling.guidance_scale,
        seed=sampling.seed,
    )
    retained_before = unlearner.sampler.sample(list(retained_prompts), **kw)
    retained_after = unlearner.generate(retained_prompts, sampling)
    report = UnlearnReport(
        float(image_similarity(retained_before, retained_after, similarity_encoder).mean())
    )
    if classifier is not None:
        report.concept_rate_before = float(
            classifier(unlearner.sampler.sample(list(concept_prompts), **kw)).float().mean()
        )
        report.concept_rate_after = float(
            classifier(unlearner.generate(concept_prompts, sampling)).float().mean()
        )
    return report


__all__ = [
    "SELECTION_NAME",
    "ConceptFeatures",
    "SampleConfig",
    "Suppress",
    "UnlearnReport",
    "UnlearnSelection",
    "Unlearner",
    "clip_concept_classifier",
    "evaluate_unlearning",
    "score_features",
    "select_features",
    "suppress_edits",
    "timestep_sums",
]

__getattr__ = module_getattr(__name__)  # old public names (mmsae.legacy_names)
