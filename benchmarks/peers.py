"""Peer libraries for the benchmarks, imported without the parts a benchmark never runs."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Callable

import torch
from torch import Tensor

from mmsae.sae import SAE, SAEConfig, SparseCodes


def import_sparsify() -> types.ModuleType:
    """sparsify's `SparseCoder` and its optimiser, without its package `__init__` (which imports the trainer,
    and so `datasets` and `transformers`). `sparsify.utils` imports `accelerate` and `transformers` for its
    trainer helpers; where they are missing, each missing name is a placeholder that is never called."""
    if "sparsify.sparse_coder" in sys.modules:
        return sys.modules["sparsify.sparse_coder"]
    spec = importlib.util.find_spec("sparsify")
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError("sparsify (eai-sparsify) is not installed")
    package = types.ModuleType("sparsify")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["sparsify"] = package
    for module, name in (("accelerate.utils", "send_to_device"), ("transformers", "PreTrainedModel")):
        try:
            importlib.import_module(module)
        except ImportError:
            for part in (module.split(".")[0], module):
                sys.modules.setdefault(part, types.ModuleType(part))
            setattr(sys.modules[module], name, type(name, (), {}))
    import sparsify.sign_sgd
    import sparsify.sparse_coder

    return sparsify.sparse_coder


class PeerSAE(SAE):
    """A peer's encode/decode as an mmsae SAE, so that `metrics.evaluate` scores every library alike."""

    def __init__(self, d_in: int, n_features: int, encode: Callable, decode: Callable, W_dec: Tensor):
        super().__init__(SAEConfig(d_in=d_in, n_features=n_features))
        self.peer_encode, self.peer_decode = encode, decode
        with torch.no_grad():
            self.W_dec.copy_(W_dec)

    def _encode(self, x: Tensor) -> SparseCodes:
        return self.peer_encode(x)

    def decode(self, codes: SparseCodes) -> Tensor:
        return self.peer_decode(codes)
