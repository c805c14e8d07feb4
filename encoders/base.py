"""The `Encoder` adapter interface: a real model, its hook points by name, token selection.

An adapter wraps one model family (CLIP, timm ViT, LLaVA, diffusion UNet). Hook points are
module paths of the real model (`model.get_submodule(name)`); activations come from forward
hooks on those modules, never from a re-implemented layer. Shape suffixes: B batch, T tokens,
D width, N flattened tokens, C channels, H/W spatial.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn

TokenMode = Literal["all", "cls", "patch", "registers", "pooled", "mean"] | int
TOKEN_MODES = ("all", "cls", "patch", "registers", "pooled", "mean")

Capture = tuple[Tensor, dict[str, Tensor]]  # tokens [B, T, D] and per-token metadata ([B, T] or [B, 1])


@dataclass
class TokenActs:
    """Activations of one hook point, flattened to tokens, with per-token metadata.

    `meta` always has `example_id` and `token_index` ([N] int64; −1 for pooled/mean tokens);
    UNet adapters add `timestep`, `cond` (1 = conditional CFG half) per token and `grid` = (H, W) ([2]).
    """

    acts_ND: Tensor
    meta: dict[str, Tensor] = field(default_factory=dict)


class PairPipeline(Protocol):
    """(image, prompt) → one example's model inputs, in DataLoader workers (picklable, holds no model);
    `collate` batches those into what `run_model` takes."""

    def __call__(self, image: Any, prompt: str) -> dict[str, Tensor]: ...

    def collate(self, examples: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]: ...


class _StopForward(Exception):
    """Raised by the last requested hook to skip the rest of the model's forward."""


