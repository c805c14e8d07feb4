"""What an encoder can do beyond recording activations, declared by the class.

Every `Encoder` records and edits activations at its hook points. Some model families can do more:
CLIP embeds images and texts in one space, a timm classifier has a head, LLaVA writes answers, a
diffusion UNet samples images. Each such ability is one abstract mixin below; an encoder class declares
what it has by listing the mixins among its bases (`class ClipEncoder(Encoder, ImageEmbedder,
TextEmbedder)`), and the code that needs an ability asks for it by name:

    embedder = require(encoder, ImageEmbedder, what="concept search")

which returns the encoder or raises `MissingCapabilityError` naming the missing capability, the encoder,
and which encoders have it. Dispatch is `isinstance(encoder, Capability)`, never a probe for a method.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, ClassVar, TypeVar

from torch import Tensor

from mmsae.encoders.base import Encoder


class Capability(abc.ABC):  # noqa: B024 (a common base: each capability adds its abstract methods)
    """Base of the capability mixins: `summary` says what the ability is, `examples` who has it."""

    summary: ClassVar[str] = ""
    examples: ClassVar[str] = ""


class ImageEmbedder(Capability):
    """Images → unit embeddings in a joint image–text space (CLIP's image tower)."""

    summary = "an encoder that embeds images (encode_image)"
    examples = "a CLIP encoder, clip:..."
    embed_dim: int

    @abc.abstractmethod
    def encode_image(self, pixels_BCHW: Tensor, normalize: bool = True) -> Tensor:
        """Image embeddings [B, E] (unit-norm when `normalize`)."""


class TextEmbedder(Capability):
    """Texts → embeddings in the same space as the images (CLIP's text tower); zero-shot labels."""

    summary = "an encoder with a text tower (encode_text)"
    examples = "a CLIP encoder, clip:..."
    embed_dim: int

    @abc.abstractmethod
    def encode_text(self, texts: list[str], normalize: bool = True) -> Tensor:
        """Text embeddings [B, E] of a list of strings (unit-norm when `normalize`)."""

    def logit_scale(self) -> float:
        """The temperature of zero-shot classification: logits = scale · cos(image, text)."""
        return 100.0


class Classifier(Capability):
    """A classification head: class logits from images, or from the activations at a hook point."""

    summary = "an encoder with a classification head (classify, logits_from_hook)"
    examples = "a timm model with its head, timm:..."
    class_names: list[str]

    @abc.abstractmethod
    def classify(self, batch: Any) -> Tensor:
        """Class logits [B, K] of images (PIL list or pixels)."""

    @abc.abstractmethod
    def logits_from_hook(self, hook: str, acts: Tensor) -> Tensor:
        """Class logits from activations at `hook`, running the rest of the model (differentiable)."""


class Generator(Capability):
    """Text generation conditioned on images (a vision-language model)."""

    summary = "a vision-language encoder that writes answers (generate)"
    examples = "a LLaVA encoder, llava:..."

    @abc.abstractmethod
    def generate(
        self, images: Sequence[Any], prompt: str | Sequence[str], max_new_tokens: int = 20, **generate_kw: Any
    ) -> list[str]:
        """Answers (new text only), one per image."""


class Sampler(Capability):
    """A diffusion encoder: samples images from prompts; its hooks run once per sampling step.

    `current_timestep` is the timestep of the UNet call being run (−1 before the first), `sampling` the
    default sampler settings (num_inference_steps, guidance_scale, …), `pipe` the diffusers pipeline.
    """

    summary = "a diffusion encoder that samples images (sample)"
    examples = "a diffusion encoder, unet:..."
    current_timestep: int
    sampling: Any
    pipe: Any

    @abc.abstractmethod
    def sample(self, prompts: Sequence[str], **sampling: Any) -> list[Any]:
        """Generated PIL images, one per prompt; keyword overrides of the sampler settings."""

    def schedule_length(self) -> int:
        """Number of training timesteps of the scheduler (valid timesteps are 0 .. n − 1)."""
        return int(self.pipe.scheduler.config.num_train_timesteps)


class UpdateEditor(Capability):
    """Edits of a block's update (output − input), for SAEs trained on updates (site='update')."""

    summary = "an encoder that can splice block updates (edit_update)"
    examples = "a diffusion encoder, unet:..."

    @abc.abstractmethod
    def edit_update(
        self, hook: str, fn: Callable[[Tensor], Tensor]
    ) -> AbstractContextManager[Iterator[None]]:
        """Within the block, `hook`'s update u = out − in is replaced by fn(u)."""


C = TypeVar("C", bound=Capability)


class MissingCapabilityError(TypeError, ValueError):
    """An encoder was asked for something its class does not declare. A ValueError too, as the argument
    checks it replaces were."""


def require(encoder: Encoder, capability: type[C], what: str, hint: str = "") -> C:
    """`encoder` as a `capability`, or a MissingCapabilityError naming what needs it and what is missing."""
    if isinstance(encoder, capability):
        return encoder
    raise MissingCapabilityError(
        f"{what} needs {capability.summary}: capability {capability.__name__}, which e.g. "
        f"{capability.examples} has; {encoder.id!r} ({encoder.family}) does not declare it."
        + (f" {hint}" if hint else "")
    )


def capabilities(encoder: Encoder) -> list[str]:
    """Names of the capabilities `encoder`'s class declares (for messages and listings)."""
    return [c.__name__ for c in CAPABILITIES if isinstance(encoder, c)]


CAPABILITIES: tuple[type[Capability], ...] = (
    ImageEmbedder,
    TextEmbedder,
    Classifier,
    Generator,
    Sampler,
    UpdateEditor,
)
