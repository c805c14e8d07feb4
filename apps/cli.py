"""`mmsae app search|steer|unlearn`: load the SAE, encoder and index, then serve the app on localhost.

mmsae app search  --sae runs/demo/sae/HOOK --index runs/demo/index [--model clip:ViT-B-32/openai]
mmsae app steer   --sae runs/sae --model clip:ViT-B-32/openai --data-dir photos/ [--index DIR]
mmsae app unlearn --sae runs/unet_sae --model unet:CompVis/stable-diffusion-v1-4
mmsae app unlearn --sae runs/demo/sae/global_pool --index runs/demo/index   # a classifier's classes
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

APPS = ("search", "steer", "unlearn")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmsae app", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("app", choices=APPS)
    p.add_argument("--sae", required=True, help="SAE directory or Hub repo id")
    p.add_argument("--index", type=Path, help="concept index directory (required by search; names features)")
    p.add_argument("--model", help="encoder spec, e.g. clip:ViT-B-32/openai (default: the SAE's own)")
    p.add_argument(
        "--random-init",
        action="store_true",
        help="random encoder weights (demos without downloadable weights)",
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: localhost only)")
    p.add_argument("--port", type=int, help="port (default: Gradio picks a free one from 7860)")
    p.add_argument(
        "--data-dir",
        type=Path,
        action="append",
        default=[],
        help="repeatable: extra image folder the app may read (also calibrates steering)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def build_app(args: argparse.Namespace):  # -> gr.Blocks (gradio imported lazily)
    from mmsae.apps.common import AppSettings, FeatureCatalog, image_dirs
    from mmsae.checkpoint import load_sae
    from mmsae.encoders import get_encoder

    for d in args.data_dir:
        if not d.is_dir():
            raise FileNotFoundError(f"--data-dir {d} is not a directory.")
    settings = AppSettings(
        host=args.host,
        port=args.port,
        data_dirs=[d.resolve() for d in args.data_dir],
        random_weights=args.random_init,
    )
    sae = load_sae(args.sae, device=args.device)
    index = None
    if args.index is not None:
        from mmsae.index import ConceptIndex
        from mmsae.index.files import read_meta

        meta_path = args.index / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"No concept index at {args.index}: build one with `mmsae index build`.")
        meta = read_meta(args.index)
        spec = args.model or meta["encoder"]
        encoder = get_encoder(spec, pretrained=not args.random_init, device=args.device)
        embedder = (
            encoder
            if meta["embedder"] == spec
            else get_encoder(meta["embedder"], pretrained=not args.random_init, device=args.device)
        )
        index = ConceptIndex.load(args.index, encoder=encoder, embedder=embedder, sae=sae)
    else:
        spec = args.model or sae.cfg.encoder
        if spec is None:
            raise ValueError("The SAE records no encoder: pass --model <family:name>.")
        encoder = get_encoder(spec, pretrained=not args.random_init, device=args.device)
    catalog = FeatureCatalog.from_index(index) if index is not None else None
    if args.app == "search":
        if index is None:
            raise ValueError(
                "The search app runs on a concept index: pass --index DIR "
                "(built by `make demo` or `mmsae index build`)."
            )
        from mmsae.apps.search import build_search_app

        return build_search_app(index, settings), settings
    if args.app == "steer":
        from mmsae.apps.steer import build_steer_app

        if index is not None:  # the indexed images also calibrate the strength sliders
            settings.data_dirs = list(dict.fromkeys([*settings.data_dirs, *image_dirs(index.paths)]))
        return build_steer_app(encoder, sae, settings, catalog), settings
    from mmsae.apps.unlearn import build_unlearn_app

    if index is not None:  # a classifier's class features are selected on the indexed images
        settings.data_dirs = list(dict.fromkeys([*settings.data_dirs, *image_dirs(index.paths)]))
    return build_unlearn_app(encoder, sae, settings, catalog), settings


def cli_main(argv: list[str]) -> int:
    """Entry point of `mmsae app ...` (argv without the word 'app')."""
    from mmsae.encoders import WeightsUnavailableError

    args = build_parser().parse_args(argv)
    try:
        demo, settings = build_app(args)
    except WeightsUnavailableError as e:
        print(f"mmsae app: {e}\nOr try the app with random weights: --random-init.", file=sys.stderr)
        return 2
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"mmsae app: {e}", file=sys.stderr)
        return 2
    from mmsae.apps.common import launch

    if settings.host != "127.0.0.1":
        print(f"mmsae app: serving on {settings.host}: reachable from other machines.", file=sys.stderr)
    launch(demo, settings)
    return 0


__all__ = ["build_app", "build_parser", "cli_main"]
