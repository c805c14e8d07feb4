"""The SAE family: one base class, one registry, one small module per variant.

Importing this package registers every variant, so `build_sae(name, ...)` and checkpoint loading
work for all of them after `import mmsae`.
"""

from mmsae.legacy_names import module_getattr
from mmsae.sae.abstopk import AbsTopKSAE
from mmsae.sae.archetypal import ArchetypalConfig, ArchetypalSAE
from mmsae.sae.base import (
    REGISTRY,
    SAE,
    Codes,
    DeadFeatures,
    LossOutput,
    SAEConfig,
    SAEOutput,
    SparseCodes,
    as_dense,
    build_sae,
    fired_mask,
    geometric_median,
    get_sae_class,
    linear_warmup,
    normalized_mse,
    register,
)
from mmsae.sae.batchtopk import BatchTopKConfig, BatchTopKSAE
from mmsae.sae.gated import GatedConfig, GatedSAE
from mmsae.sae.hierarchical import HierarchicalTopKConfig, HierarchicalTopKSAE
from mmsae.sae.jumprelu import JumpReLUConfig, JumpReLUSAE
from mmsae.sae.lr import default_lr
from mmsae.sae.matryoshka import MatryoshkaConfig, MatryoshkaSAE
from mmsae.sae.mp import MPSAE, MPConfig
from mmsae.sae.relu import ReLUConfig, ReLUSAE
from mmsae.sae.topk import TopKConfig, TopKSAE

__all__ = [
    "MPSAE",
    "REGISTRY",
    "SAE",
    "AbsTopKSAE",
    "ArchetypalConfig",
    "ArchetypalSAE",
    "BatchTopKConfig",
    "BatchTopKSAE",
    "Codes",
    "DeadFeatures",
    "GatedConfig",
    "GatedSAE",
    "HierarchicalTopKConfig",
    "HierarchicalTopKSAE",
    "JumpReLUConfig",
    "JumpReLUSAE",
    "LossOutput",
    "MPConfig",
    "MatryoshkaConfig",
    "MatryoshkaSAE",
    "ReLUConfig",
    "ReLUSAE",
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
    "linear_warmup",
    "normalized_mse",
    "register",
]

__getattr__ = module_getattr(__name__)  # old public names (mmsae.legacy_names)
