"""timm Vision Transformers: any block or named module; CLS / register / patch tokens per model."""

from __future__ import annotations

from typing import Any

import timm
import timm.data
from torch import Tensor, nn
from torchvision import transforms as T

from mmsae.encoders.base import Encoder, TokenMode, default_select, rgb
from mmsae.encoders.weights import weights_error


class TimmEncoder(Encoder):
    """A timm ViT (`timm.create_model`); hooks are module paths (`blocks.{i}`, `norm`, ...)."""

    family = "timm"

    def __init__(self, model: nn.Module, id: str):
        super().__init__(model, id)
        if not hasattr(model, "blocks") or not hasattr(model, "patch_embed"):
            raise TypeError(f"{id} is not a timm ViT (no `blocks` / `patch_embed`); TimmEncoder wraps ViTs.")
        self.n_prefix: int = getattr(model, "num_prefix_tokens", 0)
        self.n_cls: int = int(getattr(model, "cls_token", None) is not None)
        self.image_size: tuple[int, int] = tuple(model.patch_embed.img_size)
        self.grid: tuple[int, int] = tuple(model.patch_embed.grid_size)  # of the last batch when dynamic
        # The adapter's default is the penultimate block, the usual SAE site for ViTs (saev, sae-for-vlm).
        self.default_hook = f"blocks.{max(len(model.blocks) - 2, 0)}"
        # The pretrained config may name another size than the model was built with (img_size=...).
        self.data_config = timm.data.resolve_data_config({"input_size": (3, *self.image_size)}, model=model)
        self.image_pipeline = T.Compose([rgb, *timm.data.create_transform(**self.data_config).transforms])

    @classmethod
    def from_spec(
        cls, name: str, pretrained: bool = True, checkpoint_path: str = "", **kw: Any
    ) -> TimmEncoder:
        """`name` is a timm model name or 'hf-hub:org/repo'; `checkpoint_path` loads a local weights file."""
        try:
            model = timm.create_model(
                name, pretrained=pretrained and not checkpoint_path, checkpoint_path=checkpoint_path, **kw
            )
        except (OSError, RuntimeError) as err:  # hub download / cache miss
            if not pretrained:
                raise
            raise weights_error(f"timm:{name}", checkpoint_path or name, err) from err
        return cls(model, f"timm:{name}")

    def hook_points(self) -> list[str]:
        return [name for name, _ in self.model.named_modules() if name]

    def run_model(self, batch: Any) -> Tensor:
        dynamic = getattr(self.model, "dynamic_img_size", False)
        pixels_BCHW = self.pixels(batch, None if dynamic else self.image_size)
        self.grid = self.model.patch_embed.dynamic_feat_size(pixels_BCHW.shape[-2:]) if dynamic else self.grid
        return self.model(pixels_BCHW)

    def _nhwc(self, hook: str) -> bool:
        """timm's `patch_embed` returns [B, H, W, C] (not [B, C, H, W]) when the model has dynamic size."""
        fmt = str(getattr(self.model.patch_embed, "output_fmt", ""))
        return hook == "patch_embed" and fmt.endswith("NHWC")

    def to_tokens(self, hook: str, output: Any) -> Tensor:
        return output.flatten(1, 2) if self._nhwc(hook) else super().to_tokens(hook, output)

    def from_tokens(self, hook: str, tokens_BTD: Tensor, like: Any) -> Any:
        return (
            tokens_BTD.reshape(like.shape).to(like.dtype)
            if self._nhwc(hook)
            else super().from_tokens(hook, tokens_BTD, like)
        )

    def prefix_tokens(self, hook: str) -> int:
        return self.n_prefix

    def select_tokens(self, hook: str, acts_BTD: Tensor, mode: TokenMode) -> tuple[Tensor, Tensor]:
        # Only modules on the token sequence carry the prefix; e.g. `patch_embed` outputs patches alone.
        on_sequence = acts_BTD.shape[1] == self.n_prefix + self.grid[0] * self.grid[1]
        n_prefix, n_cls = (self.n_prefix, self.n_cls) if on_sequence else (0, 0)
        if mode == "pooled" and on_sequence and self.model.global_pool == "token":
            mode = "cls"  # the model's own pooling reads the CLS token
        return default_select(acts_BTD, mode, n_prefix=n_prefix, family=self.family, n_cls=n_cls)
