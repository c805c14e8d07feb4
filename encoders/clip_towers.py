"""Hook points and token layout of an open_clip model's two towers, whatever they are.

Image towers: open_clip's VisionTransformer, a timm trunk (ViT, EVA, SigLIP, ConvNeXt, Swin, FastViT,
ViTamin, …) or ModifiedResNet. Text towers: open_clip's TextTransformer (on the model for CLIP, in
`.text` for CustomTextCLIP and CoCa) or a Hugging Face encoder (HFTextEncoder). Hooks are the module
paths of the blocks (or stages) of each tower plus the tower's pooled output; each hook has a
`HookLayout` saying which tokens it holds and what the tower pools, so token modes apply per tower kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from open_clip.hf_model import ClsLastHiddenStatePooler, ClsPooler, HFTextEncoder, MeanPooler
from open_clip.modified_resnet import ModifiedResNet
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer
from torch import nn

# Names under which trunks keep their list of residual blocks or stages (open_clip, timm, transformers).
BLOCK_LIST_NAMES = ("resblocks", "blocks", "layer", "layers", "block", "stages")

Pool = Literal["cls", "mean", "text", "masked_mean", "embedding", "attention"]


@dataclass(frozen=True)
class HookLayout:
    """What one hook's output holds.

    `pool`: what the tower pools from these tokens: "cls" (token 0), "mean" (mean of the non-prefix
    tokens), "text" (the token open_clip's text pooling reads, per example), "masked_mean" (mean of the
    non-padding tokens, HF text towers), "embedding" (the hook already is the pooled embedding) or
    "attention" (an attention pool: no token of this hook is the pooled one)."""

    tower: Literal["image", "text"]
    pool: Pool
    n_prefix: int = 0  # leading CLS / register tokens before the patch grid
    n_cls: int = 0
    channels_last: bool = False  # [B, H, W, C] stage outputs (timm Swin)
    seq_first: bool = False  # blocks run on [T, B, D] (open_clip configs without batch_first)


def block_hooks(tower: nn.Module, prefix: str) -> list[str]:
    """`prefix + path.i` for each block of the shallowest block list of `tower` ([] when it has none)."""
    best: tuple[int, str, int] | None = None
    for name, mod in tower.named_modules():
        if (
            not isinstance(mod, (nn.ModuleList, nn.Sequential))
            or name.rsplit(".", 1)[-1] not in BLOCK_LIST_NAMES
        ):
            continue
        if best is None or name.count(".") < best[0]:
            best = (name.count("."), name, len(mod))
    return [] if best is None else [f"{prefix}{best[1]}.{i}" for i in range(best[2])]


def text_tower(model: nn.Module) -> tuple[nn.Module, str]:
    """The text tower and its hook prefix: CLIP keeps it on the model, CustomTextCLIP / CoCa in `.text`."""
    return (model, "") if hasattr(model, "transformer") else (model.text, "text.")


def _timm_pool(trunk: nn.Module) -> str:
    """The global pooling a timm trunk applies ('token', 'avg', 'map', '' …)."""
    for owner in (trunk, getattr(trunk, "head", None)):
        pool = getattr(owner, "global_pool", None)
        if isinstance(pool, str):
            return pool
        if pool is not None and isinstance(getattr(pool, "pool_type", None), str):
            return pool.pool_type
    return ""


def image_layouts(visual: nn.Module) -> dict[str, HookLayout]:
    """Layouts of every image-tower hook, blocks first, then `visual` (the pooled, projected embedding)."""
    out: dict[str, HookLayout] = {}
    if isinstance(visual, ModifiedResNet):
        for i in range(1, 5):
            out[f"visual.layer{i}"] = HookLayout("image", "attention")
        out["visual.attnpool"] = HookLayout("image", "embedding")
    elif isinstance(visual, VisionTransformer):
        pool = {"tok": "cls", "avg": "mean"}.get(visual.pool_type, "attention")
        if getattr(visual, "attn_pool", None) is not None:  # CoCa: attention pooling over all tokens
            pool = "attention"
        seq_first = not getattr(visual.transformer, "batch_first", True)
        for hook in block_hooks(visual, "visual."):
            out[hook] = HookLayout("image", pool, n_prefix=1, n_cls=1, seq_first=seq_first)
    elif isinstance(visual, TimmModel):
        trunk = visual.trunk
        head_pools = any("Attention" in type(m).__name__ for m in visual.head.modules())
        pool = (
            "attention" if head_pools else {"token": "cls", "avg": "mean"}.get(_timm_pool(trunk), "attention")
        )
        n_prefix = int(getattr(trunk, "num_prefix_tokens", 0) or 0)
        n_cls = int(getattr(trunk, "cls_token", None) is not None)
        nhwc = getattr(trunk, "output_fmt", "NCHW") == "NHWC"
        for hook in block_hooks(trunk, "visual.trunk."):
            out[hook] = HookLayout("image", pool, n_prefix=n_prefix, n_cls=n_cls, channels_last=nhwc)
    else:
        raise TypeError(
            f"Unsupported open_clip image tower {type(visual).__name__}; supported: VisionTransformer, "
            "TimmModel (timm trunks) and ModifiedResNet."
        )
    out["visual"] = HookLayout("image", "embedding")
    return out


def text_layouts(model: nn.Module) -> dict[str, HookLayout]:
    """Layouts of every text-tower hook: blocks, then the final norm or the tower's pooled output."""
    tower, prefix = text_tower(model)
    out: dict[str, HookLayout] = {}
    if isinstance(tower, HFTextEncoder):
        pooler = tower.pooler
        if isinstance(pooler, (ClsPooler, ClsLastHiddenStatePooler)):
            pool: Pool = "cls"
        else:
            pool = "masked_mean" if isinstance(pooler, MeanPooler) else "attention"
        for hook in block_hooks(tower.transformer, f"{prefix}transformer."):
            out[hook] = HookLayout("text", pool, n_prefix=int(pool == "cls"), n_cls=int(pool == "cls"))
    else:
        seq_first = not getattr(tower.transformer, "batch_first", True)
        for hook in block_hooks(tower.transformer, f"{prefix}transformer."):
            out[hook] = HookLayout("text", "text", seq_first=seq_first)
        # CoCa appends a CLS token, pools it (the last token) and normalises only that one token.
        pooled_first = getattr(tower, "cls_emb", None) is not None
        out[f"{prefix}ln_final"] = HookLayout("text", "embedding" if pooled_first else "text")
    if prefix:
        out["text"] = HookLayout("text", "embedding")
    return out
