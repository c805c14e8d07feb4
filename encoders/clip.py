"""OpenCLIP, every architecture family open_clip lists: hooks in both towers, pooled embeddings, text.

Towers (ViT, timm trunks, ModifiedResNet; open_clip or Hugging Face text encoders) are described in
`clip_towers`; this module builds the model a spec names and runs it.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.utils import to_2tuple
from torch import Tensor, nn

from mmsae.encoders.base import Encoder, TokenMode, default_select
from mmsae.encoders.capabilities import ImageEmbedder, TextEmbedder
from mmsae.encoders.clip_towers import HookLayout, image_layouts, text_layouts, text_tower
from mmsae.encoders.weights import WeightsUnavailableError, hf_cache_dir, hub_access, weights_error

TINY_CONFIG = Path(__file__).with_name("mmsae-clip-tiny.json")  # shipped as package data
TINY_NAME = TINY_CONFIG.stem
# open_clip's per-tag pretrained config: preprocessing settings → create_model_and_transforms arguments.
TAG_PREPROCESS = {
    "mean": "image_mean",
    "std": "image_std",
    "interpolation": "image_interpolation",
    "resize_mode": "image_resize_mode",
}
TAG_SOURCES = ("url", "hf_hub", "file")  # where the weights come from: no effect on the model built


def tag_build_kwargs(arch: str, tag: str) -> dict[str, Any]:
    """The `create_model_and_transforms` arguments pretrained tag `tag` needs (QuickGELU, preprocessing).

    Applied with and without weights, so a random-init stand-in has the architecture and preprocessing
    of the pretrained model (open_clip itself only warns when the activation does not match the tag)."""
    cfg = open_clip.get_pretrained_cfg(arch, tag) if tag else {}
    unknown = sorted(set(cfg) - set(TAG_PREPROCESS) - set(TAG_SOURCES) - {"quick_gelu"})
    if unknown:
        warnings.warn(
            f"open_clip's pretrained config for {arch}/{tag} carries settings mmsae does not apply: "
            f"{unknown}; the model may differ from the one the weights were trained with.",
            stacklevel=2,
        )
    kw = {TAG_PREPROCESS[k]: v for k, v in cfg.items() if k in TAG_PREPROCESS}
    if cfg.get("quick_gelu"):
        kw["force_quick_gelu"] = True
    return kw


def _may_use_hub(arch: str, tag: str, pretrained: bool, has_schema: bool) -> bool:
    """Whether building may contact the hub: weights from a tag, an hf-hub config, an HF text tower."""
    if arch.startswith("hf-hub:") or (pretrained and not has_schema and not os.path.isfile(tag)):
        return True
    text_cfg = (open_clip.get_model_config(arch) or {}).get("text_cfg", {}) if not has_schema else {}
    names = [text_cfg.get(k) for k in ("hf_model_name", "hf_tokenizer_name")]
    return any(n and not os.path.isdir(n) for n in names)


def _weights_source(arch: str, tag: str, name: str) -> str:
    """What a user downloads for `arch/tag`: the hub repo of the tag, else the spec itself."""
    if os.path.exists(tag):
        return tag
    hf_hub = open_clip.get_pretrained_cfg(arch, tag).get("hf_hub", "") if tag else ""
    return os.path.split(hf_hub)[0] if hf_hub else name


class ClipEncoder(Encoder, ImageEmbedder, TextEmbedder):
    """An open_clip model. Hooks (module paths): image blocks or stages (`visual.transformer.resblocks.{i}`,
    `visual.trunk.blocks.{i}`, `visual.trunk.stages.{i}`, `visual.layer{i}` …), `visual` (pooled and
    projected, 1 token), text blocks (`transformer.resblocks.{i}`, `text.transformer.encoder.layer.{i}` …),
    `ln_final` and, for towers kept in `.text`, `text` (the pooled text embedding).

    Batches are images (PIL list or pixels [B, 3, H, W]) for image hooks, a list of strings for text hooks.
    """

    family = "clip"

    def __init__(self, model: nn.Module, preprocess: Any, tokenizer: Any, id: str):
        super().__init__(model, id)
        self.image_pipeline = preprocess  # open_clip's own; its first step converts modes to RGB
        self.tokenizer = tokenizer
        text, _ = text_tower(model)
        proj = getattr(model, "text_projection", None)
        self.embed_dim: int = int(
            getattr(model.visual, "output_dim", None)
            or getattr(text, "output_dim", None)
            or (proj.out_features if isinstance(proj, nn.Linear) else proj.shape[-1])
        )
        self.image_size: tuple[int, int] = tuple(to_2tuple(model.visual.image_size))
        self._text_pool_type: str = getattr(model, "text_pool_type", getattr(text, "pool_type", "argmax"))
        if getattr(text, "cls_emb", None) is not None:  # CoCa pools its appended CLS token, the last one
            self._text_pool_type = "last"
        self._text_eos_id: int | None = getattr(model, "text_eos_id", getattr(text, "eos_id", None))
        self._pad_id: int = getattr(getattr(text, "config", None), "pad_token_id", None) or 0
        self._text_BL: Tensor | None = None  # token ids of the text batch being run, for pooling
        self.layouts: dict[str, HookLayout] = {**image_layouts(model.visual), **text_layouts(model)}
        image_blocks = [
            h for h, lay in self.layouts.items() if lay.tower == "image" and lay.pool != "embedding"
        ]
        self.default_hook = image_blocks[max(len(image_blocks) - 2, 0)] if image_blocks else "visual"

    @classmethod
    def from_spec(
        cls, name: str, pretrained: bool = True, cache_dir: str | None = None, **kw: Any
    ) -> ClipEncoder:
        """`name`: 'ViT-B-32/openai' (architecture/tag), 'ViT-B-32//path/weights.safetensors' (local file),
        'hf-hub:org/repo', 'local-dir:/path' or 'tiny' (the bundled tiny config).

        A tag's own settings (QuickGELU, preprocessing) apply also with pretrained=False."""
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
        build_kw = {**(tag_build_kwargs(arch, tag) if not has_schema else {}), **kw}
        if not pretrained:  # random init throughout: open_clip would fetch an HF text tower's own weights
            build_kw.setdefault("pretrained_text", False)
        guard = hub_access() if _may_use_hub(arch, tag, pretrained, has_schema) else contextlib.nullcontext()
        try:
            with guard:
                model, _, preprocess = open_clip.create_model_and_transforms(
                    arch,
                    pretrained=tag if pretrained else None,
                    load_weights=pretrained,
                    cache_dir=cache_dir,
                    **build_kw,
                )
                tokenizer = open_clip.get_tokenizer(arch)
        except OSError as err:  # random init, yet a tokenizer or HF text-tower config is not cached
            if pretrained:
                raise weights_error(f"clip:{name}", _weights_source(arch, tag, name), err) from err
            raise WeightsUnavailableError(
                f"clip:{name} needs files even with pretrained=False (its tokenizer or Hugging Face "
                f"text-tower config), not found locally nor downloadable: {type(err).__name__}: {err}\n"
                f"Fetch them once with network (they are kept in {hf_cache_dir()}), or use a local config."
            ) from err
        except RuntimeError as err:  # open_clip wraps failed downloads of the weights in RuntimeError
            if not pretrained:
                raise
            raise weights_error(f"clip:{name}", _weights_source(arch, tag, name), err) from err
        return cls(model, preprocess, tokenizer, f"clip:{name}")

    # ---------------------------------------------------------------- hooks
    def hook_points(self) -> list[str]:
        return list(self.layouts)

    def is_text_hook(self, hook: str) -> bool:
        return self.layouts[hook].tower == "text" if hook in self.layouts else not hook.startswith("visual")

    def to_tokens(self, hook: str, output: Any) -> Tensor:
        lay = self.layouts[hook]
        out = output[0] if isinstance(output, (tuple, list)) else output
        if lay.channels_last and out.ndim == 4:  # [B, H, W, C] → [B, H·W, C]
            return out.flatten(1, 2)
        acts = super().to_tokens(hook, output)
        return acts.transpose(0, 1) if lay.seq_first else acts

    def from_tokens(self, hook: str, tokens_BTD: Tensor, like: Any) -> Any:
        lay = self.layouts[hook]
        out = like[0] if isinstance(like, (tuple, list)) else like
        if lay.channels_last and out.ndim == 4:
            new = tokens_BTD.reshape(out.shape).to(out.dtype)
            return (
                (new, *like[1:])
                if isinstance(like, tuple)
                else [new, *like[1:]]
                if isinstance(like, list)
                else new
            )
        return super().from_tokens(hook, tokens_BTD.transpose(0, 1) if lay.seq_first else tokens_BTD, like)

    def prefix_tokens(self, hook: str) -> int:
        return self.layouts[hook].n_prefix

    def select_tokens(self, hook: str, acts_BTD: Tensor, mode: TokenMode) -> tuple[Tensor, Tensor]:
        lay = self.layouts[hook]
        family = f"{self.family} {lay.tower}"
        if lay.pool == "embedding":  # already the pooled, projected embedding: one token
            if mode not in ("all", "pooled", "mean"):
                raise ValueError(
                    f"Hook {hook!r} is the pooled embedding (1 token); tokens={mode!r} does not "
                    "apply. Use 'pooled' here or a block hook of the same tower."
                )
            return acts_BTD, torch.full((1,), -1, dtype=torch.long)
        if mode != "pooled":
            return default_select(acts_BTD, mode, n_prefix=lay.n_prefix, family=family, n_cls=lay.n_cls)
        if lay.pool in ("cls", "mean"):
            return default_select(acts_BTD, lay.pool, n_prefix=lay.n_prefix, family=family, n_cls=lay.n_cls)
        if lay.pool == "text":  # the token the text tower pools (EOT for CLIP), per example
            idx_B = self._text_pool_index(acts_BTD.shape[1]).to(acts_BTD.device)
            return acts_BTD[torch.arange(len(idx_B), device=acts_BTD.device), idx_B][:, None], idx_B[:, None]
        if lay.pool == "masked_mean":  # HF mean pooler: the mean over non-padding tokens
            mask_BT1 = (self._text_BL != self._pad_id).to(acts_BTD)[:, : acts_BTD.shape[1], None]
            pooled_B1D = (acts_BTD * mask_BT1).sum(1, keepdim=True) / mask_BT1.sum(1, keepdim=True)
            return pooled_B1D, torch.full((1,), -1, dtype=torch.long, device=acts_BTD.device)
        pooled_hook = "visual" if lay.tower == "image" else ("text" if "text" in self.layouts else "ln_final")
        raise ValueError(
            f"tokens='pooled' does not apply to {hook!r}: this {type(self.model).__name__} pools its "
            f"{lay.tower} tower with attention, not by picking a token. Use the {pooled_hook!r} hook for the "
            "pooled embedding, or tokens='mean' / 'all'."
        )

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

    def logit_scale(self) -> float:
        """The model's learned zero-shot temperature (100 for towers trained without one)."""
        scale = getattr(self.model, "logit_scale", None)  # an optional parameter of open_clip models
        return float(scale.exp()) if scale is not None else 100.0
