"""Diffusion UNets (diffusers SD-1.x/2.x, SDXL, SDXL-Turbo): block outputs or updates during real sampling.

Every spatial position of a block is one token; (H, W) is kept in `meta["grid"]`. A sampling run calls each
UNet block once per step on the CFG batch [uncond, cond]; `timesteps` / `every_n` pick steps, `cfg_half` picks
halves, `update=True` records output − input (the sdxl-unbox convention); `edit_update` edits such an update
in place of the output (how an `Intervention` splices an SAE trained on updates).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import BaseOutput
from PIL import Image
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel

from mmsae.encoders.base import Capture, Encoder, TokenMode, default_select
from mmsae.encoders.tiny_tokenizer import tiny_clip_tokenizer
from mmsae.encoders.weights import weights_error

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


@dataclass
class UNetSampling:
    """How `activations` samples and what it records (override per call: `activations(..., every_n=5)`)."""

    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    seed: int = 0
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None
    timesteps: Sequence[int] | None = None  # scheduler timestep values to record (None: all steps)
    every_n: int = 1  # record every n-th sampling step (step 0, n, 2n, ...)
    cfg_half: Literal["cond", "uncond", "both"] = "cond"
    update: bool = False  # record output − input of each block instead of its output


class UNetEncoder(Encoder):
    """A diffusers Stable Diffusion (XL) pipeline. Batches are lists of prompts; hooks are module paths
    inside the UNet (`up_blocks.1.attentions.1`) or text-encoder paths (`text_encoder.text_model...`)."""

    family = "unet"

    def __init__(self, pipe: DiffusionPipeline, id: str, sampling: UNetSampling | None = None):
        parts = {
            name: getattr(pipe, name)
            for name in ("unet", "vae", *TEXT_ENCODERS)
            if getattr(pipe, name, None) is not None
        }
        super().__init__(nn.ModuleDict(parts), id)
        self.pipe = pipe
        self.sampling = sampling or UNetSampling()
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
        sampling = UNetSampling(**{k: kw.pop(k) for k in list(kw) if k in UNetSampling.__dataclass_fields__})
        if name == "tiny":
            tiny = dataclasses.replace(
                sampling, num_inference_steps=2, height=sampling.height or 32, width=sampling.width or 32
            )
            return cls(tiny_pipeline(), "unet:tiny", tiny)
        if "turbo" in name.lower() and not kw.get("keep_defaults"):  # SDXL-Turbo: 1 step, no CFG
            sampling = dataclasses.replace(sampling, num_inference_steps=1, guidance_scale=0.0)
        try:
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

    @contextlib.contextmanager
    def _sampling_overrides(self, overrides: dict[str, Any]) -> Iterator[None]:
        saved, new = self.sampling, dataclasses.replace(self.sampling, **overrides)
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


def tiny_pipeline() -> StableDiffusionPipeline:
    """SD-1.x with diffusers' own tiny test components (random init) and an offline CLIP tokenizer."""
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=2,
    )
    vae = AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        norm_num_groups=2,
    )
    tokenizer = tiny_clip_tokenizer(vocab_size=1000)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=8,
            intermediate_size=16,
            num_attention_heads=2,
            num_hidden_layers=2,
            vocab_size=1000,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_init_pipeline(name: str) -> DiffusionPipeline:
    """The real architecture of `name` with random weights: configs and tokenizers come from `name`."""
    config = DiffusionPipeline.load_config(name)
    pipe_cls = StableDiffusionXLPipeline if "XL" in config["_class_name"] else StableDiffusionPipeline
    parts: dict[str, Any] = {}
    for part, (library, cls_name) in config.items():
        if (
            part.startswith("_")
            or library is None
            or part in ("safety_checker", "feature_extractor", "image_encoder")
        ):
            continue
        cls = getattr(__import__(library), cls_name)
        if part in ("unet", "vae"):
            parts[part] = cls.from_config(cls.load_config(name, subfolder=part))
        elif part.startswith("text_encoder"):
            parts[part] = cls(cls.config_class.from_pretrained(name, subfolder=part))
        else:  # tokenizers and schedulers have no weights
            parts[part] = cls.from_pretrained(name, subfolder=part)
    extra = (
        {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
        if pipe_cls is StableDiffusionPipeline
        else {}
    )
    return pipe_cls(**parts, **extra)
