"""Load test of the apps: concurrent gradio_client users issue mixed search/steer requests to one server.

One server process on 127.0.0.1 serves the concept-search and steering apps as two tabs of one Gradio
page (so they share the model and its lock, as they would in production), on tiny random-init models
(clip:tiny, a top-k SAE of 64 features, an index of 6 photos). Each user is a `gradio_client.Client`
in its own thread, looping until the deadline over a fixed mix: text search, image search (an upload),
steering (an upload and CLIP zero-shot labels) and, from one dedicated user, the slowest request the
apps accept (steering at every size bound: the most labels, each of the longest length) alternating
with one past the bound (10,000 labels), which must be refused at once. Nothing leaves the machine;
the run is bounded in users and seconds.

    .venv/bin/python benchmarks/bench_apps_load.py --users 20 --seconds 60

Prints a markdown table (paste into docs/benchmarks.md) and optionally writes JSON (`--json`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import resource
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

KINDS = ("search_text", "search_image", "steer", "steer_at_bound", "steer_over_bound")
OVER_BOUND_LABELS = ", ".join(f"label{i}" for i in range(10_000))  # ~110 KB: must be refused at once
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "brick", "camera")
QUERIES = ("a photo of a cat", "a rocket at night", "a cup of coffee", "a brick wall", "a person")


@dataclass
class Report:
    users: int
    seconds: float
    requests: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    latencies_s: dict[str, list[float]] = field(default_factory=dict)
    rss_before_mb: float = 0.0
    rss_after_mb: float = 0.0
    peak_rss_mb: float = 0.0

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def percentile(self, kind: str | None, q: float) -> float:
        values = [v for k, vs in self.latencies_s.items() if kind in (None, k) for v in vs]
        return float(np.percentile(values, q)) if values else float("nan")

    def table(self) -> str:
        rows = [
            "| requests | n | p50 (s) | p99 (s) | max (s) |",
            "|---|---:|---:|---:|---:|",
        ]
        for kind in (*KINDS, None):
            values = [v for k, vs in self.latencies_s.items() if kind in (None, k) for v in vs]
            if values:
                rows.append(
                    f"| {kind or 'all'} | {len(values)} | {self.percentile(kind, 50):.3f} | "
                    f"{self.percentile(kind, 99):.3f} | {max(values):.3f} |"
                )
        return "\n".join(rows)


def rss_mb() -> float:
    """Resident memory of this process (Linux /proc), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bound_labels(limits) -> str:  # limits: mmsae.apps.common.Limits
    """Zero-shot labels at the apps' bounds: the most labels, each of the longest length."""
    return ", ".join(f"{i:02d}" + "w" * (limits.word_chars - 2) for i in range(limits.labels))


@contextmanager
def serve(photos_dir: Path) -> Iterator[tuple[str, list[int]]]:
    """Search and steering apps as two tabs of one Gradio server on 127.0.0.1.

    Yields its URL and the features that fire on the photos (steering a dead one is refused)."""
    import gradio as gr
    import torch

    from mmsae.apps.common import AppSettings, FeatureCatalog
    from mmsae.apps.search import build_search_app
    from mmsae.apps.steer import build_steer_app
    from mmsae.encoders import get_encoder
    from mmsae.index import ConceptIndex, IndexConfig
    from mmsae.sae import build_sae

    torch.manual_seed(0)
    clip = get_encoder("clip:tiny")
    sae = build_sae("topk", 32, 64, k=4, hook="visual.transformer.resblocks.1", encoder=clip.id)
    index = ConceptIndex.build(clip, sae, photos_dir, cfg=IndexConfig(batch_size=6))
    settings = AppSettings(data_dirs=[photos_dir])
    search = build_search_app(index, settings)
    steer = build_steer_app(clip, sae, settings, FeatureCatalog.from_index(index))
    demo = gr.TabbedInterface([search, steer], ["Search", "Steer"])
    _, url, _ = demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    try:
        yield url, sorted({int(f) for f in index.codes.csr.indices})
    finally:
        demo.close()


def write_photos(folder: Path) -> Path:
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(folder / f"{name}.png")
    return folder


