"""timm models: Vision Transformers (CLS / register / patch tokens) and CNNs (spatial positions as tokens).

Hooks are module paths (`blocks.{i}`, `norm`, `conv_head`, …). Models with a classifier head expose it:
`classify(batch)` → logits, and `logits_from_hook(hook, acts)` finishes the forward from a hook's
activations (the rest of the network, then the head), so analysis can read a feature's effect on the
classes. `pretrained=True` loads the offline zoo's converted weights (`mmsae zoo install`) for the
architectures it holds, before trying the hub.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import timm
import timm.data
import torch
from timm.models import split_model_name_tag
from torch import Tensor, nn
from torchvision import transforms as T

if TYPE_CHECKING:
    from mmsae.zoo import ZooWeights

from mmsae.datasets.photos import imagenet_class_names
from mmsae.encoders.base import Encoder, TokenMode, default_select, rgb
from mmsae.encoders.capabilities import Classifier
from mmsae.encoders.weights import WeightsUnavailableError, hub_access, weights_error

Step = tuple[str, Callable[[Tensor], Tensor]]
VECTOR_HOOKS = ("global_pool", "classifier", "head")  # steps whose output is [B, D], not a map or tokens


class TimmEncoder(Encoder, Classifier):
    """A timm ViT or CNN (`timm.create_model`); hooks are module paths of the model."""

    family = "timm"

    def __init__(self, model: nn.Module, id: str):
        super().__init__(model, id)
        self.is_vit = hasattr(model, "blocks") and hasattr(model, "patch_embed")
        if not self.is_vit and not hasattr(model, "forward_head"):
            raise TypeError(f"{id} is neither a timm ViT nor a timm CNN with `forward_head`.")
        self.n_prefix: int = getattr(model, "num_prefix_tokens", 0) if self.is_vit else 0
        self.n_cls: int = int(getattr(model, "cls_token", None) is not None) if self.is_vit else 0
        self._grids: dict[str, tuple[int, int]] = {}  # spatial grid of each CNN hook in the last run
        if self.is_vit:
            self.image_size: tuple[int, int] = tuple(model.patch_embed.img_size)
            self.grid: tuple[int, int] = tuple(model.patch_embed.grid_size)  # last batch's when dynamic
            # The penultimate block: the usual SAE site for ViTs (saev, sae-for-vlm).
            self.default_hook = f"blocks.{max(len(model.blocks) - 2, 0)}"
            # The pretrained config may name another size than the model was built with (img_size=...).
            config = timm.data.resolve_data_config({"input_size": (3, *self.image_size)}, model=model)
        else:
            config = timm.data.resolve_data_config({}, model=model)
            self.image_size = tuple(config["input_size"][1:])
            # The last spatial stage before the head: the CNN counterpart of the ViT's late blocks.
            stages = getattr(model, "blocks", None)
            info = getattr(model, "feature_info", None)
            if isinstance(stages, nn.Sequential):
                self.default_hook = f"blocks.{len(stages) - 1}"
            elif info:
                self.default_hook = info[-1]["module"]
            else:
                raise TypeError(f"{id}: a timm CNN without `blocks` or `feature_info` is not supported.")
        self.data_config = config
        self.image_pipeline = T.Compose([rgb, *timm.data.create_transform(**config).transforms])

    @classmethod
    def from_spec(
        cls, name: str, pretrained: bool = True, checkpoint_path: str = "", **kw: Any
    ) -> TimmEncoder:
        """`name` is a timm model name (optionally `.tag`) or 'hf-hub:org/repo'; `checkpoint_path` loads a
        local weights file. With `pretrained`, an architecture the offline zoo holds loads the zoo's
        weights when they are installed (the bare name, or the zoo's tag); otherwise the hub's."""
        zoo_note = ""
        if pretrained and not checkpoint_path and ":" not in name:
            weights, zoo_note = _zoo_weights(name)
            if weights is not None:
                model = timm.create_model(
                    weights.model.arch,
                    pretrained=True,
                    pretrained_cfg_overlay=weights.pretrained_cfg,
                    **{**weights.model_kw, **kw},
                )
                encoder = cls(model, f"timm:{name}")
                encoder.default_hook = weights.model.default_hook or encoder.default_hook
                return encoder
        from_hub = pretrained and not checkpoint_path
        try:
            with hub_access() if from_hub else contextlib.nullcontext():
                model = timm.create_model(name, pretrained=from_hub, checkpoint_path=checkpoint_path, **kw)
        except (OSError, RuntimeError) as err:  # hub download / cache miss
            if not pretrained:
                raise
            error = weights_error(f"timm:{name}", checkpoint_path or name, err)
            raise WeightsUnavailableError(f"{error}{zoo_note}") from err
        return cls(model, f"timm:{name}")

    # ---------------------------------------------------------------- hooks and tokens
    def hook_points(self) -> list[str]:
        return [name for name, _ in self.model.named_modules() if name]

    def run_model(self, batch: Any) -> Tensor:
        if not self.is_vit:  # convolutions take any image size
            return self.model(self.pixels(batch, None))
        dynamic = getattr(self.model, "dynamic_img_size", False)
        pixels_BCHW = self.pixels(batch, None if dynamic else self.image_size)
        self.grid = self.model.patch_embed.dynamic_feat_size(pixels_BCHW.shape[-2:]) if dynamic else self.grid
        return self.model(pixels_BCHW)

    def _nhwc(self, hook: str) -> bool:
        """timm's `patch_embed` returns [B, H, W, C] (not [B, C, H, W]) when the model has dynamic size."""
        fmt = str(getattr(getattr(self.model, "patch_embed", None), "output_fmt", ""))
        return hook == "patch_embed" and fmt.endswith("NHWC")

    def to_tokens(self, hook: str, output: Any) -> Tensor:
        if self._nhwc(hook):
            return output.flatten(1, 2)
        out = output[0] if isinstance(output, (tuple, list)) else output
        if not self.is_vit and out.ndim == 4:
            self._grids[hook] = (out.shape[2], out.shape[3])
        return super().to_tokens(hook, output)

    def from_tokens(self, hook: str, tokens_BTD: Tensor, like: Any) -> Any:
        return (
            tokens_BTD.reshape(like.shape).to(like.dtype)
            if self._nhwc(hook)
            else super().from_tokens(hook, tokens_BTD, like)
        )

    def prefix_tokens(self, hook: str) -> int:
        return self.n_prefix

    def select_tokens(self, hook: str, acts_BTD: Tensor, mode: TokenMode) -> tuple[Tensor, Tensor]:
        if not self.is_vit:  # spatial positions only: "pooled" = the head's global average pool
            return default_select(acts_BTD, mode, n_prefix=0, family=f"{self.family} CNN", n_cls=0)
        # Only modules on the token sequence carry the prefix; e.g. `patch_embed` outputs patches alone.
        on_sequence = acts_BTD.shape[1] == self.n_prefix + self.grid[0] * self.grid[1]
        n_prefix, n_cls = (self.n_prefix, self.n_cls) if on_sequence else (0, 0)
        if mode == "pooled" and on_sequence and self.model.global_pool == "token":
            mode = "cls"  # the model's own pooling reads the CLS token
        return default_select(acts_BTD, mode, n_prefix=n_prefix, family=self.family, n_cls=n_cls)

    def hook_grid(self, hook: str, n_tokens: int) -> tuple[int, int]:
        """(H, W) of a CNN hook's spatial map with H·W = `n_tokens`: the last run's, else a square."""
        grid = self._grids.get(hook)
        if grid is not None and grid[0] * grid[1] == n_tokens:
            return grid
        side = math.isqrt(n_tokens)
        if side * side != n_tokens:
            raise ValueError(
                f"Cannot tell the spatial grid of {n_tokens} tokens at {hook!r}; run `activations` on an "
                "image of this size first, or pass activations as [B, C, H, W]."
            )
        return side, side

    # ---------------------------------------------------------------- classifier head
    @property
    def has_classifier(self) -> bool:
        return int(getattr(self.model, "num_classes", 0) or 0) > 0

    @property
    def class_names(self) -> list[str]:
        """Names of the logits: ImageNet-1k's for 1000-way heads, else the class indices as text."""
        if not self.has_classifier:
            raise TypeError(f"{self.id} has no classifier head (num_classes=0).")
        n = int(self.model.num_classes)
        return imagenet_class_names() if n == 1000 else [str(i) for i in range(n)]

    def _require_head(self) -> None:
        if not self.has_classifier:
            raise TypeError(
                f"{self.id} has no classifier head (num_classes=0): it yields features, not logits."
            )

    @torch.no_grad()
    def classify(self, batch: Any) -> Tensor:
        """Logits [B, num_classes] of the model's own forward on PIL images or pixels."""
        self._require_head()
        return self.run_model(batch)

    def head_hooks(self) -> list[str]:
        """Hooks from which `logits_from_hook` can finish the forward (the model's sequential points)."""
        return [name for name, _ in self._steps()]

    def logits_from_hook(self, hook: str, acts: Tensor) -> Tensor:
        """Logits [B, K] of the network from `hook` onward, given that hook's activations.

        `acts` is the hook's output as tokens [B, T, D] (every token, as `to_tokens` gives it) or in the
        module's own layout ([B, C, H, W] for CNN maps). Differentiable: no gradient is disabled here."""
        self._require_head()
        steps = self._steps()
        names = [name for name, _ in steps]
        if hook not in names:
            raise ValueError(
                f"logits_from_hook cannot resume {self.id} at {hook!r}: a module inside a block may feed a "
                f"residual it cannot see. Use one of: {', '.join(names)}."
            )
        x = self._native(hook, acts)
        for _, step in steps[names.index(hook) + 1 :]:
            x = step(x)
        return x

    def _native(self, hook: str, acts: Tensor) -> Tensor:
        """Tokens [B, T, D] back to the hook's own layout (CNN maps [B, C, H, W]; pooled vectors [B, D])."""
        if acts.ndim == 3 and hook in VECTOR_HOOKS:
            return acts[:, 0]  # to_tokens made the [B, D] vector one token
        if self.is_vit or acts.ndim != 3:
            return acts
        B, T, D = acts.shape
        H, W = self.hook_grid(hook, T)
        return acts.transpose(1, 2).reshape(B, D, H, W)

    def _steps(self) -> list[Step]:
        """The model as a chain of named steps, each taking the previous step's output; the last is logits.

        Written out per timm family (ViT, EfficientNet/MobileNet), mirroring their `forward_features`
        and `forward_head`; a test checks the chain reproduces `model(pixels)` from every step."""
        m = self.model
        if self.is_vit:
            steps: list[Step] = [("norm_pre", m.norm_pre)]
            steps += [(f"blocks.{i}", blk) for i, blk in enumerate(m.blocks)]
            return [*steps, ("norm", m.norm), ("head", m.forward_head)]
        if type(m).__name__ == "EfficientNet":  # timm's EfficientNet family, MobileNetV2 included
            steps = [("conv_stem", m.conv_stem), ("bn1", m.bn1)]
            for i, stage in enumerate(m.blocks):
                steps += [(f"blocks.{i}.{j}", blk) for j, blk in enumerate(stage)]
                steps.append((f"blocks.{i}", nn.Identity()))  # a stage's output is its last block's
            steps += [("conv_head", m.conv_head), ("bn2", m.bn2), ("global_pool", m.global_pool)]
            return [*steps, ("classifier", m.classifier)]  # forward_head's dropout is off in eval
        raise NotImplementedError(
            f"logits_from_hook supports timm ViTs and EfficientNet-family CNNs (MobileNetV2, EfficientNet), "
            f"not {type(m).__name__}."
        )


def _zoo_weights(name: str) -> tuple[ZooWeights | None, str]:
    """The zoo's installed weights for `name`, else (None, a note for the hub error). A zoo-only tag
    that is not installed raises at once: the hub cannot have it."""
    from mmsae.zoo import ZooError, find_weights

    arch, tag = split_model_name_tag(name)
    try:
        return find_weights(arch, tag), ""
    except ZooError as err:
        if tag:
            raise WeightsUnavailableError(str(err)) from err
        return None, f"\n  4. offline real weights for {arch}: {err}"
