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
from typing import Any, Literal

import torch
from torch import Tensor, nn

TokenMode = Literal["all", "cls", "patch", "pooled", "mean"] | int
TOKEN_MODES = ("all", "cls", "patch", "pooled", "mean")


@dataclass
class TokenActs:
    """Activations of one hook point, flattened to tokens, with per-token metadata.

    `meta` always has `example_id` and `token_index` ([N] int64; −1 for pooled/mean tokens);
    UNet adapters add `timestep`, `cond` (1 = conditional CFG half) and `grid` = (H, W).
    """

    acts_ND: Tensor
    meta: dict[str, Tensor] = field(default_factory=dict)


class _StopForward(Exception):
    """Raised by the last requested hook to skip the rest of the model's forward."""


class Encoder(nn.Module):
    """Base adapter. Subclasses set `self.model`, `self.id` and implement the abstract parts."""

    id: str = "encoder"
    family: str = "base"

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
        raise NotImplementedError

    def run_model(self, batch: Any) -> Any:
        """One forward of the model on a batch (already on device)."""
        raise NotImplementedError

    def select_tokens(self, hook: str, acts_BTD: Tensor, mode: TokenMode) -> tuple[Tensor, Tensor]:
        """Pick tokens from [B, T, D]: returns acts [B, T', D] and token indices [T'] (−1 = pooled)."""
        return default_select(acts_BTD, mode, n_prefix=0, family=self.family)

    # ---------------------------------------------------------------- generic machinery
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

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

    @torch.no_grad()
    def activations(self, batch: Any, hooks: Sequence[str], tokens: TokenMode = "all",
                    example_offset: int = 0) -> dict[str, TokenActs]:
        """Run the model once and return each hook's selected tokens, flattened to [N, D]."""
        if not hooks:
            raise ValueError(f"No hooks requested; valid hook points: {', '.join(self.hook_points()[:40])}")
        captured: dict[str, list[Tensor]] = {h: [] for h in hooks}
        metas: dict[str, list[dict[str, Tensor]]] = {h: [] for h in hooks}
        remaining = set(hooks)
        stop_early = self.can_stop_early()

        def make_hook(name: str) -> Callable[..., None]:
            def fn(_mod: nn.Module, _inp: Any, out: Any) -> None:
                acts = self.to_tokens(name, out)
                captured[name].append(acts.detach())
                B, T = acts.shape[:2]
                metas[name].append(self.extra_meta(name, B, T))
                remaining.discard(name)
                if stop_early and not remaining:
                    raise _StopForward

            return fn

        handles = [self.module(h).register_forward_hook(make_hook(h)) for h in hooks]
        try:
            with contextlib.suppress(_StopForward):
                self.run_model(batch)
        finally:
            for h in handles:
                h.remove()
        return {h: self._flatten(h, captured[h], metas[h], tokens, example_offset) for h in hooks}

    def can_stop_early(self) -> bool:
        """Whether the forward may be cut after the last hook (not for multi-step samplers)."""
        return True

    def _flatten(self, hook: str, chunks: list[Tensor], metas: list[dict[str, Tensor]], tokens: TokenMode,
                 example_offset: int) -> TokenActs:
        acts, ids, toks, extra = [], [], [], {}
        for call, acts_BTD in enumerate(chunks):
            sel, tok_idx = self.select_tokens(hook, acts_BTD, tokens)
            B, T = sel.shape[:2]
            acts.append(sel.reshape(B * T, -1))
            ids.append((torch.arange(B, device=sel.device) + example_offset).repeat_interleave(T))
            toks.append(tok_idx.to(sel.device).repeat(B))
            for k, v in metas[call].items():
                v = v if v.shape[1] == T else v[:, :1].expand(B, T)
                extra.setdefault(k, []).append(v.reshape(-1))
        meta = {"example_id": torch.cat(ids), "token_index": torch.cat(toks)}
        meta.update({k: torch.cat(v) for k, v in extra.items()})
        return TokenActs(torch.cat(acts), meta)

    @contextlib.contextmanager
    def edit(self, hook: str, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
        """Within the block, the output of `hook` is replaced by from_tokens(fn(to_tokens(out)))."""
        def hook_fn(_mod: nn.Module, _inp: Any, out: Any) -> Any:
            return self.from_tokens(hook, fn(self.to_tokens(hook, out)), out)

        handle = self.module(hook).register_forward_hook(hook_fn)
        try:
            yield
        finally:
            handle.remove()


def default_select(acts_BTD: Tensor, mode: TokenMode, n_prefix: int, family: str) -> tuple[Tensor, Tensor]:
    """Token selection for sequences with `n_prefix` leading special tokens (CLS, registers)."""
    B, T, _ = acts_BTD.shape
    if mode == "all":
        return acts_BTD, torch.arange(T)
    if mode == "cls":
        if n_prefix == 0:
            raise ValueError(f"tokens='cls' is not available for this {family} hook: it has no CLS token. "
                             "Use 'all', 'mean' or a token index.")
        return acts_BTD[:, :1], torch.zeros(1, dtype=torch.long)
    if mode == "patch":
        return acts_BTD[:, n_prefix:], torch.arange(n_prefix, T)
    if mode in ("mean", "pooled"):
        return acts_BTD.mean(1, keepdim=True), torch.full((1,), -1, dtype=torch.long)
    if isinstance(mode, int) and not isinstance(mode, bool):
        if not -T <= mode < T:
            raise ValueError(f"Token index {mode} is out of range for a hook with {T} tokens.")
        return acts_BTD[:, mode : mode + 1 if mode != -1 else None], torch.tensor([mode % T])
    raise ValueError(f"Unknown token mode {mode!r}; use one of {TOKEN_MODES} or an int index.")
