"""Extraction and activation-store throughput, with the bare forward as the yardstick.

Input: real JPEG files written once to a temp dir (random crops of the scikit-image photos, shorter side
375 px, quality 90: ImageNet-like sizes and compression). For each encoder (random init), images/s of:
  bare / hooked     the forward / `encoder.activations` on device-resident pixels;
  store             (a) hooked forward + cast + async copy + shard writer on those pixels: extraction
                    without input loading, i.e. the store's own cost (issue #3: ≤ 10 % over the forward);
  PIL loader        decode + transform in DataLoader workers alone;
  extract PIL       (b) `mmsae.extract` end to end from the JPEG files, decode="pil" (the default);
  device decode     workers read bytes, batch decode + preprocessing on the device (nvJPEG on CUDA) alone;
  extract device    (c) `mmsae.extract(..., decode="device")` end to end.
Then store read GB/s (shuffled batches, into the device) and SAE training tokens/s fed from the store vs
from an in-memory tensor (`mmsae.train`).

    python benchmarks/bench_extract.py --device cuda     # full size: ViT-B/16 and CLIP ViT-B-32, bf16
    python benchmarks/bench_extract.py                   # CPU, small: the tiny presets
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from PIL import Image
from timing import sync

from mmsae.datasets.images import ExampleDataset, ImageFolder, RandomCrops, SkimagePhotos
from mmsae.encoders import Encoder, get_encoder
from mmsae.extract import extract
from mmsae.inputs import InputBatch, input_batches
from mmsae.store import ActivationStore, write_shards

SHORT_SIDE, JPEG_QUALITY = 375, 90


@dataclass(frozen=True)
class Setup:
    encoders: tuple[str, ...]
    n_images: int
    batch_size: int
    num_workers: int
    model_dtype: torch.dtype
    sae_features: int
    train_tokens: int


SETUPS = {
    "cuda": Setup(
        ("timm:vit_base_patch16_224", "clip:ViT-B-32"),
        8192,
        256,
        min(12, os.cpu_count() or 1),
        torch.bfloat16,
        16384,
        4_000_000,
    ),
    "cpu": Setup(("timm:test_vit", "clip:tiny"), 96, 16, 0, torch.float32, 256, 50_000),
}


@dataclass(frozen=True)
class Row:
    """One encoder's line of the extraction table (rates in images/s unless named GB/s)."""

    HEADER: ClassVar[tuple[str, ...]] = (
        "encoder",
        "hook",
        "mode",
        "tokens",
        "d",
        "bare fwd",
        "hooked",
        "store",
        "store/bare",
        "store GB/s",
        "disk GB/s",
        "PIL loader",
        "extract PIL",
        "PIL/bare",
        "dev decode",
        "extract dev",
        "dev/bare",
    )
    spec: str
    hook: str
    mode: str
    n_tokens: int
    d: int
    bare: float
    hooked: float
    store: float
    store_gbs: float
    disk_gbs: float
    pil_loader: float
    pil: float
    dev_loader: float
    dev: float

    def markdown(self) -> str:
        cells = (
            self.spec,
            self.hook,
            self.mode,
            f"{self.n_tokens:,}",
            self.d,
            f"{self.bare:,.0f}",
            f"{self.hooked:,.0f}",
            f"{self.store:,.0f}",
            f"{self.store / self.bare:.2f}",
            f"{self.store_gbs:.2f}",
            f"{self.disk_gbs:.2f}",
            f"{self.pil_loader:,.0f}",
            f"{self.pil:,.0f}",
            f"{self.pil / self.bare:.2f}",
            f"{self.dev_loader:,.0f}",
            f"{self.dev:,.0f}",
            f"{self.dev / self.bare:.2f}",
        )
        return "| " + " | ".join(map(str, cells)) + " |"