def requests_for(
    client, photos: list[Path], features: list[int], labels_at_bound: str
) -> dict[str, Callable[[random.Random], None]]:
    """One callable per request kind, each issuing one request through `client`."""
    from gradio_client import handle_file

    def search_text(rng: random.Random) -> None:
        client.predict(rng.choice(QUERIES), None, rng.randint(1, 12), "off", "", api_name="/search")

    def search_image(rng: random.Random) -> None:
        image = handle_file(str(rng.choice(photos)))
        client.predict("", image, rng.randint(1, 12), "off", "", api_name="/search")

    def steer(rng: random.Random, labels: str = "cat, dog, car, building") -> None:
        image = handle_file(str(rng.choice(photos)))
        feature, strength = str(rng.choice(features)), rng.uniform(-10, 10)
        client.predict(image, labels, feature, strength, None, 0, None, 0, api_name="/steer")

    def steer_over_bound(rng: random.Random) -> None:
        try:
            steer(rng, OVER_BOUND_LABELS)
        except Exception as e:
            if "the limit is" in str(e):
                return
            raise
        raise RuntimeError("a request past the size bound was accepted")

    return {
        "search_text": search_text,
        "search_image": search_image,
        "steer": steer,
        "steer_at_bound": lambda rng: steer(rng, labels_at_bound),
        "steer_over_bound": steer_over_bound,
    }


def run_load(
    url: str, photos: list[Path], features: list[int], users: int, seconds: float, seed: int = 0
) -> Report:
    """`users` clients (one of them sending only at-bound requests) hammer `url` for `seconds`."""
    from gradio_client import Client

    from mmsae.apps.common import Limits

    report = Report(users=users, seconds=seconds, latencies_s={k: [] for k in KINDS})
    lock = threading.Lock()
    clients = [Client(url, verbose=False) for _ in range(users)]
    warm = requests_for(clients[0], photos, features, bound_labels(Limits()))
    for kind in ("search_text", "steer"):  # first requests measure steering's max activations
        warm[kind](random.Random(seed))
    report.rss_before_mb = rss_mb()
    deadline = time.perf_counter() + seconds

    def user(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        calls = requests_for(clients[i], photos, features, bound_labels(Limits()))
        slow = ["steer_at_bound", "steer_over_bound"]
        for n in itertools.count():
            if time.perf_counter() >= deadline:
                break
            kind = slow[n % 2] if i == 0 else rng.choice(["search_text", "search_image", "steer"])
            start = time.perf_counter()
            try:
                calls[kind](rng)
                error = None
            except Exception as e:  # a failed request is counted and reported, never fatal
                error = f"{kind}: {type(e).__name__}: {str(e)[:200]}"
            with lock:
                report.requests += 1
                report.latencies_s[kind].append(time.perf_counter() - start)
                if error is not None:
                    report.failed += 1
                    report.errors.append(error)

    threads = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 120)
    report.rss_after_mb = rss_mb()
    report.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=20, help="concurrent clients (at most 64)")
    p.add_argument("--seconds", type=float, default=60.0, help="duration of the load (at most 600)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the report here")
    args = p.parse_args()
    if not (1 <= args.users <= 64 and 0 < args.seconds <= 600):
        p.error("--users must lie within 1..64 and --seconds within 0..600 (the run is bounded).")
    with tempfile.TemporaryDirectory(prefix="mmsae-load-") as tmp:
        photos = sorted(write_photos(Path(tmp) / "photos").glob("*.png"))
        with serve(photos[0].parent) as (url, features):
            report = run_load(url, photos, features, args.users, args.seconds, args.seed)
    print(
        f"{args.users} users, {args.seconds:g} s, {os.cpu_count()}-core {platform.machine()} CPU: "
        f"{report.requests} requests ({report.throughput:.1f}/s), {report.failed} failed; "
        f"RSS {report.rss_before_mb:.0f} → {report.rss_after_mb:.0f} MiB (peak {report.peak_rss_mb:.0f})"
    )
    print(report.table())
    for error in report.errors[:10]:
        print("error:", error)
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2))


if __name__ == "__main__":
    main()
