"""Diffusion UNets (diffusers SD-1.x/2.x, SDXL, SDXL-Turbo): block outputs or updates during real sampling.

Every spatial position of a block is one token; (H, W) is kept in `meta["grid"]`. A sampling run calls each
UNet block once per step on the CFG batch [uncond, cond]; `timesteps` / `every_n` pick steps, `cfg_half` picks
halves, `update=True` records output − input (the sdxl-unbox convention); `edit_update` edits such an update
in place of the output (how an `Intervention` splices an SAE trained on updates).

Sampler defaults come from the model (`model_sampling`): SD/SDXL-Turbo samples in 1 step without guidance,
other checkpoints in 50 steps at guidance 7.5. Explicit settings are always used as given; those a model
was not trained for (Turbo with CFG or more than 4 steps) warn.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import BaseOutput
from PIL import Image
from torch import Tensor, nn

from mmsae.encoders.base import Capture, Encoder, TokenMode, default_select
from mmsae.encoders.capabilities import Sampler, UpdateEditor
from mmsae.encoders.unet_pipelines import random_init_pipeline, tiny_pipeline
from mmsae.encoders.weights import hub_access, weights_error

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class ModelSampling:
    """The sampler settings a checkpoint was trained for: its defaults and the limits past which it breaks."""

    kind: str
    num_inference_steps: int
    guidance_scale: float
    max_steps: int | None = None  # step-distilled models: more steps drift off the distilled trajectory
    max_guidance: float | None = None  # trained without classifier-free guidance: CFG over-saturates


STABLE_DIFFUSION = ModelSampling("a Stable Diffusion checkpoint", 50, 7.5)
TURBO = ModelSampling(
    "an SD/SDXL-Turbo checkpoint (distilled for 1–4 steps without classifier-free guidance)",
    num_inference_steps=1,
    guidance_scale=0.0,
    max_steps=4,
    max_guidance=1.0,  # diffusers runs CFG only above 1
)
TINY = ModelSampling("the tiny test pipeline", 2, 7.5)


def model_sampling(name: str) -> ModelSampling:
    """What the checkpoint `name` (hub id, local path or encoder id) was trained for; Turbo checkpoints
    (stabilityai/sdxl-turbo, stabilityai/sd-turbo, their cache and local copies) carry it in their name."""
    if name in ("tiny", "unet:tiny"):
        return TINY
    return TURBO if "turbo" in name.lower() else STABLE_DIFFUSION


@dataclass
class UNetSampling:
    """How `activations` samples and what it records (override per call: `activations(..., every_n=5)`)."""

    num_inference_steps: int | None = None  # None: the model's default (`model_sampling`)
    guidance_scale: float | None = None  # None: the model's default (`model_sampling`)
    seed: int = 0
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None
    timesteps: Sequence[int] | None = None  # scheduler timestep values to record (None: all steps)
    every_n: int = 1  # record every n-th sampling step (step 0, n, 2n, ...)
    cfg_half: Literal["cond", "uncond", "both"] = "cond"
    update: bool = False  # record output − input of each block instead of its output


class UNetEncoder(Encoder, Sampler, UpdateEditor):
    """A diffusers Stable Diffusion (XL) pipeline. Batches are lists of prompts; hooks are module paths
    inside the UNet (`up_blocks.1.attentions.1`) or text-encoder paths (`text_encoder.text_model...`)."""

    family = "unet"

    def __init__(
        self,
        pipe: DiffusionPipeline,
        id: str,
        sampling: UNetSampling | None = None,
        trained_for: ModelSampling | None = None,
    ):
        """`sampling` fields left None take `trained_for`'s defaults (default: `model_sampling(id)`)."""
        parts = {
            name: getattr(pipe, name)
            for name in ("unet", "vae", *TEXT_ENCODERS)
            if getattr(pipe, name, None) is not None
        }
        super().__init__(nn.ModuleDict(parts), id)
        self.pipe = pipe
        self.trained_for = trained_for or model_sampling(id)
        self.sampling = self._resolved(sampling or UNetSampling())
        self._warn_contradictions(self.sampling)
        self.default_hook = (
            "up_blocks.1.attentions.1"
            if "up_blocks.1.attentions.1" in self.hook_points()
            else self.unet_hooks()[0]
        )
        self.current_timestep: int = -1
        self._step = -1
        self._calls: dict[str, int] = {}
        self._grids: dict[str, tuple[int, int]] = {}
        self._n_prompts = 0
        # Permanent and read-only: tells every block hook which sampling step it is in.
        self.model["unet"].register_forward_pre_hook(self._on_unet_call, with_kwargs=True)

    @classmethod
    def from_spec(cls, name: str, pretrained: bool = True, **kw: Any) -> UNetEncoder:
        """`name`: a diffusers hub id or local directory (SD-1.x/2.x or SDXL), or 'tiny'."""
        # Explicit settings are kept as given; the rest default to what the model was trained for.
        explicit = {k: kw.pop(k) for k in list(kw) if k in UNetSampling.__dataclass_fields__}
        if name == "tiny":
            return cls(tiny_pipeline(), "unet:tiny", UNetSampling(**{"height": 32, "width": 32, **explicit}))
        sampling = UNetSampling(**explicit)
        try:
            with contextlib.nullcontext() if os.path.isdir(name) else hub_access():
                if pretrained:
                    pipe = DiffusionPipeline.from_pretrained(name, safety_checker=None, **kw)
                else:
                    pipe = random_init_pipeline(name)
        except (OSError, ValueError) as err:  # hub download / cache miss
            raise weights_error(f"unet:{name}", name, err) from err
        if not isinstance(pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
            raise TypeError(
                f"unet:{name} loaded a {type(pipe).__name__}; UNetEncoder supports "
                "StableDiffusionPipeline and StableDiffusionXLPipeline checkpoints."
            )
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, f"unet:{name}", sampling)

    # ---------------------------------------------------------------- hooks
    def unet_hooks(self) -> list[str]:
        """Top-level modules, blocks and block members (`up_blocks.1.attentions.1`), not their internals."""
        unet = self.model["unet"]

        def in_list(name: str) -> bool:
            parent = unet.get_submodule(name.rsplit(".", 1)[0])
            return name.count(".") <= 3 and isinstance(parent, nn.ModuleList)

        return [
            name
            for name, mod in unet.named_modules()
            if name and not isinstance(mod, nn.ModuleList) and ("." not in name or in_list(name))
        ]

    def text_layers(self, encoder: str) -> str:
        """Path of the text encoder's layer list: transformers 5 dropped the `text_model.` level."""
        return (
            f"{encoder}.text_model.encoder.layers"
            if hasattr(self.model[encoder], "text_model")
            else f"{encoder}.encoder.layers"
        )

    def hook_points(self) -> list[str]:
        text = [
            f"{self.text_layers(enc)}.{i}"
            for enc in TEXT_ENCODERS
            if enc in self.model
            for i in range(len(self.model.get_submodule(self.text_layers(enc))))
        ]
        return [*self.unet_hooks(), *text]

    def module(self, hook: str) -> nn.Module:
        if self.is_text_hook(hook) and ".text_model." in hook and hook not in self.hook_points():
            hook = hook.replace(".text_model.", ".", 1)  # transformers-4 names keep working
        if hook in self.hook_points() and not self.is_text_hook(hook):
            return self.model["unet"].get_submodule(hook)
        return super().module(hook)

    def is_text_hook(self, hook: str) -> bool:
        return hook.startswith(TEXT_ENCODERS)

    def to_tokens(self, hook: str, output: Any) -> Tensor:
        return super().to_tokens(hook, output.to_tuple() if isinstance(output, BaseOutput) else output)

    def from_tokens(self, hook: str, tokens_BTD: Tensor, like: Any) -> Any:
        if isinstance(like, BaseOutput):
            return type(like)(*super().from_tokens(hook, tokens_BTD, like.to_tuple()))
        return super().from_tokens(hook, tokens_BTD, like)

    def select_tokens(self, hook: str, acts_BTD: Tensor, mode: TokenMode) -> tuple[Tensor, Tensor]:
        what = "text encoder" if self.is_text_hook(hook) else "UNet (spatial positions only)"
        return default_select(acts_BTD, mode, n_prefix=0, family=f"{self.family} {what}")

    def can_stop_early(self) -> bool:
        # Only a single UNet call without CFG (SDXL-Turbo) leaves nothing a later hook needs.
        return self.sampling.num_inference_steps == 1 and self.sampling.guidance_scale <= 1

    # ---------------------------------------------------------------- recording
    def _on_unet_call(self, _mod: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        self.current_timestep = int(t.flatten()[0]) if isinstance(t, Tensor) else int(t)
        self._step += 1

    def _step_selected(self) -> bool:
        s = self.sampling
        if s.timesteps is not None:
            return self.current_timestep in s.timesteps
        return self._step % s.every_n == 0

    def _halves(self, acts_BTD: Tensor) -> list[tuple[Tensor, int]]:
        """Split a CFG batch [uncond, cond] into the requested halves with their `cond` flag."""
        if acts_BTD.shape[0] != 2 * self._n_prompts:  # no CFG: only the conditional pass exists
            return [(acts_BTD, 1)]
        uncond, cond = acts_BTD.chunk(2)
        return {"cond": [(cond, 1)], "uncond": [(uncond, 0)], "both": [(uncond, 0), (cond, 1)]}[
            self.sampling.cfg_half
        ]

    def captures(self, hook: str, args: tuple, kwargs: dict[str, Any], output: Any) -> list[Capture]:
        acts_BTD = self.to_tokens(hook, output)
        if self.is_text_hook(hook):  # SD encodes the prompts first, then the negative prompts
            call = self._calls[hook] = self._calls.get(hook, -1) + 1
            halves = [(acts_BTD, int(call == 0))]
            wanted = {"cond": {1}, "uncond": {0}, "both": {0, 1}}[self.sampling.cfg_half]
            return [(a, {"cond": torch.full((a.shape[0], 1), c)}) for a, c in halves if c in wanted]
        if not self._step_selected():
            return []
        out = output.to_tuple()[0] if isinstance(output, BaseOutput) else output
        out = out[0] if isinstance(out, tuple) else out
        if out.ndim == 4:
            self._grids[hook] = tuple(out.shape[-2:])
        if self.site(hook) == "update":
            acts_BTD = acts_BTD - self.input_tokens(hook, args, kwargs, acts_BTD, "update=True needs")
        return [
            (
                half,
                {
                    "timestep": torch.full((half.shape[0], 1), self.current_timestep),
                    "cond": torch.full((half.shape[0], 1), c),
                },
            )
            for half, c in self._halves(acts_BTD)
        ]

    def input_tokens(
        self, hook: str, args: tuple, kwargs: dict[str, Any], out_BTD: Tensor, need: str
    ) -> Tensor:
        """The block's input (`hidden_states` / `sample`) as tokens; `need` opens the error when its shape
        differs from the output's (e.g. up/down-samplers), so no update exists."""
        inp = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
        in_BTD = self.to_tokens(hook, inp) if isinstance(inp, Tensor) else None
        if in_BTD is None or in_BTD.shape != out_BTD.shape:
            raise ValueError(
                f"{need} a block whose output has its input's shape; {hook!r} maps "
                f"{tuple(getattr(inp, 'shape', ()))} → {tuple(out_BTD.shape)} tokens. Use a "
                "shape-preserving block (e.g. an `attentions.*` module) or the block's output."
            )
        return in_BTD

    def hook_meta(self, hook: str) -> dict[str, Tensor]:
        return {"grid": torch.tensor(self._grids[hook])} if hook in self._grids else {}

    def site(self, hook: str) -> str:
        # Text-encoder layers are always recorded as outputs (`captures` returns before the update).
        return "update" if self.sampling.update and not self.is_text_hook(hook) else "output"

    @contextlib.contextmanager
    def edit_update(self, hook: str, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
        """Within the block, `hook`'s update u = out − in is replaced by fn(u): out′ = out + (fn(u) − u).

        Written as a correction of the output, not as in + fn(u), so an fn that returns u unchanged leaves
        the output bit-identical (in + (out − in) is not, in floating point).
        """

        def hook_fn(_mod: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
            out_BTD = self.to_tokens(hook, output)
            need = "An SAE trained on block updates (site='update') needs"
            update_BTD = out_BTD - self.input_tokens(hook, args, kwargs, out_BTD, need)
            return self.from_tokens(hook, out_BTD + (fn(update_BTD) - update_BTD), output)

        # prepend, as in `Encoder.edit`: reading hooks must see the edited output.
        handle = self.module(hook).register_forward_hook(hook_fn, with_kwargs=True, prepend=True)
        try:
            yield
        finally:
            handle.remove()

    # ---------------------------------------------------------------- sampler settings
    def _resolved(self, sampling: UNetSampling) -> UNetSampling:
        """`sampling` with the settings left None set to the model's defaults."""
        m, s = self.trained_for, sampling
        steps = m.num_inference_steps if s.num_inference_steps is None else s.num_inference_steps
        guidance = m.guidance_scale if s.guidance_scale is None else s.guidance_scale
        return dataclasses.replace(s, num_inference_steps=steps, guidance_scale=guidance)

    def _warn_contradictions(self, sampling: UNetSampling) -> None:
        """Warn where explicit settings leave what the model was trained for (they are still used)."""
        m, s = self.trained_for, sampling
        wrong = []
        if m.max_guidance is not None and s.guidance_scale > m.max_guidance:
            wrong.append(f"guidance_scale={s.guidance_scale:g}")
        if m.max_steps is not None and s.num_inference_steps > m.max_steps:
            wrong.append(f"num_inference_steps={s.num_inference_steps}")
        if wrong:
            warnings.warn(
                f"Sampler settings contradict {self.id}, {m.kind}: {', '.join(wrong)}. They are used as "
                f"given; its own are num_inference_steps={m.num_inference_steps}, "
                f"guidance_scale={m.guidance_scale:g}.",
                UserWarning,
                stacklevel=3,
            )

    def resolution(self) -> tuple[int, int]:
        """(height, width) in pixels that sampling runs at: the set one, else the pipeline's default."""
        s, size = self.sampling, self.pipe.unet.config.sample_size
        default_h, default_w = (size, size) if isinstance(size, int) else size
        factor = self.pipe.vae_scale_factor
        return s.height or default_h * factor, s.width or default_w * factor

    def store_config(self) -> dict[str, Any]:
        """Every sampler setting that changes the recorded bytes, for the activation store's identity."""
        s, scheduler = self.sampling, self.pipe.scheduler
        height, width = self.resolution()
        return {
            "pipeline": type(self.pipe).__name__,
            "scheduler": type(scheduler).__name__,
            # `_class_name`, `_diffusers_version` and the like describe the file, not the schedule
            "scheduler_config": _jsonable(
                {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
            ),
            "num_inference_steps": s.num_inference_steps,
            "guidance_scale": float(s.guidance_scale),
            "seed": s.seed,
            "noise_device": self.device.type,  # a CPU and a CUDA generator draw different noise for one seed
            "height": height,
            "width": width,
            "negative_prompt": s.negative_prompt,
            "timesteps": None if s.timesteps is None else sorted({int(t) for t in s.timesteps}),
            "every_n": s.every_n,
            "cfg_half": s.cfg_half,
            "site": "update" if s.update else "output",
        }

    @contextlib.contextmanager
    def _sampling_overrides(self, overrides: dict[str, Any]) -> Iterator[None]:
        saved, new = self.sampling, self._resolved(dataclasses.replace(self.sampling, **overrides))
        if {"num_inference_steps", "guidance_scale"} & set(overrides):
            self._warn_contradictions(new)
        if new.cfg_half not in ("cond", "uncond", "both"):
            raise ValueError(f"cfg_half must be 'cond', 'uncond' or 'both', got {new.cfg_half!r}.")
        if new.cfg_half != "cond" and new.guidance_scale <= 1:
            raise ValueError(
                f"cfg_half={new.cfg_half!r} needs classifier-free guidance, but "
                f"guidance_scale={new.guidance_scale} runs only the conditional pass."
            )
        self.sampling = new
        try:
            yield
        finally:
            self.sampling = saved

    def activations(
        self,
        batch: Sequence[str],
        hooks: Sequence[str],
        tokens: TokenMode = "all",
        example_offset: int = 0,
        **sampling: Any,
    ) -> dict[str, Any]:
        """As `Encoder.activations`, over a whole sampling run; keyword overrides of `UNetSampling` apply."""
        with self._sampling_overrides(sampling):
            return super().activations(batch, hooks, tokens, example_offset)

    # ---------------------------------------------------------------- running
    def transform(self, image: Any) -> Tensor:
        raise NotImplementedError("UNetEncoder takes prompts, not images: pass a list of strings.")

    def _pipe_call(self, prompts: Sequence[str], output_type: str) -> Any:
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"{self.id} takes a list of prompt strings, got {type(prompts).__name__}.")
        s = self.sampling
        self._n_prompts, self._step, self._calls, self.current_timestep = len(prompts), -1, {}, -1
        generator = torch.Generator(self.device).manual_seed(s.seed)
        negative = None if s.negative_prompt is None else [s.negative_prompt] * len(prompts)
        return self.pipe(
            list(prompts),
            num_inference_steps=s.num_inference_steps,
            guidance_scale=s.guidance_scale,
            height=s.height,
            width=s.width,
            negative_prompt=negative,
            generator=generator,
            output_type=output_type,
        )

    def run_model(self, batch: Sequence[str]) -> Tensor:
        """The final latents of a sampling run (no VAE decode) [B, C, h, w]."""
        return self._pipe_call(batch, output_type="latent").images

    def sample(self, prompts: Sequence[str], **sampling: Any) -> list[Image.Image]:
        """Generate images; keyword overrides of `UNetSampling` (num_inference_steps, seed, …)."""
        with self._sampling_overrides(sampling), torch.no_grad():
            return self._pipe_call(prompts, output_type="pil").images


def _jsonable(value: Any) -> Any:
    """A JSON round trip of `value` (tuples become lists, arrays and other objects their list or repr)."""
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else repr(v)))
