"""`mmsae index build|query`: the concept index from the shell.

mmsae index build --images photos/ --sae runs/clip-sae --encoder clip:ViT-B-32/openai --out idx/
mmsae index query --index idx/ --text "a dog on a beach" -k 5
mmsae index query --index idx/ --image photos/cat.jpg --with 12 --without 40
mmsae index query --index idx/ --feature 123          # images where feature 123 is strongest
mmsae index query --index idx/ --features-of photos/cat.jpg
mmsae index query --index idx/ --text-features "stripes"
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Any

from mmsae.index.ann import AnnConfig
from mmsae.index.concept_index import ConceptIndex, IndexConfig
from mmsae.kernels.candidates import ENCODES


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmsae index", description="Build or query a FAISS concept index.")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="index an image folder with an SAE and its encoder")
    b.add_argument("--images", required=True, help="folder of images (searched recursively)")
    b.add_argument("--sae", required=True, help="SAE directory or Hub repo id")
    b.add_argument(
        "--encoder", default=None, help="encoder spec the SAE reads (default: recorded in the SAE)"
    )
    b.add_argument("--embedder", default=None, help="CLIP spec for search embeddings (default: the encoder)")
    b.add_argument("--out", required=True, help="index directory to write")
    b.add_argument("--hook", default=None)
    b.add_argument("--tokens", default="all")
    b.add_argument("--pool", choices=("max", "mean"), default="max")
    b.add_argument("--vocab", default=None, help="concept vocabulary file, one per line (default: mmsae's)")
    b.add_argument("--ann", choices=("auto", "flat", "ivf", "hnsw"), default="auto")
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--num-workers", type=int, default=0, help="DataLoader workers decoding images")
    b.add_argument(
        "--decode",
        choices=("pil", "draft", "device"),
        default="pil",
        help="pil (in loader workers) | draft (pil, big JPEGs decoded at reduced scale) | device (JPEG files "
        "decoded on the device)",
    )
    b.add_argument("--skip-unreadable", action="store_true")
    b.add_argument("--encode", choices=ENCODES, default="exact", help="fp8: TopK codes from fp8 candidates")
    b.add_argument("--device", default="cpu")

    q = sub.add_parser("query", help="search a built index")
    q.add_argument("--index", required=True)
    what = q.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="text → images")
    what.add_argument("--image", help="image → images")
    what.add_argument("--feature", type=int, help="feature → its top images")
    what.add_argument("--features-of", help="image → its top features")
    what.add_argument("--text-features", help="text → features")
    q.add_argument(
        "--with", dest="with_features", type=int, nargs="*", default=[], help="only images with these on"
    )
    q.add_argument(
        "--without",
        dest="without_features",
        type=int,
        nargs="*",
        default=[],
        help="only images with these off",
    )
    q.add_argument("-k", type=int, default=10)
    q.add_argument("--json", action="store_true", help="print results as JSON")
    q.add_argument("--device", default="cpu")
    return p


def _encoder(spec: str, device: str):
    from mmsae.encoders import get_encoder

    return get_encoder(spec, device=device)


def _build(args: argparse.Namespace) -> int:
    from mmsae.analysis.naming import load_vocabulary
    from mmsae.checkpoint import load_sae

    sae = load_sae(args.sae, device=args.device)
    spec = args.encoder or sae.cfg.encoder
    if spec is None:
        raise ValueError(
            f"The SAE at {args.sae} records no encoder: pass --encoder, e.g. clip:ViT-B-32/openai."
        )
    encoder = _encoder(spec, args.device)
    embedder = _encoder(args.embedder, args.device) if args.embedder else None
    tokens: Any = int(args.tokens) if args.tokens.lstrip("-").isdigit() else args.tokens
    cfg = IndexConfig(
        hook=args.hook,
        tokens=tokens,
        pool=args.pool,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        decode=args.decode,
        skip_unreadable=args.skip_unreadable,
        encode=args.encode,
        ann=AnnConfig(kind=args.ann),
    )
    vocab = load_vocabulary(args.vocab) if args.vocab else None
    index = ConceptIndex.build(encoder, sae, args.images, embedder=embedder, cfg=cfg, vocab=vocab)
    index.save(args.out)
    print(f"{index!r} -> {args.out}")
    for path in index.skipped:
        print(f"skipped unreadable image: {path}", file=sys.stderr)
    return 0


def _query(args: argparse.Namespace) -> int:
    index = ConceptIndex.load(args.index)
    meta = index.meta
    # Load only the models the query needs: feature and indexed-image queries need none.
    if (
        args.text is not None
        or args.text_features is not None
        or (args.image is not None and args.image not in index)
    ):
        index.embedder = _encoder(meta["embedder"], args.device)
    if args.features_of is not None and args.features_of not in index:
        index.encoder = _encoder(meta["encoder"], args.device)
    filters = {"with_features": args.with_features, "without_features": args.without_features}
    if args.text is not None:
        hits: list[Any] = index.search_text(args.text, args.k, **filters)
    elif args.image is not None:
        hits = index.search_image(args.image, args.k, **filters)
    elif args.feature is not None:
        hits = index.images_of(args.feature, args.k)
    elif args.features_of is not None:
        hits = index.features_of(args.features_of, args.k)
    else:
        hits = index.search_features(args.text_features, args.k)
    if args.json:
        print(json.dumps([asdict(h) for h in hits], indent=2))
    else:
        for h in hits:
            print("\t".join(str(v) for v in asdict(h).values()))
    return 0


def cli_main(argv: list[str]) -> int:
    """Entry point for `mmsae index ...`; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        return _build(args) if args.command == "build" else _query(args)
    except (FileNotFoundError, ValueError, TypeError, RuntimeError, IndexError) as e:
        print(f"mmsae index {args.command}: error: {e}", file=sys.stderr)
        return 2