class Encoder(nn.Module):
    """Base adapter. Subclasses set `self.model`, `self.id` and implement the abstract parts."""

    id: str = "encoder"
    family: str = "base"
    default_hook: str = ""
    image_pipeline: Callable[[Any], Tensor] | None = None
    """What `transform` runs, PIL image → pixels: a picklable callable that holds no model, so DataLoader
    workers get it without a copy of the model. A torchvision `Compose` for timm and open_clip (which
    decode="device" and the uint8 hand-off of `mmsae.datasets.pixels` replay); None without images."""
    pair_pipeline: PairPipeline | None = None
    """For models that read an image and a prompt together (LLaVA): what extraction runs per example
    instead of `image_pipeline`; None for models that read images or texts alone."""

    def __init__(self, model: nn.Module, id: str):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.id = id

    # ---------------------------------------------------------------- to implement
    def hook_points(self) -> list[str]:
        """Every valid hook name (module paths of the real model)."""
        raise NotImplementedError

    def transform(self, image: Any) -> Tensor:
        """The model's own preprocessing: PIL image → input tensor."""
        if self.image_pipeline is None:
            raise TypeError(f"{self.id} takes no images.")
        return self.image_pipeline(image)

    def run_model(self, batch: Any) -> Any:
        """One forward of the model on a batch (already on device)."""
        raise NotImplementedError

    def is_text_hook(self, hook: str) -> bool:
        """Whether `hook` lies in a text tower (whose batches are prompts, not images)."""
        return False

    def prefix_tokens(self, hook: str) -> int:
        """Leading non-spatial tokens (CLS, registers) in the output of `hook`; the rest form the grid."""
        return 0

    def select_tokens(self, hook: str, acts_BTD: Tensor, mode: TokenMode) -> tuple[Tensor, Tensor]:
        """Pick tokens from [B, T, D]: acts [B, T', D] and token indices [T'] or [B, T'] (−1 = pooled)."""
        return default_select(acts_BTD, mode, n_prefix=0, family=self.family)

    def store_config(self) -> dict[str, Any]:
        """Settings beyond the weights, hooks, tokens and preprocessing that change the activations this
        encoder records (a sampler's steps, guidance scale, seed ...): JSON-serialisable, they enter an
        activation store's content hash and its store.json, so other settings give another store."""
        return {}

    # ---------------------------------------------------------------- generic machinery
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def module(self, hook: str) -> nn.Module:
        valid = self.hook_points()
        if hook not in valid:
            preview = ", ".join(valid[:40]) + (" …" if len(valid) > 40 else "")
            raise KeyError(f"Unknown hook point {hook!r} for {self.id}. Valid hook points: {preview}")
        return self.model.get_submodule(hook)

    def to_tokens(self, hook: str, output: Any) -> Tensor:
        """A module's output as [B, T, D] (first element of tuples; [B,C,H,W] → [B, H·W, C])."""
        out = output[0] if isinstance(output, (tuple, list)) else output
        if out.ndim == 4:
            return out.flatten(2).transpose(1, 2)
        if out.ndim == 2:
            return out[:, None]
        return out

    def from_tokens(self, hook: str, tokens_BTD: Tensor, like: Any) -> Any:
        """Inverse of `to_tokens`: put edited tokens back into the module's output structure."""
        out = like[0] if isinstance(like, (tuple, list)) else like
        if out.ndim == 4:
            new = tokens_BTD.transpose(1, 2).reshape(out.shape)
        elif out.ndim == 2:
            new = tokens_BTD[:, 0]
        else:
            new = tokens_BTD
        new = new.to(out.dtype)
        if isinstance(like, tuple):
            return (new, *like[1:])
        if isinstance(like, list):
            return [new, *like[1:]]
        return new

    def extra_meta(self, hook: str, B: int, T: int) -> dict[str, Tensor]:
        """Family-specific per-token metadata (UNet: timestep, cond); [B, T] tensors."""
        return {}

    def captures(self, hook: str, args: tuple, kwargs: dict[str, Any], output: Any) -> list[Capture]:
        """What one call of `hook`'s module records (UNet: split CFG halves, skip unselected steps)."""
        acts_BTD = self.to_tokens(hook, output)
        return [(acts_BTD, self.extra_meta(hook, *acts_BTD.shape[:2]))]

    def hook_meta(self, hook: str) -> dict[str, Tensor]:
        """Per-hook (not per-token) metadata, e.g. the UNet spatial grid (H, W)."""
        return {}

    def site(self, hook: str) -> str:
        """What `activations` records at `hook`: 'output' (the module's output), 'update' (output − input)."""
        return "output"

    @torch.no_grad()
    def activations(
        self, batch: Any, hooks: Sequence[str], tokens: TokenMode = "all", example_offset: int = 0
    ) -> dict[str, TokenActs]:
        """Run the model once and return each hook's selected tokens, flattened to [N, D]."""
        if not hooks:
            raise ValueError(f"No hooks requested; valid hook points: {', '.join(self.hook_points()[:40])}")
        hooks = list(dict.fromkeys(hooks))
        captured: dict[str, list[Capture]] = {h: [] for h in hooks}
        remaining = set(hooks)
        stop_early = self.can_stop_early()

        def make_hook(name: str) -> Callable[..., None]:
            def fn(_mod: nn.Module, args: tuple, kwargs: dict[str, Any], out: Any) -> None:
                captured[name].extend((a.detach(), m) for a, m in self.captures(name, args, kwargs, out))
                remaining.discard(name)
                if stop_early and not remaining:
                    raise _StopForward

            return fn

        handles = [self.module(h).register_forward_hook(make_hook(h), with_kwargs=True) for h in hooks]
        try:
            with contextlib.suppress(_StopForward):
                self.run_model(batch)
        finally:
            for h in handles:
                h.remove()
        if remaining:
            raise RuntimeError(
                f"Hooks {sorted(remaining)} of {self.id} never ran for this batch; "
                "was the batch of the right kind (images vs. texts) for these hooks?"
            )
        return {h: self._flatten(h, captured[h], tokens, example_offset) for h in hooks}

    def can_stop_early(self) -> bool:
        """Whether the forward may be cut after the last hook (not for multi-step samplers)."""
        return True

    def _flatten(self, hook: str, chunks: list[Capture], tokens: TokenMode, example_offset: int) -> TokenActs:
        if not chunks:
            raise RuntimeError(f"Hook {hook!r} recorded nothing (no selected timestep / CFG half?).")
        acts, ids, toks, extra = [], [], [], {}
        for acts_BTD, call_meta in chunks:
            sel, tok_idx = self.select_tokens(hook, acts_BTD, tokens)
            B, T = sel.shape[:2]
            acts.append(sel.reshape(B * T, -1))
            ids.append((torch.arange(B, device=sel.device) + example_offset).repeat_interleave(T))
            tok_idx = tok_idx.to(sel.device, non_blocking=True)  # host → device without a stream sync
            toks.append(tok_idx.reshape(-1) if tok_idx.ndim == 2 else tok_idx.repeat(B))
            for k, v in call_meta.items():
                v = v if v.shape[1] == T else v[:, :1].expand(B, T)
                extra.setdefault(k, []).append(v.reshape(-1).to(sel.device, non_blocking=True))
        meta = {"example_id": torch.cat(ids), "token_index": torch.cat(toks)}
        meta.update({k: torch.cat(v) for k, v in extra.items()})
        meta.update(self.hook_meta(hook))
        return TokenActs(torch.cat(acts), meta)

    @contextlib.contextmanager
    def edit(self, hook: str, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
        """Within the block, the output of `hook` is replaced by from_tokens(fn(to_tokens(out)))."""

        def hook_fn(_mod: nn.Module, _inp: Any, out: Any) -> Any:
            return self.from_tokens(hook, fn(self.to_tokens(hook, out)), out)

        # prepend: hooks the model installs itself (transformers 5 records hidden_states with forward hooks)
        # and our own reading hooks must see the edited output.
        handle = self.module(hook).register_forward_hook(hook_fn, prepend=True)
        try:
            yield
        finally:
            handle.remove()

    # ---------------------------------------------------------------- image input
    def pixels(self, batch: Any, image_size: tuple[int, int] | None) -> Tensor:
        """PIL images (run through `transform`) or pixels [B, 3, H, W] → checked pixels on device.

        `image_size` None accepts any size (models with dynamic image size)."""
        if isinstance(batch, Tensor):
            pixels_BCHW = batch
        elif isinstance(batch, Sequence) and batch and not isinstance(batch[0], str):
            pixels_BCHW = torch.stack([self.transform(im) for im in batch])
        else:
            got = type(batch).__name__ + (
                f" of {type(batch[0]).__name__}" if isinstance(batch, Sequence) and batch else ""
            )
            raise TypeError(
                f"{self.id} reads images: it expects PIL images or pixels [B, 3, H, W], got a {got}. "
                "Give it an image data set; prompt lists need a diffusion encoder (unet:...)."
            )
        if pixels_BCHW.ndim != 4 or pixels_BCHW.shape[1] != 3:
            raise ValueError(
                f"{self.id} expects pixels [B, 3, H, W], got {tuple(pixels_BCHW.shape)}; "
                "pass PIL images or use `encoder.transform(image)`."
            )
        if image_size is not None and tuple(pixels_BCHW.shape[-2:]) != tuple(image_size):
            H, W = pixels_BCHW.shape[-2:]
            raise ValueError(
                f"{self.id} expects {image_size[0]}×{image_size[1]} pixels, got {H}×{W}; "
                "use `encoder.transform(image)`."
            )
        return pixels_BCHW.to(self.device, self.dtype)


def rgb(image: Any) -> Any:
    """A PIL image in 8-bit RGB through the project's one image path (16-bit/float modes are scaled)."""
    from mmsae.datasets.images import to_rgb

    return to_rgb(image)


def default_select(
    acts_BTD: Tensor, mode: TokenMode, n_prefix: int, family: str, n_cls: int | None = None
) -> tuple[Tensor, Tensor]:
    """Token selection for sequences with `n_prefix` leading special tokens (CLS first, then registers).

    `n_cls` is 1 when the first prefix token is a CLS token (default: whenever there is a prefix).
    "mean" and "pooled" average the non-prefix (patch) tokens; families with a real pooled output override.
    """
    T = acts_BTD.shape[1]
    n_cls = min(n_prefix, 1) if n_cls is None else n_cls
    # Indices are made on the activations' device: a host tensor copied there would be a blocking copy
    # that stalls the caller until every queued kernel has run (extraction calls this once per batch).
    dev = acts_BTD.device
    if mode == "all":
        return acts_BTD, torch.arange(T, device=dev)
    if mode == "cls":
        if n_cls == 0:
            raise ValueError(
                f"tokens='cls' is not available for this {family} hook: it has no CLS token. "
                "Use 'all', 'mean' or a token index."
            )
        return acts_BTD[:, :1], torch.zeros(1, dtype=torch.long, device=dev)
    if mode == "registers":
        if n_prefix == n_cls:
            raise ValueError(
                f"tokens='registers' is not available for this {family} hook: it has no "
                "register tokens. Use 'all', 'patch', 'cls' or 'mean'."
            )
        return acts_BTD[:, n_cls:n_prefix], torch.arange(n_cls, n_prefix, device=dev)
    if mode == "patch":
        return acts_BTD[:, n_prefix:], torch.arange(n_prefix, T, device=dev)
    if mode in ("mean", "pooled"):
        pooled_B1D = acts_BTD[:, n_prefix:].mean(1, keepdim=True)
        return pooled_B1D, torch.full((1,), -1, dtype=torch.long, device=dev)
    if isinstance(mode, int) and not isinstance(mode, bool):
        if not -T <= mode < T:
            raise ValueError(f"Token index {mode} is out of range for a hook with {T} tokens.")
        return acts_BTD[:, mode : mode + 1 if mode != -1 else None], torch.full((1,), mode % T, device=dev)
    raise ValueError(f"Unknown token mode {mode!r}; use one of {TOKEN_MODES} or an int index.")
