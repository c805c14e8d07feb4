"""Steady-state rates of each part of the device-decode input path (`decode="device"`), to find its bound.

Rows (images/s, after the first `--warm` batches, so that forking workers and first calls are not timed):
the workers' bytes loader alone (`_loader` over `JpegFiles` packing each batch), `DeviceDecoder` on batches
already loaded (in the main thread, then one batch ahead in its thread as extraction runs it),
`input_batches` end to end, and `input_batches` feeding the encoder's bare forward.

    python benchmarks/bench_input_path.py --device cuda       # ViT-B/16 pipeline, bf16, 8192 files, batch 256
    python benchmarks/bench_input_path.py --device cpu        # timm test_vit, 256 files: a smoke run
    python benchmarks/bench_input_path.py --device cuda --profile 4   # and a profile of the decoder
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from bench_decode_limits import steady_rate
from bench_extract import write_jpegs
from torch.profiler import ProfilerActivity, profile

from mmsae.datasets.gpu_decode import PackedJpegs, pack_jpegs
from mmsae.encoders import get_encoder
from mmsae.inputs import DeviceDecoder, InputBatch, JpegFiles, _loader, decoded_ahead, input_batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument(
        "--encoder", default=None, help="default: timm:vit_base_patch16_224 (timm:test_vit on CPU)"
    )
    ap.add_argument("--n-images", type=int, default=None, help="default: 8192 (256 on CPU)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 256 (32 on CPU)")
    ap.add_argument("--workers", type=int, nargs="+", default=None, help="default: 12 16 (2 on CPU)")
    ap.add_argument("--warm", type=int, default=4, help="batches not timed")
    ap.add_argument("--out", type=Path, default=None, help="where the temp folder goes")
    ap.add_argument(
        "--profile", type=int, default=0, metavar="N",
        help="also print a torch.profiler table of DeviceDecoder (nvJPEG + preprocessing) on N batches",
    )  # fmt: skip
    args = ap.parse_args()
    device, cuda = torch.device(args.device), args.device == "cuda"
    spec = args.encoder or ("timm:vit_base_patch16_224" if cuda else "timm:test_vit")
    n, batch = args.n_images or (8192 if cuda else 256), args.batch_size or (256 if cuda else 32)
    workers = args.workers or ([12, 16] if cuda else [2])
    if n < (args.warm + 2) * batch:
        raise SystemExit(f"--n-images {n}: need at least {(args.warm + 2) * batch} for a steady-state rate.")
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        dataset = write_jpegs(Path(tmp) / "jpegs", n)
        encoder = get_encoder(
            spec, pretrained=False, device=args.device, dtype=torch.bfloat16 if cuda else None
        )
        index_batches = [list(range(i, min(i + batch, n))) for i in range(0, n, batch)]

        def show(label: str, batches: Iterable[object]) -> None:
            print(f"  {label}: {steady_rate(batches, batch, device, args.warm):,.0f}", flush=True)

        print(
            f"{spec} on {torch.cuda.get_device_name() if cuda else 'cpu'}: {n} files, batch {batch}, images/s"
        )
        for w in workers:
            show(
                f"bytes loader alone, {w} workers",
                _loader(JpegFiles(dataset, encoder), index_batches, w, pack_jpegs),
            )
        packs = list(_loader(JpegFiles(dataset, encoder), index_batches, workers[0], pack_jpegs))
        decoder = DeviceDecoder(dataset, encoder)
        show("DeviceDecoder on loaded batches, main thread", map(decoder, packs))
        show("DeviceDecoder on loaded batches, one ahead in its thread", decoded_ahead(decoder, packs))
        if args.profile:
            profile_decoder(decoder, packs[: args.profile], cuda)

        def path() -> Iterable[InputBatch]:
            return input_batches(encoder, dataset, index_batches, "image", workers[0], "device")

        show(f"input_batches, {workers[0]} workers", path())
        dtype = next(encoder.model.parameters()).dtype

        def with_forward() -> Iterable[InputBatch]:
            with torch.inference_mode():
                for b in path():
                    encoder.model(b.inputs.to(dtype))
                    yield b

        show("input_batches + the bare forward", with_forward())
        x = torch.randn(batch, *decoder.shape, device=device, dtype=dtype)
        with torch.inference_mode():
            show("bare forward on device-resident pixels", (encoder.model(x) for _ in range(args.warm + 8)))


def profile_decoder(decoder: DeviceDecoder, packs: list[PackedJpegs], cuda: bool) -> None:
    """Where the decoder's time goes: ops by total device time on CUDA (host time on CPU)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for packed in packs:
            decoder(packed)
    sort = "device_time_total" if cuda else "cpu_time_total"
    print(f"DeviceDecoder on {len(packs)} loaded batches, by {sort}:")
    print(prof.key_averages().table(sort_by=sort, row_limit=30), flush=True)


if __name__ == "__main__":
    main()
