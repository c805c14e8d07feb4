"""Extraction and activation-store throughput, with the bare forward as the yardstick.

For each encoder (random init): images/s of the bare forward on device-resident pixels, of the hooked
forward (`encoder.activations`), of the data loader alone (decode + transform in workers) and of the
whole extraction to a store (`mmsae.extract`); then store read GB/s (shuffled batches, into the device)
and SAE training tokens/s fed from the store vs from an in-memory tensor (`mmsae.train`).

    python benchmarks/bench_extract.py --device cuda     # full size: ViT-B/16 and CLIP ViT-B-32, bf16
    python benchmarks/bench_extract.py                   # CPU, small: the tiny presets
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mmsae.datasets.images import Example, ExampleDataset
from mmsae.encoders import Encoder, get_encoder
from mmsae.extract import EncoderInputs, collate_inputs, extract
from mmsae.store import ActivationStore


@dataclass(frozen=True)
class Setup:
    encoders: tuple[str, ...]
    n_images: int
    batch_size: int
    num_workers: int
    model_dtype: torch.dtype
    sae_latents: int
    train_tokens: int


SETUPS = {
    "cuda": Setup(("timm:vit_base_patch16_224", "clip:ViT-B-32"), 8192, 256, min(12, os.cpu_count() or 1),
                  torch.bfloat16, 16384, 4_000_000),
    "cpu": Setup(("timm:test_vit", "clip:tiny"), 96, 16, 0, torch.float32, 256, 50_000),
}


class NoiseImages(ExampleDataset):
    """Deterministic random RGB images at a typical input size (decode cost is not what is measured)."""

    def __init__(self, n: int, size: int = 224):
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Example:
        rng = np.random.default_rng(index)
        pixels = rng.integers(0, 255, (self.size, self.size, 3), np.uint8)
        return Example(index, image=Image.fromarray(pixels))

    def fingerprint(self) -> str:
        return hashlib.sha256(f"noise{self.n}x{self.size}".encode()).hexdigest()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
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


def loader_rate(encoder: Encoder, dataset: ExampleDataset, setup: Setup) -> float:
    batches = [list(range(i, min(i + setup.batch_size, len(dataset)))) for i in range(0, len(dataset),
                                                                                      setup.batch_size)]
    loader = DataLoader(EncoderInputs(dataset, encoder, "image"), batch_sampler=batches,
                        num_workers=setup.num_workers, collate_fn=collate_inputs)
    start = time.perf_counter()
    for _ in loader:
        pass
    return len(dataset) / (time.perf_counter() - start)


def read_rate(store: ActivationStore, device: torch.device, batch_size: int) -> float:
    """GB/s of stored bytes delivered as shuffled fp32 batches on the device."""
    def read() -> None:
        for batch in store.batches(batch_size, buffer_tokens=1 << 20):
            batch.to(device, non_blocking=True)

    n_bytes = store.n_tokens * store.d_in * torch.finfo(getattr(torch, store.dtype)).bits // 8
    return n_bytes / timed(read, device) / 1e9


def train_rate(data: object, setup: Setup, batch_size: int) -> float:
    """Tokens/s of `mmsae.train` (TopK) over `setup.train_tokens` tokens."""
    import mmsae

    start = time.perf_counter()
    mmsae.train(data, sae="topk", n_latents=setup.sae_latents, k=32, tokens=setup.train_tokens,
                batch_size=batch_size, warmup_steps=10)
    return setup.train_tokens / (time.perf_counter() - start)


def main() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # keep the table readable
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--encoders", nargs="+", help="get_encoder specs (default: per device)")
    parser.add_argument("--n-images", type=int)
    parser.add_argument("--out", default=None, help="store directory (default: a temp dir)")
    args = parser.parse_args()
    setup = SETUPS[args.device]
    setup = Setup(tuple(args.encoders or setup.encoders), args.n_images or setup.n_images,
                  *list(vars(setup).values())[2:])
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else \
        f"{platform.processor() or 'cpu'} ({torch.get_num_threads()} threads)"
    report = [f"device: {name}; {setup.n_images} images of 224², batch {setup.batch_size}, "
              f"{setup.num_workers} loader workers, model dtype {setup.model_dtype}, store fp16, all tokens"]
    rows = []
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        dataset = NoiseImages(setup.n_images)
        stores = []
        for spec in setup.encoders:
            encoder = get_encoder(spec, pretrained=False, device=device, dtype=setup.model_dtype)
            hook = encoder.default_hook
            bare, hooked = forward_rates(encoder, hook, setup)
            loader = loader_rate(encoder, dataset, setup)
            _sync(device)
            start = time.perf_counter()
            store = extract(encoder, dataset, hook, tmp, batch_size=setup.batch_size,
                            num_workers=setup.num_workers, progress=False)
            _sync(device)
            seconds = time.perf_counter() - start
            stores.append(store)
            rows.append((spec, hook, store.n_tokens, store.d_in, bare, hooked, loader,
                         setup.n_images / seconds))
            del encoder
        report.append(f"\n{'encoder':28} {'hook':34} {'tokens':>9} {'d':>5} {'bare fwd':>9} {'hooked':>9} "
                      f"{'loader':>9} {'extract':>9} {'extract/bare':>12}   (images/s)")
        report += [f"{spec:28} {hook:34} {n_tok:9d} {d:5d} {bare:9.1f} {hooked:9.1f} {loader:9.1f} "
                   f"{ext:9.1f} {ext / bare:12.2f}"
                   for spec, hook, n_tok, d, bare, hooked, loader, ext in rows]
        print("\n".join(report), flush=True)  # the extraction table, before the slower training part
        report = []
        store = stores[0]
        token_batch = 4096
        gbs = read_rate(store, device, token_batch)
        report.append(f"\nstore read ({setup.encoders[0]}, {store.n_tokens} tokens × {store.d_in}, fp16, "
                      f"shuffled batches of {token_batch} → {device.type} fp32): {gbs:.2f} GB/s")
        in_memory = torch.cat(list(store.batches(1 << 16, shuffle=False)))
        from_store = train_rate(store, setup, token_batch)
        from_memory = train_rate(in_memory, setup, token_batch)
        report.append(f"SAE training (TopK, {setup.sae_latents} latents, k=32, batch {token_batch}, "
                      f"{setup.train_tokens} tokens): from store {from_store:,.0f} tok/s, from memory "
                      f"{from_memory:,.0f} tok/s, ratio {from_store / from_memory:.2f}")
    print("\n".join(report))


if __name__ == "__main__":
    main()
