"""The machine's limits on the input path of extraction from JPEG files: what decoding can deliver at best.

Input: the JPEG files of `bench_extract.py` (`write_jpegs`: random crops of the scikit-image photos scaled to
a `--short-side` px shorter side, quality 90: ~500 × 375, ~38 KiB, in the page cache). Every rate runs the
product's own operations, for the pipeline of each `--encoders` model (random init; only its preprocessing
is used):
  per core      one process, one torch thread: the file read of decode="device" workers (`read_jpeg`); the
                PIL decode (`open_image`), in full and at decode="draft"'s reduced size (`draft_size_of`);
                the pipeline's PIL resize and crop to uint8 alone, on decoded images (`split_pipeline`'s
                host half, what workers run); a loader worker's whole item (`EncoderInputs`: decode, resize,
                crop, uint8), with decode="pil" and decode="draft";
  workers       that item in P DataLoader workers (the product's loader, `mmsae.inputs._loader`: forked,
                one torch thread each, uint8 batches collated and handed to this process, not pinned) in
                steady state (the first 2·P batches are not timed), against P × the first row's rate;
  device        batched JPEG decode (`decode_jpegs`: nvJPEG on CUDA), then the whole main-process side of
                decode="device" (`DeviceDecoder` on packed batches: decode, per-image resize, crop,
                normalise), and on CUDA the host→device copy of a batch's packed bytes. Timed after a
                warm-up batch, with CUDA synchronisation. On the CPU the same code runs in this process.

    python -P benchmarks/bench_decode_limits.py --device cuda     # ViT-B/16 and CLIP ViT-B/32 pipelines
    python -P benchmarks/bench_decode_limits.py --small           # CPU smoke run: 16 files, P ≤ 2
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from timing import sync

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling; `-P` leaves the script's folder out
from bench_extract import JPEG_QUALITY, SHORT_SIDE, write_jpegs

from mmsae.datasets.gpu_decode import DevicePreprocess, EncodedJpeg, decode_jpegs, pack_jpegs, read_jpeg
from mmsae.datasets.image_io import open_image
from mmsae.datasets.images import ImageFolder
from mmsae.datasets.pixels import draft_size_of, split_pipeline
from mmsae.encoders import Encoder, get_encoder
from mmsae.inputs import DeviceDecoder, EncoderInputs, _loader, collate_inputs, probe_image, with_draft

ENCODERS = ("timm:vit_base_patch16_224", "clip:ViT-B-32")
SMALL_ENCODERS = ("timm:test_vit",)


@dataclass(frozen=True)
class Rate:
    """One row of the table: images/s of one operation."""

    section: str  # "per core", "workers", or the device decoding ran on
    what: str
    images_per_s: float
    note: str = ""

    def markdown(self) -> str:
        return f"| {self.section} | {self.what} | {self.images_per_s:,.0f} | {self.note} |"


def rate_of(
    fn: Callable[[object], object], items: Sequence[object], device: torch.device, warm: int = 1
) -> float:
    """items/s of `fn` over `items`, after `warm` untimed calls (first-call costs: handles, caches)."""
    for item in items[:warm]:
        fn(item)
    sync(device)
    start = time.perf_counter()
    for item in items:
        fn(item)
    sync(device)
    return len(items) / (time.perf_counter() - start)


def describe(encoder: Encoder) -> str:
    """The pipeline's geometry, as `decode="device"` reads it: e.g. 'Resize 248 bicubic, crop 224'."""
    p = DevicePreprocess.from_transform(encoder.image_pipeline)
    resize, crop = ("×".join(map(str, dict.fromkeys(s))) for s in (_sizes(p.resize), _sizes(p.crop)))
    return f"{encoder.id}: Resize {resize} {p.interpolation.value}" + (f", crop {crop}" if crop else "")


def _sizes(size: int | Sequence[int] | None) -> list[int]:
    return [] if size is None else [size] if isinstance(size, int) else list(size)


