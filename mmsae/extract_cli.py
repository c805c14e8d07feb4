"""`mmsae extract`: the command line of `mmsae.extract` (options, config files, one process per GPU)."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmsae.encoders.base import TokenMode
from mmsae.extract import extract, rank_device, resolve_ranks
from mmsae.store import DEFAULT_SHARD_TOKENS, ActivationStore, StoreError


@dataclass
class ExtractConfig:
    """`mmsae extract` options; a YAML/JSON config file sets them (top level or under `extract:`).

    Each field's help text (`mmsae extract --help`) is in HELP."""

    encoder: str = ""
    dataset: str = ""
    out_dir: str = "runs/activations"
    hooks: list[str] = field(default_factory=list)
    tokens: str = "all"
    dtype: str = "float16"
    batch_size: int = 64
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    num_workers: int = 0
    decode: str = "pil"
    device: str = "auto"
    devices: int = 1
    model_dtype: str = ""
    pretrained: bool = True
    encoder_options: dict[str, Any] = field(default_factory=dict)


HELP = {
    "encoder": "get_encoder spec, e.g. clip:ViT-B-32/openai or timm:test_vit",
    "dataset": "data set spec of mmsae.datasets.images.load_dataset",
    "out_dir": "where the store goes: out_dir/<encoder>-<hash>/ (training on out_dir opens it)",
    "hooks": "hook points (module paths); empty: the encoder's default hook",
    "tokens": "all | cls | patch | pooled | mean | <token index>",
    "dtype": "store dtype: float16 | bfloat16 | float32",
    "batch_size": "examples per forward",
    "shard_tokens": "tokens per shard file (approximately)",
    "num_workers": "DataLoader workers decoding inputs",
    "decode": "pil (in loader workers) | draft (pil, big JPEGs decoded at reduced scale) | device (JPEG "
    "files decoded on the device)",
    "device": "auto (cuda when available) | cpu | cuda[:i]",
    "devices": "processes on disjoint shards, one per GPU (on CPU: CPU processes)",
    "model_dtype": "model dtype, e.g. bfloat16; empty keeps the model's",
    "pretrained": "load pretrained weights (false: random init)",
    "encoder_options": "encoder settings as key=value pairs (get_encoder keywords; they enter the store "
    "hash), e.g. num_inference_steps=4 guidance_scale=0 for a UNet",
}


