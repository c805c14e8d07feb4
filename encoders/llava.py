"""LLaVA (transformers `LlavaForConditionalGeneration`): the vision layer LLaVA reads, LLM decoder layers.

Batches are processor outputs (a mapping with input_ids, attention_mask, pixel_values) or `(images, prompts)`;
prompts without "<image>" go through the checkpoint's chat template (`format_prompt`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from mmsae.encoders.base import Capture, Encoder, TokenActs, TokenMode, default_select
from mmsae.encoders.capabilities import Generator
from mmsae.encoders.tiny_tokenizer import tiny_clip_tokenizer
from mmsae.encoders.weights import hub_access, weights_error

IMAGE_TOKEN = "<image>"


def _layer_list(model: nn.Module, suffixes: Sequence[str]) -> str:
    """Path of the first ModuleList whose path ends with one of `suffixes` (paths moved across versions)."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name.endswith(tuple(suffixes)):
            return name
    raise ValueError(f"No layer list ending in {suffixes} in {type(model).__name__}.")


@dataclass(frozen=True)
class ProcessorPixels:
    """The processor's image half as a picklable callable (the encoder's `image_pipeline`):
    PIL image → pixel_values [3, H, W]."""

    image_processor: Any

    def __call__(self, image: Any) -> Tensor:
        return self.image_processor(image, return_tensors="pt")["pixel_values"][0]


def format_prompt(processor: Any, prompt: str) -> str:
    """The text LLaVA reads for one image and `prompt`: as written if it places "<image>" itself; else
    the checkpoint's chat template for one user turn (image, then the prompt) and the assistant's cue, as
    in use (llava-1.5: "USER: <image>\\n... ASSISTANT:"); "<image>\\n" + prompt without a template."""
    if IMAGE_TOKEN in prompt:
        return prompt
    if processor.chat_template:
        turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    return f"{IMAGE_TOKEN}\n{prompt}"


