"""OpenCLIP: image-tower residual stream, the pooled post-projection embedding, and the text tower."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import Tensor, nn

from mmsae.encoders.base import Encoder, TokenMode, default_select
from mmsae.encoders.weights import weights_error

TINY_CONFIG = Path(__file__).with_name("mmsae-clip-tiny.json")  # shipped as package data
TINY_NAME = TINY_CONFIG.stem


def _text_tower(model: nn.Module) -> nn.Module:
    """The module holding the text transformer: CLIP keeps it on the model, CustomTextCLIP in `.text`."""
    return model if hasattr(model, "transformer") else model.text


class ClipEncoder(Encoder):
    """An open_clip model. Hooks: `visual.transformer.resblocks.{i}`, `visual` (pooled, projected, 1 token),
    text `transformer.resblocks.{i}` (`text.transformer...` for CustomTextCLIP) and `ln_final`.

    Batches are images (PIL list or pixels [B, 3, H, W]) for image hooks, a list of strings for text hooks.
    """

    family = "clip"

    def __init__(self, model: nn.Module, preprocess: Any, tokenizer: Any, id: str):
        super().__init__(model, id)
        self.image_pipeline = preprocess  # open_clip's own; its first step converts modes to RGB
        self.tokenizer = tokenizer
        self.embed_dim: int = (
            model.text_projection.shape[-1] if hasattr(model, "text_projection") else model.visual.output_dim
        )
        self.image_size: tuple[int, int] = tuple(model.visual.image_size)
        text = _text_tower(model)
        self._text_prefix = "" if text is model else "text."
        self._text_pool_type: str = getattr(model, "text_pool_type", getattr(text, "pool_type", "argmax"))
        self._text_eos_id: int | None = getattr(model, "text_eos_id", getattr(text, "eos_id", None))
        self._text_BL: Tensor | None = None  # token ids of the text batch being run, for EOT pooling
        n_visual = len(model.visual.transformer.resblocks)
        # open_clip 3.x runs its transformers batch-first; older configs ran blocks on [T, B, D].
        self._seq_first_hooks = {
            f"{owner}.resblocks.{i}"
            for owner, tf in (
                ("visual.transformer", model.visual.transformer),
                (f"{self._text_prefix}transformer", text.transformer),
            )
            if not getattr(tf, "batch_first", True)
            for i in range(len(tf.resblocks))
        }
        self.default_hook = f"visual.transformer.resblocks.{max(n_visual - 2, 0)}"

    @classmethod
    def from_spec(
        cls, name: str, pretrained: bool = True, cache_dir: str | None = None, **kw: Any
    ) -> ClipEncoder:
        """`name`: 'ViT-B-32/openai' (architecture/tag), 'ViT-B-32//path/weights.safetensors' (local file),
        'hf-hub:org/repo', 'local-dir:/path' or 'tiny' (the bundled tiny config)."""
        if name == "tiny":
            open_clip.add_model_config(TINY_CONFIG)
            name = TINY_NAME
        has_schema = name.startswith(("hf-hub:", "local-dir:"))
        arch, _, tag = (name, "", "") if has_schema else name.partition("/")
        if pretrained and not has_schema and not tag:
            tags = [t for a, t in open_clip.list_pretrained() if a == arch]
            raise ValueError(
                f"clip:{name} names no weights; use 'clip:{arch}/<tag>' with a tag from {tags}, "
                "a local file 'clip:ARCH//path/to/weights', or pretrained=False."
            )
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                arch,
                pretrained=tag if pretrained else None,
                load_weights=pretrained,
                cache_dir=cache_dir,
                **kw,
            )
        except (OSError, RuntimeError) as err:  # hub download / cache miss
            if not pretrained:
                raise
            raise weights_error(f"clip:{name}", tag if os.path.exists(tag) else name, err) from err
        return cls(model, preprocess, open_clip.get_tokenizer(arch), f"clip:{name}")

    # ---------------------------------------------------------------- hooks
    def hook_points(self) -> list[str]:
        n_visual = len(self.model.visual.transformer.resblocks)
        n_text = len(_text_tower(self.model).transformer.resblocks)
        visual = [f"visual.transformer.resblocks.{i}" for i in range(n_visual)]
        text_blocks = [f"{self._text_prefix}transformer.resblocks.{i}" for i in range(n_text)]
        return [*visual, "visual", *text_blocks, f"{self._text_prefix}ln_final"]

    def is_text_hook(self, hook: str) -> bool:
        return not hook.startswith("visual")

    def to_tokens(self, hook: str, output: Any) -> Tensor:
        acts = super().to_tokens(hook, output)
        return acts.transpose(0, 1) if hook in self._seq_first_hooks else acts

    def from_tokens(self, hook: str, tokens_BTD: Tensor, like: Any) -> Any:
        seq_first = hook in self._seq_first_hooks
        return super().from_tokens(hook, tokens_BTD.transpose(0, 1) if seq_first else tokens_BTD, like)

    def prefix_tokens(self, hook: str) -> int:
        return 0 if hook == "visual" or self.is_text_hook(hook) else 1  # the visual CLS token

    def select_tokens(self, hook: str, acts_BTD: Tensor, mode: TokenMode) -> tuple[Tensor, Tensor]:
        if hook == "visual":  # already the pooled, projected embedding: one token
            if mode not in ("all", "pooled", "mean"):
                raise ValueError(
                    f"Hook 'visual' is the pooled embedding (1 token); tokens={mode!r} does not "
                    "apply. Use 'pooled' here or a `visual.transformer.resblocks.{i}` hook."
                )
            return acts_BTD, torch.full((1,), -1, dtype=torch.long)
        if not self.is_text_hook(hook):
            if mode == "pooled" and self.model.visual.pool_type == "tok":
                mode = "cls"
            return default_select(acts_BTD, mode, n_prefix=1, family=self.family)
        if mode == "pooled":  # the token the text tower pools (EOT for CLIP), per example
            idx_B = self._text_pool_index(acts_BTD.shape[1]).to(acts_BTD.device)
            return acts_BTD[torch.arange(len(idx_B), device=acts_BTD.device), idx_B][:, None], idx_B[:, None]
        return default_select(acts_BTD, mode, n_prefix=0, family=f"{self.family} text")

    def _text_pool_index(self, T: int) -> Tensor:
        """Position open_clip's `text_global_pool` reads, per example ([B])."""
        text_BL = self._text_BL
        if self._text_pool_type == "first":
            return torch.zeros(len(text_BL), dtype=torch.long)
        if self._text_pool_type == "last":
            return torch.full((len(text_BL),), T - 1, dtype=torch.long)
        if self._text_pool_type == "eos":
            return (text_BL == self._text_eos_id).int().argmax(-1).cpu()
        return text_BL.argmax(-1).cpu()

    # ---------------------------------------------------------------- running
    def run_model(self, batch: Any) -> Tensor:
        if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], str):
            return self.encode_text(list(batch), normalize=False)
        return self.encode_image(self.pixels(batch, self.image_size), normalize=False)

    def encode_image(self, pixels_BCHW: Tensor, normalize: bool = True) -> Tensor:
        """Image embeddings [B, E] (unit-norm when `normalize`)."""
        return self.model.encode_image(self.pixels(pixels_BCHW, self.image_size), normalize=normalize)

    def encode_text(self, texts: list[str], normalize: bool = True) -> Tensor:
        """Text embeddings [B, E] of a list of strings (unit-norm when `normalize`)."""
        if isinstance(texts, str):
            raise TypeError("encode_text takes a list of strings, got one string; wrap it: [text].")
        self._text_BL = self.tokenizer(texts).to(self.device)
        return self.model.encode_text(self._text_BL, normalize=normalize)
