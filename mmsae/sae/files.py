"""An SAE on disk: `cfg.json` + `sae.safetensors` in one directory, each written atomically; no pickle.

Below `mmsae.sae.base` (which saves through it) and `mmsae.checkpoint` (which loads and validates):
it needs only the SAE's `arch`, config and tensors.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import save_file

from mmsae._version import __version__
from mmsae.fileio import atomic_write, atomic_write_bytes

if TYPE_CHECKING:
    from mmsae.sae.base import SAE

CFG_NAME = "cfg.json"
WEIGHTS_NAME = "sae.safetensors"


def save_sae(sae: SAE, path: str | os.PathLike) -> Path:
    """Write `path/cfg.json` and `path/sae.safetensors` (each atomically)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"arch": sae.arch, **sae.cfg.to_dict(), "mmsae_version": __version__}
    tensors = {k: v.detach().contiguous().cpu() for k, v in sae.state_dict().items()}
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"arch": sae.arch}))
    atomic_write_bytes(path / CFG_NAME, json.dumps(cfg, indent=2).encode())
    return path


def push_to_hub(
    sae: SAE,
    repo_id: str,
    subfolder: str | None = None,
    private: bool = False,
    commit_message: str = "Upload SAE with mmsae",
    api: Any = None,
) -> str:
    """Upload cfg.json + sae.safetensors to `repo_id` (in `subfolder`, e.g. the hook name)."""
    from huggingface_hub import HfApi

    api = api or HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save_sae(sae, tmp)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=tmp, path_in_repo=subfolder or "", commit_message=commit_message
        )
    return str(getattr(info, "commit_url", info))