@dataclass(frozen=True)
class ProcessorInputs:
    """The processor as a picklable per-example pipeline (the encoder's `pair_pipeline`): LLaVA's
    processor reads image and prompt together, since it expands "<image>" into one token per image
    feature. Batches are right-padded, so a token's column is its position in its own example."""

    processor: Any

    def __call__(self, image: Any, prompt: str) -> dict[str, Tensor]:
        out = self.processor(
            images=[image], text=[format_prompt(self.processor, prompt)], return_tensors="pt"
        )
        return {k: v[0] for k, v in out.items()}

    def collate(self, examples: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        text = [{k: v for k, v in ex.items() if k != "pixel_values"} for ex in examples]
        batch = dict(self.processor.tokenizer.pad(text, padding_side="right", return_tensors="pt"))
        batch["pixel_values"] = torch.stack([ex["pixel_values"] for ex in examples])
        return batch


class LlavaEncoder(Encoder, Generator):
    """Hooks: vision layers `model.vision_tower.encoder.layers.{i}` (default: the one LLaVA reads,
    `config.vision_feature_layer`), `model.multi_modal_projector`, LLM `model.language_model.layers.{i}`.

    LLM hooks never return padding: "all" = every position the attention mask keeps, "image" = the
    positions holding the projected image features, "text" = the others (prompt tokens, BOS), an int =
    that position of each example's own sequence, "mean" = the mean over kept positions. Their
    `token_index` is the column in the batch's `input_ids`: the position in the example's own sequence
    for right-padded batches (extraction pads right), shifted by the padding for left-padded ones.
    """

    family = "llava"

    def __init__(self, model: LlavaForConditionalGeneration, processor: LlavaProcessor, id: str):
        super().__init__(model, id)
        self.processor = processor
        self.image_pipeline = ProcessorPixels(processor.image_processor)
        self.pair_pipeline = ProcessorInputs(processor)
        self.vision_layers = _layer_list(
            model, ("vision_tower.encoder.layers", "vision_model.encoder.layers")
        )
        self.llm_layers = _layer_list(model, ("language_model.layers", "language_model.model.layers"))
        self.projector = next(n for n, _ in model.named_modules() if n.endswith("multi_modal_projector"))
        n_vision = len(model.get_submodule(self.vision_layers))
        self.default_hook = f"{self.vision_layers}.{self.read_layer(n_vision)}"
        self._input_ids: Tensor | None = None
        self._attention_mask: Tensor | None = None

    def read_layer(self, n_layers: int) -> int:
        """The vision layer whose output is `hidden_states[vision_feature_layer]` (index 0 = embeddings)."""
        k = self.model.config.vision_feature_layer
        k = k[-1] if isinstance(k, (list, tuple)) else k
        layer = k % (n_layers + 1) - 1
        if layer < 0:
            raise ValueError(f"vision_feature_layer={k} reads the patch embeddings, not a layer output.")
        return layer

    @classmethod
    def from_spec(cls, name: str, pretrained: bool = True, **kw: Any) -> LlavaEncoder:
        """`name`: a hub id or local directory of a llava-hf checkpoint, or 'tiny'."""
        if name == "tiny":
            return cls(*tiny_llava(), "llava:tiny")
        try:
            with contextlib.nullcontext() if os.path.isdir(name) else hub_access():
                processor = AutoProcessor.from_pretrained(name)
                if pretrained:
                    model = LlavaForConditionalGeneration.from_pretrained(name, **kw)
                else:  # the real architecture, random weights
                    model = LlavaForConditionalGeneration(AutoConfig.from_pretrained(name))
        except OSError as err:  # hub download / cache miss
            raise weights_error(f"llava:{name}", name, err) from err
        return cls(model, processor, f"llava:{name}")

    # ---------------------------------------------------------------- hooks
    def hook_points(self) -> list[str]:
        n_vision = len(self.model.get_submodule(self.vision_layers))
        n_llm = len(self.model.get_submodule(self.llm_layers))
        return [
            *(f"{self.vision_layers}.{i}" for i in range(n_vision)),
            self.projector,
            *(f"{self.llm_layers}.{i}" for i in range(n_llm)),
        ]

    def select_tokens(self, hook: str, acts_BTD: Tensor, mode: TokenMode) -> tuple[Tensor, Tensor]:
        """Vision and projector hooks; LLM hooks select a different count per example (`_flatten`)."""
        if hook.startswith(f"{self.vision_layers}."):  # CLIP vision: CLS, then patches
            if mode in ("image", "text"):
                raise ValueError(
                    f"tokens={mode!r} selects positions of the language model's sequence; the "
                    f"vision hook {hook!r} sees only the image (CLS + patches). Use 'all', "
                    f"'patch' or 'cls' here, or an LLM hook `{self.llm_layers}.{{i}}`."
                )
            return default_select(
                acts_BTD, "cls" if mode == "pooled" else mode, n_prefix=1, family=f"{self.family} vision"
            )
        if hook == self.projector:
            if mode == "text":
                raise self._image_features_only(hook)
            mode = "all" if mode == "image" else mode
            return default_select(acts_BTD, mode, n_prefix=0, family=f"{self.family} projector")
        raise ValueError(f"{hook!r} has a different number of tokens per example: use encoder.activations().")

    def text_mask(self, hook: str) -> Tensor:
        """[B, T] True at the text positions of the last batch: not image features, not padding."""
        if hook == self.projector:
            raise self._image_features_only(hook)
        return self.llm_mask("text")

    def _image_features_only(self, hook: str) -> ValueError:
        return ValueError(
            f"tokens='text' does not apply to {hook!r}: it outputs image features only. "
            f"Use an LLM hook `{self.llm_layers}.{{i}}`."
        )

    def llm_mask(self, mode: TokenMode) -> Tensor:
        """[B, T] True at the positions of the last batch's sequences that `mode` selects, never padding:
        "all", "image" (projected image features), "text" (the rest) or an int (that position of each
        example's unpadded sequence, -1 = its last token)."""
        keep_BT = torch.ones_like(self._input_ids, dtype=torch.bool)
        if self._attention_mask is not None:
            keep_BT = self._attention_mask.bool()
        is_image_BT = self._input_ids == self.model.config.image_token_index
        if mode == "all":
            return keep_BT
        if mode in ("image", "text"):
            return keep_BT & (is_image_BT if mode == "image" else ~is_image_BT)
        if isinstance(mode, int) and not isinstance(mode, bool):
            length_B1 = keep_BT.sum(1, keepdim=True)
            if not (-length_B1 <= mode).all() or not (mode < length_B1).all():
                raise ValueError(
                    f"Token index {mode} is out of range for an example of {int(length_B1.min())} tokens."
                )
            rank_BT = keep_BT.cumsum(1) - 1  # position within each example's unpadded sequence
            return keep_BT & (rank_BT == mode % length_B1)
        raise ValueError(
            f"tokens={mode!r} does not apply to the language model's layers (its sequence has no CLS "
            "token, patches or registers); use 'all', 'image' (image features), 'text' (prompt tokens), "
            "'mean' or a token index."
        )

    def _flatten(self, hook: str, chunks: list[Capture], tokens: TokenMode, example_offset: int) -> TokenActs:
        """LLM hooks: the tokens `llm_mask` selects (a different count per example, never padding), or
        their masked mean for "mean"/"pooled"; `token_index` is the column in the batch's input_ids."""
        if hook.startswith(f"{self.vision_layers}.") or hook == self.projector:
            return super()._flatten(hook, chunks, tokens, example_offset)
        ((acts_BTD, _),) = chunks  # `activations` runs one forward: one call of each LLM layer
        if tokens in ("mean", "pooled"):
            keep_BT1 = self.llm_mask("all")[..., None].to(acts_BTD.dtype)
            mean_BD = (acts_BTD * keep_BT1).sum(1) / keep_BT1.sum(1)
            B = len(mean_BD)
            ids = torch.arange(B, device=mean_BD.device) + example_offset
            return TokenActs(mean_BD, {"example_id": ids, "token_index": torch.full_like(ids, -1)})
        pos_NK = self.llm_mask(tokens).nonzero()  # (example, position) pairs, row-major
        return TokenActs(
            acts_BTD[pos_NK[:, 0], pos_NK[:, 1]],
            {"example_id": pos_NK[:, 0] + example_offset, "token_index": pos_NK[:, 1]},
        )

    # ---------------------------------------------------------------- running
    def inputs(self, batch: Any) -> dict[str, Tensor]:
        """Processor outputs on device, from a mapping or from `(images, prompts)`."""
        if isinstance(batch, tuple) and len(batch) == 2:
            images, prompts = batch
            prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
            prompts = [format_prompt(self.processor, p) for p in prompts]
            batch = self.processor(images=list(images), text=prompts, return_tensors="pt", padding=True)
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise TypeError(
                f"{self.id} takes processor outputs (input_ids, pixel_values, ...) or a tuple "
                f"(images, prompts), got {type(batch).__name__}."
            )
        out = {k: v.to(self.device) for k, v in batch.items()}
        if "pixel_values" in out:
            out["pixel_values"] = out["pixel_values"].to(self.dtype)
        self._input_ids, self._attention_mask = out["input_ids"], out.get("attention_mask")
        return out

    def run_model(self, batch: Any) -> Tensor:
        """Next-token logits [B, T, V]."""
        return self.model(**self.inputs(batch)).logits

    @torch.no_grad()
    def generate(
        self, images: Sequence[Any], prompt: str | Sequence[str], max_new_tokens: int = 20, **generate_kw: Any
    ) -> list[str]:
        """Greedy answers (new text only) for each image; edits active around the call apply at every step."""
        self.processor.tokenizer.padding_side = "left"  # decoder-only generation continues the last column
        inputs = self.inputs((images, prompt))
        generate_kw.setdefault("do_sample", False)
        ids_BL = self.model.generate(**inputs, max_new_tokens=max_new_tokens, **generate_kw)
        return self.processor.batch_decode(
            ids_BL[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )


def tiny_llava(
    vision_layers: int = 3, image_size: int = 32, patch: int = 8
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A random-init LLaVA (tiny CLIP vision + tiny Llama) and an offline processor for it."""
    tokenizer = tiny_clip_tokenizer(vocab_size=1000)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=vision_layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch,
        projection_dim=16,
    )
    text = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_seq_length=(image_size // patch) ** 2,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    # num_additional_image_tokens=1: the CLS token the "default" strategy drops, as in llava-hf configs
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )
    return LlavaForConditionalGeneration(config), processor