def _key_values(items: list[str]) -> dict[str, Any]:
    """key=value strings to a dict; values are read as YAML scalars or lists (4, 0.5, true, [1, 2])."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--encoder_options takes key=value pairs, got {item!r}.")
        out[key.replace("-", "_")] = yaml.safe_load(value)
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmsae extract",
        description="Extract activations into a store (options override the config file's).",
    )
    parser.add_argument("--config", type=Path, help="YAML or JSON file with these fields")
    for f in dataclasses.fields(ExtractConfig):
        flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kw: dict[str, Any] = {"default": None, "help": f"{HELP[f.name]} (default: {default!r})"}
        if f.type == "bool":
            kw["type"] = lambda v: v.lower() in ("1", "true", "yes")
        elif f.name in ("hooks", "encoder_options"):
            kw["nargs"] = "+"
        else:
            kw["type"] = int if f.type == "int" else str
        parser.add_argument(*flags, dest=f.name, **kw)
    return parser


def _parse_config(argv: list[str]) -> ExtractConfig:
    import yaml

    args = vars(_parser().parse_args(argv))
    values: dict[str, Any] = {}
    if (path := args.pop("config")) is not None:
        if not path.is_file():
            raise FileNotFoundError(f"Config file {path} does not exist.")
        loaded = yaml.safe_load(path.read_text()) or {}
        values = loaded.get("extract", loaded)
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(ExtractConfig)})
        if unknown:
            raise ValueError(
                f"Unknown keys {unknown} in {path}; valid: "
                f"{[f.name for f in dataclasses.fields(ExtractConfig)]}."
            )
    if args["encoder_options"] is not None:
        args["encoder_options"] = {
            **values.get("encoder_options", {}),
            **_key_values(args["encoder_options"]),
        }
    values.update({k: v for k, v in args.items() if v is not None})
    missing = [name for name in ("encoder", "dataset") if not values.get(name)]
    if missing:  # no hidden defaults: an extraction says what it runs on
        raise ValueError(
            f"mmsae extract needs {' and '.join('--' + m for m in missing)} (or a --config file that sets "
            "them), e.g. `mmsae extract --encoder timm:vit_base_patch16_224 --dataset folder:images "
            "--out_dir activations/vit`; see `mmsae extract --help`."
        )
    return ExtractConfig(**values)


def run_config(
    cfg: ExtractConfig,
    rank: int | None = None,
    world_size: int | None = None,
) -> ActivationStore:
    """Build the encoder and data set a config names and extract (this process's share, see `extract`)."""
    from mmsae.datasets.images import load_dataset
    from mmsae.encoders import get_encoder

    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    # Build each rank's model on its own GPU: loading all of them on cuda:0 first could run it out of memory.
    device = rank_device(device, resolve_ranks(rank, world_size))
    model_dtype = getattr(torch, cfg.model_dtype) if cfg.model_dtype else None
    try:
        encoder = get_encoder(
            cfg.encoder, pretrained=cfg.pretrained, device=device, dtype=model_dtype, **cfg.encoder_options
        )
    except TypeError as e:  # an option the encoder's constructor does not take
        if not cfg.encoder_options:
            raise
        raise ValueError(f"encoder_options {cfg.encoder_options} do not apply to {cfg.encoder}: {e}") from e
    tokens: TokenMode = int(cfg.tokens) if cfg.tokens.lstrip("-").isdigit() else cfg.tokens
    return extract(
        encoder,
        load_dataset(cfg.dataset),
        cfg.hooks or None,
        cfg.out_dir,
        tokens=tokens,
        dtype=cfg.dtype,
        batch_size=cfg.batch_size,
        shard_tokens=cfg.shard_tokens,
        num_workers=cfg.num_workers,
        rank=rank,
        world_size=world_size,
        decode=cfg.decode,
    )


def launch(cfg: ExtractConfig) -> ActivationStore:
    """Run `cfg` in `cfg.devices` spawned processes, rank i on cuda:i (CPU processes without CUDA).

    The processes coordinate through the store's files (no ports, no process group). If one fails, the
    others are stopped and the exception is raised here; running the same config again resumes.
    """
    if cfg.devices < 1:
        raise ValueError(f"devices must be >= 1, got {cfg.devices}.")
    if cfg.devices == 1:
        return run_config(cfg)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ValueError(
            "devices > 1 spawns its own processes; under torchrun leave devices at 1 "
            "(--nproc_per_node sets the number of processes)."
        )
    uses_cuda = torch.cuda.is_available() and cfg.device in ("auto", "cuda")
    if uses_cuda and cfg.devices > torch.cuda.device_count():
        raise ValueError(f"devices={cfg.devices} but {torch.cuda.device_count()} GPUs are visible.")
    paths = torch.multiprocessing.get_context("spawn").SimpleQueue()
    torch.multiprocessing.start_processes(
        _launched_rank, args=(cfg, paths), nprocs=cfg.devices, start_method="spawn"
    )
    return ActivationStore(paths.get())


def _launched_rank(rank: int, cfg: ExtractConfig, paths: Any) -> None:
    if not torch.cuda.is_available():  # share the cores instead of oversubscribing them N times
        torch.set_num_threads(max(1, torch.get_num_threads() // cfg.devices))
    store = run_config(cfg, rank, cfg.devices)
    if rank == 0:
        paths.put(str(store.path))


def cli_main(argv: list[str]) -> int:
    """`mmsae extract --config cfg.yaml [--devices N] [--field value ...]`: prints the store path.

    Returns 1 on bad input or when a process of a multi-process run failed. Alternative launcher for
    several hosts or an existing torchrun setup: `torchrun --nproc_per_node N -m mmsae.cli extract ...`.
    """
    import sys

    from torch.multiprocessing.spawn import ProcessException

    try:
        store = launch(_parse_config(argv))
    except (ValueError, KeyError, FileNotFoundError, StoreError, ProcessException) as e:
        print(f"mmsae extract: error: {e}", file=sys.stderr)
        return 1
    if resolve_ranks().rank == 0:  # under torchrun every process gets here
        print(store.path)
        print(store)
    return 0
