"""Loading the offline zoo's real weights: accuracy on real photos and agreement with the source model.

For each zoo classifier: top-1 / top-5 on foolbox's 20 ImageNet samples and the top-1 class (with its
probability) on the labelled scikit-image photos. For DINOv2-S/14: max |timm − ONNX| of the backbone's
final tokens on real photos (onnxruntime, or the ONNX reference evaluator without it). Load times are the
wall seconds of `get_encoder(..., pretrained=True)` from the installed zoo. Prints a Markdown report and
writes it (atomically) to `--out`.

    mmsae zoo install            # once; then
    python benchmarks/bench_zoo.py --out /tmp/zoo.md
"""

from __future__ import annotations

import argparse
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from mmsae.datasets import FoolboxSamples, LabeledSkimagePhotos
from mmsae.encoders import get_encoder
from mmsae.encoders.timm import TimmEncoder
from mmsae.fileio import atomic_write_bytes
from mmsae.zoo import MODELS, WHEELS, install, zoo_dir

CLASSIFIERS = ("timm:mobilenetv2_100", "timm:tf_efficientnet_lite0")
DINO = "timm:vit_small_patch14_dinov2"


def load(spec: str) -> tuple[TimmEncoder, float]:
    start = time.perf_counter()
    enc = get_encoder(spec, pretrained=True)
    return enc, time.perf_counter() - start


@torch.no_grad()
def classifier_rows(spec: str) -> tuple[str, list[str]]:
    """(ImageNet table row, scikit-image prediction lines) for one classifier."""
    enc, seconds = load(spec)
    data = FoolboxSamples("imagenet")
    probs = enc.classify([data[i].image for i in range(len(data))]).softmax(-1)
    labels = torch.tensor(data.labels)
    top5 = probs.topk(5).indices
    top1 = (top5[:, 0] == labels).float().mean().item()
    hit5 = (top5 == labels[:, None]).any(1).float().mean().item()
    row = f"| `{spec}` | {100 * top1:.0f} % | {100 * hit5:.0f} % | {seconds:.1f} |"
    photos = LabeledSkimagePhotos()
    probs = enc.classify([photos[i].image for i in range(len(photos))]).softmax(-1)
    lines = []
    for i, name in enumerate(photos.names):
        p, k = probs[i].max(0)
        ok = "correct" if int(k) in photos.accepted[i] else f"label {photos.label_name(i)}"
        lines.append(f"| `{spec}` | {name} | {enc.class_names[int(k)]} | {p:.2f} | {ok} |")
    return row, lines


@torch.no_grad()
def dinov2_row() -> str:
    import onnx

    from mmsae.zoo.convert import onnx_backbone_output

    enc, seconds = load(DINO)
    model = MODELS["vit_small_patch14_dinov2.zoo_saliency"]
    with zipfile.ZipFile(zoo_dir() / "wheels" / WHEELS[model.wheel].filename) as zf:
        graph = onnx.load_model_from_string(zf.read(model.member))
    photos = LabeledSkimagePhotos()
    pixels = torch.stack([enc.transform(photos[i].image) for i in range(len(photos))])
    reference = onnx_backbone_output(graph, pixels.numpy())
    ours = enc.activations(pixels, ["norm"])["norm"].acts_ND.reshape(reference.shape)
    diff = float(np.abs(ours.numpy() - reference).max())
    try:
        import onnxruntime  # noqa: F401

        against = "onnxruntime"
    except ImportError:
        against = "ONNX reference evaluator"
    return (
        f"| `{DINO}` | {len(photos)} scikit-image photos, 224 px | {diff:.1e} ({against}) | {seconds:.1f} |"
    )


def report() -> str:
    rows, photo_lines = [], []
    for spec in CLASSIFIERS:
        row, lines = classifier_rows(spec)
        rows.append(row)
        photo_lines += lines
    out = ["| encoder | top-1 | top-5 | load s |", "|---|---:|---:|---:|", *rows, ""]
    out += ["| encoder | photo | top-1 class | p | |", "|---|---|---|---:|---|", *photo_lines, ""]
    out += ["| encoder | input | max abs difference to the ONNX source | load s |", "|---|---|---|---:|"]
    return "\n".join([*out, dinov2_row(), ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="Write the Markdown report here.")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    install(log=lambda s: None)  # a no-op when installed; otherwise the same install as `mmsae zoo install`
    text = report()
    print(text)
    if args.out is not None:
        atomic_write_bytes(args.out, text.encode())


if __name__ == "__main__":
    main()
