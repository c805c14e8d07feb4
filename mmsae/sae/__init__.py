"""The SAE family: one base class, one registry, one small module per variant."""

from mmsae.sae.base import (
    REGISTRY,
    SAE,
    Codes,
    LossOutput,
    SAEConfig,
    SAEOutput,
    SparseCodes,
    as_dense,
    build_sae,
    default_lr,
    fired_mask,
    geometric_median,
    get_sae_class,
    normalized_mse,
    register,
)
from mmsae.sae.topk import TopKConfig, TopKSAE

__all__ = [
    "REGISTRY",
    "SAE",
    "Codes",
    "LossOutput",
    "SAEConfig",
    "SAEOutput",
    "SparseCodes",
    "TopKConfig",
    "TopKSAE",
    "as_dense",
    "build_sae",
    "default_lr",
    "fired_mask",
    "geometric_median",
    "get_sae_class",
    "normalized_mse",
    "register",
]
