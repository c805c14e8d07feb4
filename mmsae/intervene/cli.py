"""`mmsae steer ...` and `mmsae unlearn ...`: thin argparse front ends over the Python API.

    mmsae steer image --encoder clip:ViT-B-32/openai --sae runs/sae --image cat.jpg --edit set:12=8 \\
        --labels cat,dog
    mmsae steer llava --encoder llava:llava-hf/llava-1.5-7b-hf --sae runs/sae --image a.jpg --prompt "..." \\
        --edit set:3=40
    mmsae steer diffusion --encoder unet:stabilityai/sdxl-turbo --sae runs/sae --prompt "a house" \\
        --edit dir:5=8 --timesteps 500:999 --out steered/
    mmsae steer text --encoder unet:... --sae runs/text_sae --concept "nudity" --strength -0.5 --prompt ...
    mmsae unlearn select --encoder unet:... --sae runs/sae --concept cat=cats.txt --other other.txt
    mmsae unlearn generate --encoder unet:... --sae runs/sae --concepts cat --multiplier -5 --prompt ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from mmsae.datasets.images import open_image
from mmsae.encoders.base import Encoder
from mmsae.encoders.capabilities import Sampler, require
from mmsae.intervene.edits import EDIT_SYNTAX, parse_edit

if TYPE_CHECKING:
    from mmsae.sae import SAE


def _common(p: argparse.ArgumentParser, edits: bool = True) -> None:
    p.add_argument("--encoder", required=True, help="encoder spec, e.g. clip:ViT-B-32/openai or unet:tiny")
    p.add_argument("--sae", required=True, help="SAE directory or Hub repo id")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--hook", help="hook point (default: the one recorded in the SAE's cfg.json)")
    if edits:
        p.add_argument(
            "--edit", action="append", default=[], type=parse_edit, help=f"repeatable: {EDIT_SYNTAX}"
        )
        p.add_argument(
            "--drop-error",
            action="store_true",
            help="replace x by the edited reconstruction instead of keeping the SAE error term x − x̂",
        )


def _sampler_settings(p: argparse.ArgumentParser) -> None:
    # No fixed defaults: what a checkpoint needs differs (SDXL-Turbo: 1 step at guidance 0, else 50 at 7.5).
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's own, e.g. 1 for Turbo)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the model's own, 0 for Turbo)")
    p.add_argument("--seed", type=int, default=0)


def _sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", action="append", required=True, help="repeatable")
    _sampler_settings(p)
    p.add_argument("--out", type=Path, required=True, help="directory for before_*.png / after_*.png")


def _steps_guidance(encoder: Encoder, args: argparse.Namespace) -> tuple[int, float]:
    """--steps / --guidance as given, else the encoder's sampler defaults (which come from its model)."""
    sampling = require(encoder, Sampler, what="Sampling images").sampling
    steps = sampling.num_inference_steps if args.steps is None else args.steps
    return steps, sampling.guidance_scale if args.guidance is None else args.guidance


def _window(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    try:
        return int(low), int(high)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--timesteps {text!r}: expected LOW:HIGH, e.g. 500:999") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmsae", description="Steer models and unlearn concepts with SAEs.")
    top = parser.add_subparsers(dest="command", required=True)
    steer = top.add_parser("steer", help="steer a model through SAE features").add_subparsers(
        dest="target", required=True
    )
    image = steer.add_parser("image", help="CLIP / timm ViT: outputs and zero-shot labels before vs after")
    _common(image)
    image.add_argument("--image", action="append", required=True, type=Path)
    image.add_argument("--labels", help="comma-separated zero-shot labels (CLIP)")
    llava = steer.add_parser("llava", help="LLaVA: generations before vs after")
    _common(llava)
    llava.add_argument("--image", action="append", required=True, type=Path)
    llava.add_argument("--prompt", required=True)
    llava.add_argument("--max-new-tokens", type=int, default=20)
    diffusion = steer.add_parser("diffusion", help="UNet: same-seed samples before vs after")
    _common(diffusion)
    _sampling(diffusion)
    diffusion.add_argument("--timesteps", type=_window, help="edit only in this window, LOW:HIGH")
    diffusion.add_argument("--cfg-half", choices=["both", "cond", "uncond"], default="both")
    diffusion.add_argument("--mask", type=Path, help="grayscale image: where to edit (white = edit)")
    text = steer.add_parser("text", help="Concept Steerers: SAE on the text encoder")
    _common(text, edits=False)
    _sampling(text)
    text.add_argument("--concept", required=True, help="concept prompt, e.g. 'nudity'")
    text.add_argument("--strength", type=float, required=True, help="< 0 steers away (e.g. −0.5)")

    unlearn = top.add_parser("unlearn", help="SAeUron concept unlearning").add_subparsers(
        dest="target", required=True
    )
    select = unlearn.add_parser(
        "select", help="select each concept's features per timestep; writes the JSON beside the SAE"
    )
    _common(select, edits=False)
    select.add_argument("--concept", action="append", required=True, metavar="NAME=PROMPTS.txt")
    select.add_argument(
        "--other", required=True, type=Path, help="file of other (retained) prompts, one a line"
    )
    select.add_argument("--percentile", type=float, default=99.99)
    _sampler_settings(select)
    generate = unlearn.add_parser(
        "generate", help="sample with concepts suppressed (and without, to compare)"
    )
    _common(generate, edits=False)
    _sampling(generate)
    generate.add_argument("--concepts", required=True, help="comma-separated names from the selection")
    generate.add_argument("--multiplier", type=float, default=-5.0)
    generate.add_argument(
        "--selection", type=Path, help="default: unlearn_selection.json in the SAE directory"
    )
    return parser


