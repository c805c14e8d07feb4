"""(image, prompt) pairs for models that read both, e.g. LLaVA: every image of a data set with each prompt.

Spec strings (`load_dataset`): "<image data set spec>+prompt:<text>" pairs every image with one prompt,
"<image data set spec>+prompts:<file.txt or bundled name>" with each prompt of a list, e.g.
"skimage+prompt:Describe the image." or "folder:photos+prompts:questions.txt".
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

from mmsae.datasets.images import PROMPTS_DIR, Example, ExampleDataset, PromptList

_PROMPT_SPEC = re.compile(r"^(?P<images>.+?)\+(?P<kind>prompts?):(?P<arg>.+)$", re.DOTALL)


class ImagePrompts(ExampleDataset):
    """Each image of `images` with each prompt, image-major: item i is image i // P with prompt i % P.

    Items carry both `image` and `text` (the prompt). A single prompt gives one item per image.
    """

    kind = "image"

    def __init__(self, images: ExampleDataset, prompts: str | Sequence[str]):
        if images.kind != "image":
            raise ValueError(f"ImagePrompts needs an image data set, got {images.describe()}.")
        self.images = images
        self.prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not self.prompts or not all(isinstance(p, str) and p.strip() for p in self.prompts):
            raise ValueError(
                f"ImagePrompts needs at least one non-empty prompt string, got {self.prompts!r}."
            )

    def __len__(self) -> int:
        return len(self.images) * len(self.prompts)

    def __getitem__(self, index: int) -> Example:
        self._check_index(index)
        image_index, prompt_index = divmod(index, len(self.prompts))
        image = self.images[image_index].image  # UnreadableExample propagates: extraction skips it
        return Example(index, image=image, text=self.prompts[prompt_index])

    def source(self, index: int) -> str:
        image_index, prompt_index = divmod(index, len(self.prompts))
        return f"{self.images.source(image_index)} with prompt {self.prompts[prompt_index][:60]!r}"

    def fingerprint(self) -> str:
        digest = hashlib.sha256(b"image-prompts")
        for prompt in self.prompts:
            digest.update(prompt.encode() + b"\0")
        digest.update(self.images.fingerprint().encode())
        return digest.hexdigest()

    def describe(self) -> str:
        return f"ImagePrompts({self.images.describe()} × {len(self.prompts)} prompts)"


def is_image_prompt_spec(spec: str) -> bool:
    return _PROMPT_SPEC.match(spec) is not None


def load_image_prompts(spec: str) -> ImagePrompts:
    """`<image spec>+prompt:<text>` or `<image spec>+prompts:<file.txt or bundled name>`."""
    from mmsae.datasets.images import load_dataset

    match = _PROMPT_SPEC.match(spec)
    if match is None:
        raise ValueError(
            f"Data set spec {spec!r} is not an (image, prompt) spec; write e.g. "
            "'skimage+prompt:Describe the image.' or 'folder:PATH+prompts:questions.txt'."
        )
    images = load_dataset(match["images"])
    if match["kind"] == "prompt":
        return ImagePrompts(images, match["arg"])
    arg = match["arg"]
    bundled = PROMPTS_DIR / f"{arg}.txt"
    prompts = PromptList(arg if Path(arg).is_file() or not bundled.is_file() else bundled)
    return ImagePrompts(images, prompts.prompts)