def host_transform(encoder: Encoder) -> Callable[[Image.Image], torch.Tensor]:
    """A loader worker's work on a decoded image: the PIL steps and the uint8 hand-off (`input_batches`)."""
    handoff = split_pipeline(encoder.image_pipeline, probe_image())
    return encoder.image_pipeline if handoff is None else handoff.host


def per_core_rates(dataset: ImageFolder, encoders: list[Encoder], n: int) -> list[Rate]:
    """One process, one torch thread: read, decode (full and draft), resize alone, a loader worker's item."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return decode_rows(dataset.paths[:n], encoders) + item_rows(dataset, encoders, n)
    finally:
        torch.set_num_threads(threads)


def decode_rows(paths: list[Path], encoders: list[Encoder]) -> list[Rate]:
    """The file read of decode="device" workers, and the PIL decode in full and at each draft size."""
    cpu, size = torch.device("cpu"), _size(paths[0])
    rows = [
        Rate(
            "per core", "file read (`read_jpeg`)", rate_of(read_jpeg, paths, cpu), "decode='device' workers"
        ),
        Rate("per core", "PIL decode (`open_image`)", rate_of(open_image, paths, cpu), f"first file {size}"),
    ]
    for draft in dict.fromkeys(draft_size_of(e.image_pipeline) for e in encoders):
        if draft is not None:
            decoded = open_image(paths[0], draft_size=draft).size
            rate = rate_of(lambda p, d=draft: open_image(p, draft_size=d), paths, cpu)
            note = f"{size} → {decoded[0]}×{decoded[1]}"
            rows.append(Rate("per core", f"PIL decode, draft ≥ {draft} px", rate, note))
    return rows


def item_rows(dataset: ImageFolder, encoders: list[Encoder], n: int) -> list[Rate]:
    """Per encoder: the PIL resize + crop + uint8 hand-off alone, on decoded images in memory; then a loader
    worker's whole item (`EncoderInputs`: decode and all that) with decode="pil" and decode="draft"."""
    cpu, indices = torch.device("cpu"), range(min(n, len(dataset)))
    images = [open_image(p) for p in dataset.paths[: len(indices)]]
    rows = []
    for encoder in encoders:
        transform = host_transform(encoder)
        rate = rate_of(transform, images, cpu)
        rows.append(Rate("per core", "resize + crop → uint8 (decoded images)", rate, describe(encoder)))
        for mode, data in (("pil", dataset), ("draft", with_draft(dataset, encoder))):
            rate = rate_of(EncoderInputs(data, transform).__getitem__, indices, cpu)
            what = f"decode + resize + crop → uint8, decode='{mode}'"
            rows.append(Rate("per core", what, rate, describe(encoder)))
    return rows


def _size(path: Path) -> str:
    with Image.open(path) as image:
        return f"{image.width}×{image.height}"


def steady_rate(batches: Iterable[object], batch: int, device: torch.device, warm: int) -> float:
    """images/s of the batches after the first `warm` ones (forks, imports, first calls are not timed)."""
    start, n = time.perf_counter(), 0
    for b, _ in enumerate(batches):
        if b == warm - 1:
            sync(device)
            start = time.perf_counter()
        elif b >= warm:
            n += batch
    sync(device)
    return n / (time.perf_counter() - start)


def loader_rate(items: EncoderInputs, n_files: int, workers: int, batch: int) -> float:
    """images/s of the product's loader with `workers` workers in steady state: the batches that arrive
    after the first 2 × `workers` (the prefetched ones: forks, imports, first calls) are timed."""
    warm, timed = 2 * workers, 4 * workers
    batches = [[(b * batch + j) % n_files for j in range(batch)] for b in range(warm + timed)]
    return steady_rate(_loader(items, batches, workers, collate_inputs), batch, torch.device("cpu"), warm)


