"""SAE checkpoints: `cfg.json` + `sae.safetensors` per SAE, written atomically; no pickle anywhere."""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file

from mmsae.fileio import atomic_write_bytes
from mmsae.legacy_names import legacy_keys
from mmsae.sae.base import SAE, get_sae_class
from mmsae.sae.files import CFG_NAME, WEIGHTS_NAME, push_to_hub, save_sae

SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_KEYS = ("expansion_factor", "num_latents")
Format = Literal["mmsae", "saelens", "sparsify"]
TRAINING_STATE = ("tokens_since_fired",)
"""Tensors that files of earlier versions hold besides the SAE's own (the trainer's dead-feature clock):
ignored on load."""


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    cfg_file = path / CFG_NAME
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"No {CFG_NAME} in {path}: an mmsae SAE directory holds {CFG_NAME} + {WEIGHTS_NAME}. "
            "For SAELens or sparsify checkpoints use mmsae.convert.from_saelens / from_sparsify."
        )
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file} is not valid JSON ({e}); the checkpoint is corrupt.") from e


def sae_from_config(cfg: dict[str, Any], source: str | os.PathLike = CFG_NAME) -> SAE:
    """The SAE that `cfg` (a cfg.json's contents) describes, randomly initialised; errors name `source`."""
    cfg = legacy_keys(cfg)  # a cfg.json of an earlier version uses old key names
    if "arch" not in cfg:
        raise ValueError(
            f"{source} has no 'arch' field: this is not an mmsae checkpoint. "
            "For SAELens or sparsify checkpoints use mmsae.convert.from_saelens / from_sparsify."
        )
    cls = get_sae_class(cfg.pop("arch"))
    cfg.pop("mmsae_version", None)
    fields = {f.name: f for f in dataclasses.fields(cls.Config)}
    unknown = set(cfg) - set(fields)
    if unknown:
        raise ValueError(f"{source} has fields {sorted(unknown)} unknown to the {cls.arch!r} SAE.")
    required = [
        name
        for name, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in cfg]
    if missing:
        raise ValueError(
            f"{source} lacks the field(s) {missing} that every {cls.arch!r} SAE needs: the file is "
            "incomplete; restore it from the run that wrote the SAE (the weights' shapes give d_in and "
            "n_features)."
        )
    hints = typing.get_type_hints(cls.Config)
    for name, value in cfg.items():
        if not _has_type(value, hints[name]):
            raise ValueError(
                f"{source}: field {name!r} is {value!r} ({type(value).__name__}), but must be "
                f"{_type_name(hints[name])}: correct it in the file."
            )
    try:
        return cls(cls.Config(**{**cls.Config.LEGACY_DEFAULTS, **cfg}))
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e


def _has_type(value: Any, tp: Any) -> bool:
    """Whether a JSON value fits a config field's annotation (ints count as floats; lists as tuples)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if origin is Literal:
        return value in args
    if origin in (tuple, list):
        items = args[:1] if origin is list or (len(args) == 2 and args[1] is Ellipsis) else args
        return isinstance(value, (list, tuple)) and all(_has_type(v, items[0]) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp) if isinstance(tp, type) else True


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def resolve_dir(
    path_or_repo: str | os.PathLike, revision: str | None = None, subfolder: str | None = None
) -> Path:
    """A local directory as is, else a Hub repo id fetched (or found in the local HF cache)."""
    path = Path(path_or_repo)
    if subfolder:
        path = path / subfolder
    return path if path.exists() else _download(str(path_or_repo), revision, subfolder)


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the checkpoint is corrupt.") from e


def detect_format(path: str | os.PathLike) -> Format | None:
    """Which library wrote the SAE folder `path` (None if it is not recognisably an SAE folder)."""
    path = Path(path)
    cfg_file = path / CFG_NAME
    if (path / SAELENS_WEIGHTS).is_file():
        return "saelens"
    if not cfg_file.is_file():
        # sparsify saves one folder per hookpoint under the run directory.
        return "sparsify" if sparsify_hookpoints(path) else None
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError:
        return None
    if "arch" in cfg:
        return "mmsae"
    if "d_sae" in cfg or "architecture" in cfg:
        return "saelens"
    if any(key in cfg for key in SPARSIFY_KEYS):
        return "sparsify"
    return None


def sparsify_hookpoints(path: Path) -> list[str]:
    if not path.is_dir():
        return []
    return sorted(p.name for p in path.iterdir() if (p / CFG_NAME).is_file() and (p / WEIGHTS_NAME).is_file())


def _reject_foreign(path: Path) -> None:
    fmt = detect_format(path)
    if fmt in ("saelens", "sparsify"):
        raise ValueError(
            f"{path} holds a {fmt} checkpoint, not an mmsae one: "
            f"load it with mmsae.convert.from_{fmt}({str(path)!r})."
        )


def load_sae(
    path_or_repo: str | os.PathLike,
    device: str | torch.device = "cpu",
    revision: str | None = None,
    subfolder: str | None = None,
) -> SAE:
    """Load an SAE from a local directory or a Hugging Face Hub repo id (optionally a subfolder)."""
    path = resolve_dir(path_or_repo, revision, subfolder)
    _reject_foreign(path)
    sae = sae_from_config(read_config(path), path / CFG_NAME)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(
            f"{weights} is missing: the SAE directory needs both {CFG_NAME} and {WEIGHTS_NAME}."
        )
    try:
        state = load_file(weights, device=str(device))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(f"{weights} is corrupt or truncated ({e}); re-download or re-save the SAE.") from e
    for name in TRAINING_STATE:
        state.pop(name, None)
    missing = set(sae.state_dict()) - set(state)
    if missing:
        raise ValueError(f"{weights} lacks tensors {sorted(missing)} required by a {sae.arch!r} SAE.")
    for name, t in state.items():
        ref = sae.state_dict().get(name)
        if ref is not None and ref.shape != t.shape:
            raise ValueError(
                f"{weights}: tensor {name!r} has shape {tuple(t.shape)}, cfg.json implies {tuple(ref.shape)}."
            )
    unexpected = set(state) - set(sae.state_dict())
    if unexpected:
        raise ValueError(f"{weights} holds tensors {sorted(unexpected)} unknown to a {sae.arch!r} SAE.")
    sae.load_state_dict(state)
    return sae.to(device)


def _download(repo_id: str, revision: str | None, subfolder: str | None) -> Path:
    """Fetch cfg.json + sae.safetensors from the Hub (or its local cache when offline)."""
    if repo_id.count("/") < 1 or repo_id.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{repo_id} is neither an existing directory nor a Hub repo id (owner/name).")
    from huggingface_hub import snapshot_download

    patterns = [f"{subfolder}/*" if subfolder else "*"]
    try:
        root = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as e:
        raise FileNotFoundError(
            f"Could not fetch SAE {repo_id!r} from the Hugging Face Hub or its cache "
            f"({type(e).__name__}: {e}). Offline? Download it elsewhere and pass the local directory, "
            "or set HF_HUB_CACHE (or HF_HOME) to a cache that holds it."
        ) from e
    return root / subfolder if subfolder else root


__all__ = [  # save_sae, push_to_hub and atomic_write_bytes live below (mmsae.sae.files, mmsae.fileio)
    "CFG_NAME",
    "WEIGHTS_NAME",
    "atomic_write_bytes",
    "detect_format",
    "load_sae",
    "push_to_hub",
    "read_config",
    "resolve_dir",
    "sae_from_config",
    "save_sae",
]
