"""The public API takes an encoder before the SAE that reads it: `f(encoder, sae, ...)`, as `Intervention`,
the steering functions, the analysis functions and `ConceptIndex.build` do.

Calls written for the earlier (sae, encoder) order still work for one release, with a DeprecationWarning.
"""

from __future__ import annotations

import warnings
from typing import Any

from mmsae.encoders.base import Encoder
from mmsae.sae.base import SAE


def encoder_and_sae(encoder: Any, sae: Any, where: str) -> tuple[Encoder, SAE]:
    """(encoder, sae) from the two leading arguments of `where`, swapped back if given as (sae, encoder)."""
    if isinstance(encoder, SAE) and isinstance(sae, Encoder):
        warn_order(where)
        return sae, encoder
    return encoder, sae


def warn_order(where: str) -> None:
    warnings.warn(
        f"{where} takes (encoder, sae, ...) now; the (sae, encoder) order is deprecated and stops working in "
        "the next release.",
        DeprecationWarning,
        stacklevel=4,
    )