def _prompts(path: Path) -> list[str]:
    lines = [line.strip() for line in Path(path).read_text().splitlines()]
    prompts = [line for line in lines if line]
    if not prompts:
        raise ValueError(f"{path} holds no prompts (one prompt a line).")
    return prompts


def _save_pairs(out: Path, before: list[Image.Image], after: list[Image.Image]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for i, (a, b) in enumerate(zip(before, after)):
        a.save(out / f"before_{i}.png")
        b.save(out / f"after_{i}.png")
    print(f"wrote {len(before)} before/after pairs to {out}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mmsae.checkpoint import load_sae
    from mmsae.encoders.registry import get_encoder

    encoder = get_encoder(args.encoder, device=args.device)
    sae = load_sae(args.sae, device=args.device)
    if args.command == "steer":
        return _steer(args, encoder, sae)
    return _unlearn(args, encoder, sae)


def _steer(args: argparse.Namespace, encoder: Encoder, sae: SAE) -> dict[str, Any]:
    """`mmsae steer image|llava|diffusion|text`: the report printed as JSON."""
    from mmsae.intervene import steer as steering

    splice: dict[str, Any] = {"hook": args.hook}
    if hasattr(args, "drop_error"):
        splice["keep_error"] = not args.drop_error
    if args.target == "image":
        images = [open_image(p) for p in args.image]
        labels = args.labels.split(",") if args.labels else None
        result = steering.steer_image(encoder, sae, images, args.edit, labels=labels, **splice)
        report: dict[str, Any] = {"cosine": result.cosine_B.tolist()}
        if labels:
            report["label_shift"] = result.label_shift()
        return report
    if args.target == "llava":
        images = [open_image(p) for p in args.image]
        gen = steering.steer_llava(
            encoder, sae, images, args.prompt, args.edit, args.max_new_tokens, **splice
        )
        return {"before": gen.before, "after": gen.after}
    if args.target == "diffusion":
        from mmsae.intervene.intervention import Splice

        mask = None
        if args.mask:
            mask = torch.from_numpy(np.asarray(open_image(args.mask).convert("L"), dtype=np.float32) / 255)
        s = Splice(
            sae, args.edit, timesteps=args.timesteps, cfg_half=args.cfg_half, spatial_mask=mask, **splice
        )
        gen = steering.steer_diffusion(encoder, s, args.prompt, args.seed, *_steps_guidance(encoder, args))
        _save_pairs(args.out, gen.before, gen.after)
        return {"out": str(args.out)}
    from mmsae.intervene.text_steer import steer_prompts

    steps, guidance = _steps_guidance(encoder, args)
    gen = steer_prompts(
        encoder,
        sae,
        args.prompt,
        args.concept,
        args.strength,
        hook=args.hook,
        seed=args.seed,
        num_inference_steps=steps,
        guidance_scale=guidance,
    )
    _save_pairs(args.out, gen.before, gen.after)
    return {"out": str(args.out)}


def _unlearn(args: argparse.Namespace, encoder: Encoder, sae: SAE) -> dict[str, Any]:
    """`mmsae unlearn select|generate`: the selection's feature counts, or where the samples went."""
    from mmsae.intervene import unlearn

    steps, guidance = _steps_guidance(encoder, args)
    sampling = unlearn.SampleConfig(steps, guidance, args.seed)
    if args.target == "select":
        concepts = {}
        for item in args.concept:
            name, sep, path = item.partition("=")
            if not sep or not name:
                raise ValueError(f"--concept {item!r}: expected NAME=PROMPTS.txt")
            concepts[name] = _prompts(Path(path))
        sae_dir = Path(args.sae)
        selection = unlearn.select_features(
            encoder,
            sae,
            concepts,
            _prompts(args.other),
            args.percentile,
            hook=args.hook,
            sampling=sampling,
            save_to=sae_dir if sae_dir.is_dir() else Path(unlearn.SELECTION_NAME),
        )
        return {name: {t: len(v) for t, v in c.features.items()} for name, c in selection.concepts.items()}
    selection = args.selection or Path(args.sae)
    unlearner = unlearn.Unlearner(encoder, sae, selection, args.concepts.split(","), args.multiplier)
    before = unlearner.sampler.sample(
        args.prompt, num_inference_steps=steps, guidance_scale=guidance, seed=args.seed
    )
    _save_pairs(args.out, before, unlearner.generate(args.prompt, sampling))
    return {"out": str(args.out)}


def cli_main(argv: list[str]) -> int:
    """Entry point for `mmsae steer ...` / `mmsae unlearn ...`; argv includes the command word."""
    args = build_parser().parse_args(argv)
    try:
        report = run(args)
    except (ValueError, KeyError, IndexError, FileNotFoundError) as err:
        print(f"error: {err}")
        return 2
    print(json.dumps(report, indent=1, default=str))
    return 0


__all__ = ["build_parser", "cli_main"]
