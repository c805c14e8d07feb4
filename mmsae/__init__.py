"""mmsae: sparse autoencoders for CLIP, ViTs, LLaVA and diffusion UNets behind one API.

The five nouns: `SAE` (mmsae.sae), `Encoder` (mmsae.encoders), `ActivationStore`
(mmsae.store), the Lightning module (mmsae.trainer) and `Intervention` (mmsae.intervene).
Heavy parts (Lightning, encoders, FAISS) are imported lazily so `import mmsae` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from mmsae._version import __version__
from mmsae.checkpoint import load_sae, save_sae
from mmsae.encoders import Encoder, TokenActs, get_encoder
from mmsae.extract import extract  # eager: a lazy "extract" would resolve to the submodule
from mmsae.sae import SAE, SAEConfig, SparseCodes, build_sae, get_sae_class
from mmsae.store import ActivationStore

# name -> module that defines it; resolved on first attribute access.
_LAZY = {
    "train": "mmsae.trainer.api",
    "SAEModule": "mmsae.trainer.module",
    "SAEDataModule": "mmsae.trainer.data",
    "metrics": "mmsae.metrics",
    "Intervention": "mmsae.intervene.intervention",
    "Splice": "mmsae.intervene.intervention",
    "ConceptIndex": "mmsae.index",
    "feature_stats": "mmsae.analysis",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        value = module if module.__name__.endswith(name) else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mmsae' has no attribute {name!r}")


__all__ = [
    "SAE",
    "ActivationStore",
    "Encoder",
    "SAEConfig",
    "SparseCodes",
    "TokenActs",
    "__version__",
    "build_sae",
    "extract",
    "get_encoder",
    "get_sae_class",
    "load_sae",
    "save_sae",
    *_LAZY,
]
