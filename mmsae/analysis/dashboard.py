"""Feature dashboards (PNG + HTML per latent) and a summary report over one or several SAEs.

A latent's page: its top-activating images with the patch heatmap overlaid, the histogram of its
activations, its name candidates and frequency/mean/max. The summary: the log-density histogram
of every SAE and where each sits on the FVU-vs-L0 plane.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
import numpy as np

from mmsae.analysis.heatmap import latent_heatmaps
from mmsae.analysis.images import ImageLike
from mmsae.analysis.naming import NameCandidate
from mmsae.analysis.stats import FeatureStats
from mmsae.checkpoint import atomic_write_bytes
from mmsae.datasets.images import open_image
from mmsae.encoders.base import Encoder
from mmsae.sae import SAE


def _png_bytes(fig: plt.Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _html_page(title: str, png: bytes, table_rows: Sequence[tuple[str, str]]) -> bytes:
    rows = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in table_rows)
    img = base64.b64encode(png).decode()
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
        f"<body><h1>{html.escape(title)}</h1><table>{rows}</table>"
        f"<img alt='{html.escape(title)}' src='data:image/png;base64,{img}'></body></html>"
    ).encode()


def feature_dashboard(
    latent: int,
    stats: FeatureStats,
    images: Sequence[ImageLike],
    out_dir: str | os.PathLike,
    names: Sequence[NameCandidate] = (),
    sae: SAE | None = None,
    encoder: Encoder | None = None,
    hook: str | None = None,
    max_images: int = 8,
) -> tuple[Path, Path]:
    """Write `latent_{i}.png` and `latent_{i}.html`; heatmaps are drawn when `sae` and `encoder` are given.

    `images` is the collection the stats pass ran over (stats example ids index it).
    """
    top = stats.top_examples(latent)
    ids = top.example_ids[:max_images]
    if len(ids) and ids.max() >= len(images):
        raise ValueError(
            f"Stats refer to example {ids.max()} but {len(images)} images were given: pass the "
            "collection the stats were computed on."
        )
    pil = [open_image(images[i]) for i in ids]
    maps = (
        latent_heatmaps(encoder, sae, pil, latent, hook)
        if sae is not None and encoder is not None and pil
        else []
    )

    n_cols = max(len(pil), 1)
    fig = plt.figure(figsize=(2.2 * max(n_cols, 4), 5.2))
    grid = fig.add_gridspec(2, n_cols, height_ratios=[1, 1])
    for col, im in enumerate(pil):
        ax = fig.add_subplot(grid[0, col])
        ax.imshow(im)
        if maps:
            ax.imshow(
                maps[col],
                cmap="inferno",
                alpha=0.5,
                extent=(0, im.width, im.height, 0),
                interpolation="nearest",
            )
        step = f" t={top.timestep[col]}" if top.timestep is not None else ""
        ax.set_title(f"#{ids[col]} {top.values[col]:.2f}{step}", fontsize=8)
        ax.axis("off")
    counts, edges = stats.activation_histogram(latent)
    ax = fig.add_subplot(grid[1, :])
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge")
    ax.set_xlabel("log10 activation (firing tokens)")
    ax.set_ylabel("tokens")
    label = ", ".join(f"{c.name} ({c.score:.2f})" for c in names) or "no names"
    fig.suptitle(f"latent {latent}: {label}", fontsize=10)
    png = _png_bytes(fig)

    out = Path(out_dir)
    png_path, html_path = out / f"latent_{latent}.png", out / f"latent_{latent}.html"
    atomic_write_bytes(png_path, png)
    rows = [
        ("names", label),
        ("firing frequency", f"{stats.frequency[latent].item():.3g}"),
        ("mean activation (when firing)", f"{stats.mean_activation[latent].item():.4g}"),
        ("max activation", f"{stats.max_activation[latent].item():.4g}"),
        ("top examples", ", ".join(f"{i}@tok{t}" for i, t in zip(top.example_ids, top.token_index))),
    ]
    atomic_write_bytes(html_path, _html_page(f"latent {latent}", png, rows))
    return png_path, html_path


def summary_report(
    runs: Mapping[str, FeatureStats], out_dir: str | os.PathLike, bins: int = 50
) -> tuple[Path, Path]:
    """Write `summary.png` / `summary.html`: log10 density histograms and FVU vs L0 of each named SAE."""
    if not runs:
        raise ValueError("summary_report needs at least one named FeatureStats.")
    fig, (ax_d, ax_f) = plt.subplots(1, 2, figsize=(11, 4))
    rows = []
    for name, stats in runs.items():
        counts, edges, n_dead = stats.density_histogram(bins)
        ax_d.stairs(counts, edges, label=f"{name} ({n_dead} dead)")
        ax_f.scatter(stats.l0, stats.fvu, label=name)
        ax_f.annotate(name, (stats.l0, stats.fvu), fontsize=8)
        rows.append(
            (
                name,
                f"FVU {stats.fvu:.4f}, L0 {stats.l0:.1f}, dead {n_dead}/{stats.n_latents}, "
                f"tokens {stats.n_tokens}",
            )
        )
    ax_d.set(xlabel="log10 firing frequency", ylabel="latents", title="feature density")
    ax_f.set(xlabel="L0 (active latents per token)", ylabel="FVU", title="reconstruction vs sparsity")
    ax_d.legend(fontsize=8)
    png = _png_bytes(fig)
    out = Path(out_dir)
    atomic_write_bytes(out / "summary.png", png)
    atomic_write_bytes(out / "summary.html", _html_page("SAE summary", png, rows))
    return out / "summary.png", out / "summary.html"