def worker_rates(dataset: ImageFolder, encoder: Encoder, workers: list[int], batch: int) -> list[Rate]:
    """The loader worker's item (decode="pil") in P workers, against P × the one-worker rate."""
    items, rows = EncoderInputs(dataset, host_transform(encoder)), []
    per_worker = None  # of the first row: the yardstick of linear scaling
    for p in workers:
        rate = loader_rate(items, len(dataset), p, batch)
        per_worker = per_worker or rate / p
        note = f"{rate / (p * per_worker):.0%} of linear from P = {workers[0]}; {describe(encoder)}"
        rows.append(Rate("workers", f"P = {p}, batch {batch}", rate, note))
    return rows


def device_rates(
    dataset: ImageFolder, encoders: list[Encoder], device: torch.device, batches: Sequence[int]
) -> list[Rate]:
    """Batched JPEG decode, decode + decode='device''s preprocessing, and the copy of the bytes."""
    jpegs = [read_jpeg(p) for p in dataset.paths]
    if any(j is None for j in jpegs):
        raise ValueError(f"{dataset.describe()}: some files are not complete JPEGs; rewrite the folder.")
    cuda, rows = device.type == "cuda", []
    section = torch.cuda.get_device_name(device) if cuda else "cpu"
    library = "nvJPEG" if cuda else "torchvision's libjpeg-turbo, in this process"
    for batch in batches:
        chunks = [jpegs[i : i + batch] for i in range(0, len(jpegs), batch)]
        rate = rate_of(lambda c: decode_jpegs(c, device), chunks, device) * len(jpegs) / len(chunks)
        what = f"JPEG decode (`decode_jpegs`), batch {batch}"
        rows.append(Rate(section, what, rate, f"{library}, uint8 RGB out"))
    for encoder in encoders:
        decoder = DeviceDecoder(dataset, encoder.to(device))
        for batch in batches:
            packed = [pack_jpegs(_items(jpegs, i, batch)) for i in range(0, len(jpegs), batch)]
            rate = rate_of(decoder, packed, device) * len(jpegs) / len(packed)
            what = f"decode + preprocess (`DeviceDecoder`), batch {batch}"
            rows.append(Rate(section, what, rate, describe(encoder)))
        encoder.to("cpu")
    if cuda:
        rows += copy_rates(jpegs, device, section, max(batches))
    return rows


def _items(jpegs: list[EncodedJpeg], start: int, batch: int) -> list[tuple[int, EncodedJpeg, None]]:
    return [(i, jpegs[i], None) for i in range(start, min(start + batch, len(jpegs)))]


def copy_rates(jpegs: list[EncodedJpeg], device: torch.device, section: str, batch: int) -> list[Rate]:
    """Host → device copies of one batch's packed bytes (`PackedJpegs.blob`), pageable and pinned."""
    blob = pack_jpegs(_items(jpegs, 0, batch)).blob
    n = len(_items(jpegs, 0, batch))
    rows = []
    for kind, source in (("pageable", blob), ("pinned", blob.pin_memory())):
        rate = rate_of(lambda _, s=source: s.to(device, non_blocking=True), [None] * 50, device, warm=3)
        gbs = rate * blob.numel() / 1e9
        note = f"{gbs:.1f} GB/s ({blob.numel() / n / 1024:.0f} KiB a file)"
        rows.append(Rate(section, f"H2D copy of the packed bytes, {kind}, batch {batch}", rate * n, note))
    return rows


def markdown(header: str, rows: list[Rate]) -> str:
    lines = [header, "", "| section | what | images/s | note |", "|---|---|---:|---|"]
    return "\n".join(lines + [r.markdown() for r in rows])


def machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:  # not Linux
        pass
    gpu = f"; {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return f"{cpu}, {usable_cores()} usable cores of {os.cpu_count()} logical{gpu}"


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota (containers
    often see all of the host's cores in `os.cpu_count()`)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
    except (OSError, ValueError):  # no cgroup v2 limit file here
        return cores
    return cores if quota == "max" else max(1, min(cores, -(-int(quota) // int(period))))


def default_workers(small: bool) -> list[int]:
    """1, 2, 4, ... up to the usable cores, and their count itself (at most 2 for `--small`)."""
    cores = min(usable_cores(), 2) if small else usable_cores()
    powers = [1 << i for i in range(cores.bit_length()) if 1 << i <= cores]
    return powers + ([cores] if powers[-1] != cores else [])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-images", type=int, help="JPEG files written (default 2048; --small 16)")
    parser.add_argument("--short-side", type=int, default=SHORT_SIDE, help="their shorter side in px")
    parser.add_argument(
        "--workers", type=int, nargs="+", help="loader worker counts P (default 1, 2, 4, …, cores)"
    )
    parser.add_argument("--batch", type=int, default=64, help="loader batch of the workers rows")
    parser.add_argument("--device-batches", type=int, nargs="+", help="of the device rows (default 64 256)")
    parser.add_argument("--per-core", type=int, default=256, help="files timed in each per-core row")
    parser.add_argument("--encoders", nargs="+", help=f"whose pipelines (default {' '.join(ENCODERS)})")
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], help="of the device rows (default cuda if present)"
    )
    parser.add_argument("--small", action="store_true", help="CPU smoke run: 16 files, timm:test_vit, P ≤ 2")
    parser.add_argument("--out", help="where the temp folder of JPEG files goes")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.workers is not None and min(args.workers) < 1:
        parser.error(f"--workers {args.workers}: give worker counts of 1 or more.")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here; use --device cpu.")
    args.n_images = args.n_images or (16 if args.small else 2048)
    args.encoders = args.encoders or list(SMALL_ENCODERS if args.small else ENCODERS)
    args.workers = args.workers or default_workers(args.small)
    args.device_batches = sorted(set(args.device_batches or ([4, 8] if args.small else [64, 256])))
    args.device = args.device or ("cpu" if args.small or not torch.cuda.is_available() else "cuda")
    if args.small:
        args.batch, args.per_core = min(args.batch, 4), min(args.per_core, args.n_images)
    return args


def run(args: argparse.Namespace) -> tuple[str, list[Rate]]:
    """Write the files, measure every row; (the header line, the rows)."""
    device = torch.device(args.device)
    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.ERROR)  # open_clip's "no pretrained weights" notice: random init is the point
    try:
        encoders = [get_encoder(spec, pretrained=False) for spec in args.encoders]
    finally:
        root.setLevel(level)
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        dataset = write_jpegs(Path(tmp) / "jpegs", args.n_images, args.short_side)
        kib = sum(p.stat().st_size for p in dataset.paths) / len(dataset) / 1024
        header = (
            f"{machine(device)}; {len(dataset)} JPEG files (photo crops, shorter side {args.short_side} px, "
            f"quality {JPEG_QUALITY}, mean {kib:.0f} KiB, in the page cache); "
            f"{datetime.date.today().isoformat()}; images/s"
        )
        rows = per_core_rates(dataset, encoders, args.per_core)  # before CUDA starts: the workers fork
        for encoder in encoders:
            rows += worker_rates(dataset, encoder, args.workers, args.batch)
        rows += device_rates(dataset, encoders, device, args.device_batches)
    return header, rows


def main(argv: list[str] | None = None) -> list[Rate]:
    args = parse_args(argv)
    header, rows = run(args)
    print(markdown(header, rows), flush=True)
    if args.json is not None:
        report = {"machine": header, "args": {k: str(v) for k, v in vars(args).items()}}
        report["rows"] = [dataclasses.asdict(r) for r in rows]
        partial = args.json.with_name(args.json.name + ".partial")
        partial.write_text(json.dumps(report, indent=1))
        partial.replace(args.json)  # atomic: a reader never sees half a report
    return rows


if __name__ == "__main__":
    main()
