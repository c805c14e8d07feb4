"""Feature dashboards (PNG + HTML per feature) and a summary report over one or several SAEs.

A feature's page: its top-activating images with the patch heatmap overlaid, the histogram of its
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
from PIL import Image

from mmsae.analysis.heatmap import feature_heatmaps
from mmsae.analysis.images import ImageLike
from mmsae.analysis.localization import ObjectScore
from mmsae.analysis.naming import NameCandidate
from mmsae.analysis.objects import model_view
from mmsae.analysis.stats import FeatureStats
from mmsae.datasets.images import open_image
from mmsae.encoders.base import Encoder
from mmsae.fileio import atomic_write_bytes
from mmsae.legacy_names import legacy_kwargs
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


def _mark_top_patch(ax: plt.Axes, heat_HW: np.ndarray, size: tuple[int, int]) -> None:
    """Outline the patch where the feature fires most (the top-activating patch of this image)."""
    h, w = heat_HW.shape
    r, c = np.unravel_index(int(np.argmax(heat_HW)), heat_HW.shape)
    pw, ph = size[0] / w, size[1] / h
    ax.add_patch(plt.Rectangle((c * pw, r * ph), pw, ph, fill=False, edgecolor="cyan", linewidth=1.2))


@legacy_kwargs
def feature_dashboard(
    feature: int,
    stats: FeatureStats,
    images: Sequence[ImageLike],
    out_dir: str | os.PathLike,
    names: Sequence[NameCandidate] = (),
    sae: SAE | None = None,
    encoder: Encoder | None = None,
    hook: str | None = None,
    max_images: int = 8,
) -> tuple[Path, Path]:
    """Write `feature_{i}.png` and `feature_{i}.html`; heatmaps are drawn when `sae` and `encoder` are given.

    `images` is the collection the stats pass ran over (stats example ids index it).
    """
    top = stats.top_examples(feature)
    ids = top.example_ids[:max_images]
    if len(ids) and ids.max() >= len(images):
        raise ValueError(
            f"Stats refer to example {ids.max()} but {len(images)} images were given: pass the "
            "collection the stats were computed on."
        )
    pil = [open_image(images[i]) for i in ids]
    maps = []
    if sae is not None and encoder is not None and pil:
        maps = feature_heatmaps(encoder, sae, pil, feature, hook)
        # Draw on what the model saw: its centre crop of a non-square image, not the whole image.
        pil = [model_view(encoder, im) for im in pil]

    n_cols = max(len(pil), 1)
    fig = plt.figure(figsize=(2.2 * max(n_cols, 4), 5.2))
    grid = fig.add_gridspec(2, n_cols, height_ratios=[1, 1])
    for col, im in enumerate(pil):
        ax = fig.add_subplot(grid[0, col])
        ax.imshow(im)
        if maps:
            ax.imshow(
                np.ma.masked_less_equal(maps[col], 0),  # silent patches stay clear
                cmap="inferno",
                alpha=0.7,
                vmin=0,
                extent=(0, im.width, im.height, 0),
                interpolation="nearest",
            )
            _mark_top_patch(ax, maps[col], im.size)
        step = f" t={top.timestep[col]}" if top.timestep is not None else ""
        ax.set_title(f"#{ids[col]} {top.values[col]:.2f}{step}", fontsize=8)
        ax.axis("off")
    counts, edges = stats.activation_histogram(feature)
    ax = fig.add_subplot(grid[1, :])
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge")
    ax.set_xlabel("log10 activation (firing tokens)")
    ax.set_ylabel("tokens")
    label = ", ".join(f"{c.name} ({c.score:.2f})" for c in names) or "no names"
    fig.suptitle(f"feature {feature}: {label}", fontsize=10)
    png = _png_bytes(fig)

    out = Path(out_dir)
    png_path, html_path = out / f"feature_{feature}.png", out / f"feature_{feature}.html"
    atomic_write_bytes(png_path, png)
    rows = [
        ("names", label),
        ("firing frequency", f"{stats.frequency[feature].item():.3g}"),
        ("mean activation (when firing)", f"{stats.mean_activation[feature].item():.4g}"),
        ("max activation", f"{stats.max_activation[feature].item():.4g}"),
        ("top examples", ", ".join(f"{i}@tok{t}" for i, t in zip(top.example_ids, top.token_index))),
    ]
    atomic_write_bytes(html_path, _html_page(f"feature {feature}", png, rows))
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
                f"FVU {stats.fvu:.4f}, L0 {stats.l0:.1f}, dead {n_dead}/{stats.n_features}, "
                f"tokens {stats.n_tokens}",
            )
        )
    ax_d.set(xlabel="log10 firing frequency", ylabel="features", title="feature density")
    ax_f.set(xlabel="L0 (active features per token)", ylabel="FVU", title="reconstruction vs sparsity")
    ax_d.legend(fontsize=8)
    png = _png_bytes(fig)
    out = Path(out_dir)
    atomic_write_bytes(out / "summary.png", png)
    atomic_write_bytes(out / "summary.html", _html_page("SAE summary", png, rows))
    return out / "summary.png", out / "summary.html"


def _overlay(ax: plt.Axes, view: Image.Image, heat_HW: np.ndarray | None, coverage_HW: np.ndarray) -> None:
    """The model's view of a photo, a patch heatmap over it, and the object box outlined."""
    extent = (0, view.width, view.height, 0)
    ax.imshow(view)
    if heat_HW is not None:
        # Silent patches stay clear, so the photo shows where the feature does not fire.
        heat = np.ma.masked_less_equal(heat_HW, 0)
        ax.imshow(heat, cmap="inferno", alpha=0.7, extent=extent, interpolation="nearest", vmin=0)
    ax.contour(
        coverage_HW,
        levels=[0.5],
        colors="cyan",
        linewidths=1.2,
        extent=(0, view.width, 0, view.height),
        origin="upper",
    )
    ax.axis("off")


def localization_grid(
    scores: Sequence[ObjectScore], out_path: str | os.PathLike, dpi: int = 100, cell: float = 1.7
) -> Path:
    """PNG grid: one row per object (its photo with the box, then each basis' top features' heatmaps,
    titled with the feature id and its energy in the box)."""
    if not scores:
        raise ValueError("localization_grid needs at least one object score.")
    names = list(scores[0].bases)
    n_cols = 1 + sum(max(len(s.bases[n].features) for s in scores) for n in names)
    fig, axes = plt.subplots(len(scores), n_cols, figsize=(cell * n_cols, cell * len(scores) + 0.3))
    axes = np.asarray(axes).reshape(len(scores), n_cols)
    for row, s in zip(axes, scores):
        _overlay(row[0], s.view, None, s.coverage)
        row[0].set_title(f"{s.obj.label} (box {s.area:.0%})", fontsize=8)
        col = 1
        for name in names:
            width = max(len(t.bases[name].features) for t in scores)
            basis = s.bases[name]
            for j in range(width):
                if j < len(basis.features):
                    _overlay(row[col + j], s.view, basis.maps[j], s.coverage)
                    row[col + j].set_title(
                        f"{name} {basis.features[j]}: {basis.energy[j]:.0%} in box", fontsize=7
                    )
                else:
                    row[col + j].axis("off")
            col += width
    fig.suptitle("activation heatmaps of the features with most mass inside each object box", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(Path(out_path), buf.getvalue())
    return Path(out_path)