def write_jpegs(root: Path, n: int, short_side: int = SHORT_SIDE) -> ImageFolder:
    """`n` JPEG files: random crops of the scikit-image photos scaled to a `short_side` px shorter side.

    Noise would compress badly (3× the bytes of a photo), so decode cost would not be typical."""
    crops = RandomCrops(SkimagePhotos(), n, scale=(0.4, 1.0))
    root.mkdir(parents=True)

    def write(i: int) -> None:
        image = crops[i].image
        scale = short_side / min(image.size)
        size = (round(image.width * scale), round(image.height * scale))
        image = image.resize(size, Image.Resampling.LANCZOS)
        image.save(root / f"{i:06d}.jpg", quality=JPEG_QUALITY)

    with ThreadPoolExecutor(os.cpu_count()) as pool:  # PIL releases the GIL while resizing and encoding
        list(pool.map(write, range(n)))
    return ImageFolder(root)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def forward_rates(encoder: Encoder, hook: str, setup: Setup) -> tuple[float, float]:
    """images/s of the bare forward and of the hooked forward, on pixels already on the device."""
    size = encoder.transform(Image.new("RGB", (224, 224))).shape
    pixels = torch.randn(setup.batch_size, *size, device=encoder.device, dtype=setup.model_dtype)
    n_batches = max(1, setup.n_images // setup.batch_size)

    def bare() -> None:
        with torch.inference_mode():
            for _ in range(n_batches):
                encoder.run_model(pixels)

    def hooked() -> None:
        for _ in range(n_batches):
            encoder.activations(pixels, [hook])

    bare(), hooked()  # warm-up (cuDNN/cuBLAS heuristics, allocator)
    n = n_batches * setup.batch_size
    return n / timed(bare, encoder.device), n / timed(hooked, encoder.device)


def store_rate(encoder: Encoder, hook: str, setup: Setup, root: Path, tokens: str) -> float:
    """(a) images/s of extraction from device-resident pixels: hooked forward, cast, async device→host
    copy and shard writer (`write_shards`, as in `extract`), everything but input loading."""
    size = encoder.transform(Image.new("RGB", (224, 224))).shape
    pixels = torch.randn(setup.batch_size, *size, device=encoder.device, dtype=setup.model_dtype)
    n_batches = max(1, setup.n_images // setup.batch_size)
    info = {"hooks": {hook: {}}, "shards": [None], "config": {"dtype": "float16"}}
    batch = InputBatch(list(range(setup.batch_size)), pixels)
    plan = [(0, i == n_batches - 1) for i in range(n_batches)]  # one shard: committed after the last batch
    root.mkdir()
    forwards = ((batch, encoder.activations(pixels, [hook], tokens)) for _ in plan)
    seconds = timed(lambda: write_shards(root, info, plan, forwards), encoder.device)
    shutil.rmtree(root)
    return n_batches * setup.batch_size / seconds


def disk_rate(root: Path, n_bytes: int) -> float:
    """GB/s of a plain sequential write + fsync of `n_bytes` under `root`: the ceiling of any store there."""
    chunk = os.urandom(64 << 20)
    path = root / "disk-probe.bin"
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(max(1, n_bytes // len(chunk))):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return max(1, n_bytes // len(chunk)) * len(chunk) / seconds / 1e9


def _index_batches(n: int, batch_size: int) -> list[list[int]]:
    return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


def loader_rate(encoder: Encoder, dataset: ExampleDataset, setup: Setup, decode: str) -> float:
    """images/s of input loading alone (`mmsae.inputs.input_batches`, what `extract` runs): pixels on the
    device from PIL in workers, or from bytes read in workers and decoded on the device."""
    batches = _index_batches(len(dataset), setup.batch_size)

    def load() -> None:
        for _ in input_batches(encoder, dataset, batches, "image", setup.num_workers, decode):
            pass

    return len(dataset) / timed(load, encoder.device)


def extract_rate(
    encoder: Encoder, dataset: ExampleDataset, hook: str, setup: Setup, out: Path, decode: str, tokens: str
) -> tuple[float, ActivationStore]:
    """(b)/(c) images/s of `mmsae.extract` end to end from the JPEG files."""
    start = time.perf_counter()
    store = extract(
        encoder,
        dataset,
        hook,
        out,
        tokens=tokens,
        batch_size=setup.batch_size,
        num_workers=setup.num_workers,
        progress=False,
        decode=decode,
    )
    sync(encoder.device)
    return len(dataset) / (time.perf_counter() - start), store


def read_rate(store: ActivationStore, device: torch.device, batch_size: int, on_gpu: bool) -> float:
    """GB/s of stored bytes delivered as shuffled fp32 batches on the device, moved as the trainer moves
    them: shuffled on the GPU (`on_gpu`, the trainer's default there), or on the host in the store dtype and
    copied through pinned memory, converted on the device."""

    def read() -> None:
        for batch in store.batches(batch_size, dtype=None, device=device if on_gpu else None):
            pinned = batch.pin_memory() if device.type == "cuda" and not on_gpu else batch
            pinned.to(device, non_blocking=True).float()

    n_bytes = store.n_tokens * store.d_in * torch.finfo(getattr(torch, store.dtype)).bits // 8
    return n_bytes / timed(read, device) / 1e9


def train_rate(data: object, setup: Setup, batch_size: int, stage: bool | None = None) -> float:
    """Tokens/s of `mmsae.train` (TopK) over `setup.train_tokens` tokens."""
    import mmsae

    start = time.perf_counter()
    mmsae.train(
        data,
        sae="topk",
        n_features=setup.sae_features,
        k=32,
        tokens=setup.train_tokens,
        batch_size=batch_size,
        warmup_steps=10,
        stage=stage,
    )
    return setup.train_tokens / (time.perf_counter() - start)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--encoders", nargs="+", help="get_encoder specs (default: per device)")
    parser.add_argument("--n-images", type=int)
    parser.add_argument("--out", default=None, help="where the temp dir of JPEG files and stores goes")
    parser.add_argument(
        "--tokens",
        nargs="+",
        default=["all"],
        help="token modes, a row each (e.g. all cls: cls writes ~200× fewer bytes, so the "
        "store's own cost shows where the disk is not the limit); training reads the "
        "first encoder's store of the first mode",
    )
    return parser.parse_args()


def extraction_rows(
    setup: Setup, device: torch.device, dataset: ImageFolder, tmp: Path, token_modes: list[str]
) -> tuple[list[Row], list[ActivationStore]]:
    """A table row per (encoder, token mode), and the PIL-path stores they wrote."""
    rows, stores = [], []
    for spec in setup.encoders:
        encoder = get_encoder(spec, pretrained=False, device=device, dtype=setup.model_dtype)
        hook = encoder.default_hook
        bare, hooked = forward_rates(encoder, hook, setup)
        pil_loader = loader_rate(encoder, dataset, setup, "pil")
        dev_loader = loader_rate(encoder, dataset, setup, "device")
        for tokens in token_modes:
            store_only = store_rate(encoder, hook, setup, tmp / "pixels", tokens)
            pil, store = extract_rate(encoder, dataset, hook, setup, tmp / "pil", "pil", tokens)
            stores.append(store)
            dev, dev_store = extract_rate(encoder, dataset, hook, setup, tmp / "device", "device", tokens)
            shutil.rmtree(dev_store.path)  # disk: only the PIL stores are read below
            bytes_per_image = store.n_tokens * store.d_in * 2 / len(dataset)
            disk = disk_rate(tmp, int(bytes_per_image * setup.n_images))
            rows.append(
                Row(
                    spec,
                    hook,
                    tokens,
                    store.n_tokens,
                    store.d_in,
                    bare,
                    hooked,
                    store_only,
                    store_only * bytes_per_image / 1e9,
                    disk,
                    pil_loader,
                    pil,
                    dev_loader,
                    dev,
                )
            )
        del encoder
    return rows, stores


def training_report(store: ActivationStore, setup: Setup, device: torch.device) -> str:
    """Store read rates (printed as measured) and SAE training from the store vs from memory."""
    token_batch = 4096
    host_gbs = read_rate(store, device, token_batch, on_gpu=False)
    gpu_gbs = read_rate(store, device, token_batch, on_gpu=True) if device.type == "cuda" else math.nan
    print(
        f"\nstore read ({setup.encoders[0]}, {store.n_tokens} tokens × {store.d_in}, fp16, "
        f"shuffled batches of {token_batch} → {device.type} fp32): shuffled on the host {host_gbs:.2f} "
        f"GB/s, on the GPU {gpu_gbs:.2f} GB/s",
        flush=True,
    )
    in_memory = torch.cat(list(store.batches(1 << 16, shuffle=False, dtype=None)))
    # A first short run pays CUDA init and the Triton JIT, which would otherwise bill whichever
    # source is timed first.
    train_rate(in_memory, dataclasses.replace(setup, train_tokens=20 * token_batch), token_batch)
    from_store = train_rate(store, setup, token_batch)
    from_memory = train_rate(in_memory, setup, token_batch)
    host_store = train_rate(store, setup, token_batch, stage=False)
    return (
        f"SAE training (TopK, {setup.sae_features} features, k=32, batch {token_batch}, "
        f"{setup.train_tokens} tokens): from store {from_store:,.0f} tok/s, from memory "
        f"{from_memory:,.0f} tok/s, ratio {from_store / from_memory:.2f}; from store shuffled "
        f"on the host (stage=False) {host_store:,.0f} tok/s"
    )


def main() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # keep the table readable
    args = parse_args()
    setup = SETUPS[args.device]
    setup = Setup(
        tuple(args.encoders or setup.encoders),
        args.n_images or setup.n_images,
        *list(vars(setup).values())[2:],
    )
    device = torch.device(args.device)
    name = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"{platform.processor() or 'cpu'} ({torch.get_num_threads()} threads)"
    )
    with tempfile.TemporaryDirectory(dir=args.out) as tmp_dir:
        tmp = Path(tmp_dir)
        dataset = write_jpegs(tmp / "jpegs", setup.n_images)
        kib = sum(p.stat().st_size for p in dataset.paths) / len(dataset.paths) / 1024
        report = [
            f"device: {name}; {setup.n_images} JPEG files (photo crops, shorter side {SHORT_SIDE} px, "
            f"quality {JPEG_QUALITY}, mean {kib:.0f} KiB, in the page cache), "
            f"batch {setup.batch_size}, {setup.num_workers} loader workers, model dtype "
            f"{setup.model_dtype}, store fp16"
        ]
        rows, stores = extraction_rows(setup, device, dataset, tmp, args.tokens)
        report.append("\n(images/s; ratios to the bare forward)")
        report += ["| " + " | ".join(Row.HEADER) + " |", "|---|---|" + "---:|" * (len(Row.HEADER) - 2)]
        report += [r.markdown() for r in rows]
        print("\n".join(report), flush=True)  # the extraction table, before the slower training part
        print(training_report(stores[0], setup, device))


if __name__ == "__main__":
    main()
