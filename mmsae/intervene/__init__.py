"""Interventions: splice SAEs into models, edit features, steer, unlearn.

`Intervention` + `Splice` are the mechanism (intervention.py), edits are in edits.py; the
applications compose them: image/LLaVA/diffusion steering (steer.py), text-embedding steering
(text_steer.py), SAeUron unlearning (unlearn.py), spliced fidelity (fidelity.py).
"""

from mmsae.intervene.edits import (
    Add,
    Clamp,
    Direction,
    Edit,
    EditContext,
    Scale,
    Set,
    SetMax,
    Zero,
    parse_edit,
)
from mmsae.intervene.fidelity import ImageFidelity, generation_fidelity, image_fidelity, image_similarity
from mmsae.intervene.intervention import Intervention, Splice, apply_edits
from mmsae.intervene.steer import (
    GenerationSteerResult,
    ImageSteerResult,
    max_activations,
    steer_diffusion,
    steer_image,
    steer_llava,
)
from mmsae.intervene.text_steer import steer_prompts
from mmsae.intervene.unlearn import SampleConfig, Unlearner, UnlearnSelection, select_features

__all__ = [
    "Add",
    "Clamp",
    "Direction",
    "Edit",
    "EditContext",
    "GenerationSteerResult",
    "ImageFidelity",
    "ImageSteerResult",
    "Intervention",
    "SampleConfig",
    "Scale",
    "Set",
    "SetMax",
    "Splice",
    "UnlearnSelection",
    "Unlearner",
    "Zero",
    "apply_edits",
    "generation_fidelity",
    "image_fidelity",
    "image_similarity",
    "max_activations",
    "parse_edit",
    "select_features",
    "steer_diffusion",
    "steer_image",
    "steer_llava",
    "steer_prompts",
]
