"""Overhead of a forward with an SAE spliced in vs the bare model (target ≤ 1.1×).

Cases: CLIP ViT-B/32 image tower, batch 256, SAE on `visual.transformer.resblocks.10`; an SD-1.5-sized
random-init UNet, one sampling step (CFG batch 2 at 64×64 latents), SAE on `up_blocks.1.attentions.1`.
Modes: `splice` (x̂ replaces x, the fidelity setting) and `steer` (error kept, one feature set).

    python benchmarks/bench_intervene.py --device cuda            # the real sizes
    python benchmarks/bench_intervene.py --device cpu --small     # a quick CPU version
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

import mmsae
from mmsae.encoders.base import Encoder
from mmsae.encoders.registry import get_encoder
from mmsae.intervene.edits import Set
from mmsae.intervene.intervention import Intervention, Splice


@dataclass
class Timing:
    case: str
    mode: str
    bare_ms: float
    spliced_ms: float

    @property
    def ratio(self) -> float:
        return self.spliced_ms / self.bare_ms


def timed_ms(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def measure(
    case: str, encoder: Encoder, sae: mmsae.SAE, run: Callable[[], object], args: argparse.Namespace
) -> list[Timing]:
    """Median times; bare and spliced runs are interleaved so that drift (clocks, neighbours) hits both."""
    device = torch.device(args.device)
    modes = {"bare": None, "splice": Splice(sae, keep_error=False), "steer": Splice(sae, [Set(7, 10.0)])}

    def run_mode(splice: Splice | None) -> float:
        if splice is None:
            return timed_ms(run, device)
        with Intervention(encoder, splice):
            return timed_ms(run, device)

    times: dict[str, list[float]] = {mode: [] for mode in modes}
    with torch.inference_mode():
        for i in range(args.warmup + args.repeats):
            for mode, splice in modes.items():
                ms = run_mode(splice)
                if i >= args.warmup:
                    times[mode].append(ms)
    bare = statistics.median(times["bare"])
    if args.profile:
        for mode, splice in modes.items():
            with (
                torch.inference_mode(),
                torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                ) as prof,
            ):
                run_mode(splice)
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)
            print(f"--- {case} {mode}\n{table}", flush=True)
    return [Timing(case, mode, bare, statistics.median(times[mode])) for mode in ("splice", "steer")]


def clip_case(args: argparse.Namespace, dtype: torch.dtype) -> list[Timing]:
    encoder = get_encoder("clip:ViT-B-32", pretrained=False, device=args.device, dtype=dtype)
    hook = "visual.transformer.resblocks.10"
    batch = 8 if args.small else 256
    sae = mmsae.build_sae("topk", 768, 768 * args.expansion, k=32, hook=hook, encoder=encoder.id).to(
        args.device, dtype
    )
    pixels = torch.randn(batch, 3, 224, 224, device=args.device, dtype=dtype)
    return measure(f"clip ViT-B/32 batch {batch}", encoder, sae, lambda: encoder.encode_image(pixels), args)


def unet_case(args: argparse.Namespace, dtype: torch.dtype) -> list[Timing]:
    from diffusers import UNet2DConditionModel

    from mmsae.encoders.unet import UNetEncoder, tiny_pipeline

    # Only the UNet is timed: the SD-1.5 architecture (diffusers' defaults + 768-d text) in the tiny pipeline.
    pipe = tiny_pipeline()
    pipe.register_modules(unet=UNet2DConditionModel(cross_attention_dim=768))
    encoder = UNetEncoder(pipe, "unet:sd15-sized-random").to(args.device, dtype)
    hook = "up_blocks.1.attentions.1"
    size = 16 if args.small else 64
    sae = mmsae.build_sae("topk", 1280, 1280 * args.expansion, k=32, hook=hook, encoder=encoder.id)
    sae = sae.to(args.device, dtype)
    latents = torch.randn(2, 4, size, size, device=args.device, dtype=dtype)
    text = torch.randn(2, 77, 768, device=args.device, dtype=dtype)
    t = torch.tensor(500, device=args.device)
    return measure(
        f"unet SD-1.5-sized {size}x{size} CFG step",
        encoder,
        sae,
        lambda: pipe.unet(latents, t, encoder_hidden_states=text),
        args,
    )


def main(argv: list[str] | None = None) -> list[Timing]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="model and SAE dtype; auto = bf16 on CUDA, fp32 on CPU",
    )
    parser.add_argument("--expansion", type=int, default=16, help="SAE features = expansion × d")
    parser.add_argument("--small", action="store_true", help="CPU-sized inputs (batch 8, 16×16 latents)")
    parser.add_argument("--cases", default="clip,unet")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--profile", action="store_true", help="print the CUDA kernel table of each mode")
    parser.add_argument("--json", help="also write the timings here")
    args = parser.parse_args(argv)
    name = args.dtype if args.dtype != "auto" else ("bf16" if args.device.startswith("cuda") else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    cases = {"clip": clip_case, "unet": unet_case}
    timings = [t for case in args.cases.split(",") for t in cases[case](args, dtype)]
    for t in timings:
        print(
            f"{t.case:40s} {t.mode:6s} bare {t.bare_ms:9.2f} ms  "
            f"spliced {t.spliced_ms:9.2f} ms  {t.ratio:5.3f}x"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                [asdict(t) | {"ratio": t.ratio, "device": args.device, "dtype": name} for t in timings],
                f,
                indent=1,
            )
    return timings


if __name__ == "__main__":
    main()
