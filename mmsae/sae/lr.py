"""The default learning rate: Gao et al.'s rule, raised for the short runs most SAEs are trained in."""

from __future__ import annotations

import math

from mmsae.legacy_names import legacy_kwargs

LR_SHORT_RUN_STEPS = 80_000
"""Runs shorter than this many steps train at a raised lr: ×√(LR_SHORT_RUN_STEPS / steps), at most
×`LR_SHORT_RUN_MAX_BOOST`. Gao et al.'s rule was tuned on runs of billions of tokens; on runs of ~10³ steps it
learns far too slowly (docs/benchmarks.md, "Default recipe")."""
LR_SHORT_RUN_MAX_BOOST = 7.0
"""At 10× (≤ 800 steps of 4096 tokens), TopK left 12.7 % of its features dead on DINOv2-S patch tokens
(d = 384) for the same held-out FVU as at 7× (docs/benchmarks.md, "Dead features on real activations")."""
LR_VERY_SHORT_RUN_STEPS = 250
"""Runs of fewer steps raise the cap to 7 × √(this / steps), at most 14× and at most
`LR_VERY_SHORT_RUN_CEILING`: at 122 steps of 4096 DINOv2-S tokens (n = 4096, k = 32) 10× reached held-out FVU
0.2165 with no feature dead, against 0.2249 at 7×, and 14× in 61 steps kept all but 0.05 %
(docs/benchmarks.md, "Runs of fewer than 250 steps"). Where a batch's raise is larger it applies instead: both
at once (28× at batch 16384) lost 0.8 % of the features in 30 steps and 33 % in 61."""
LR_VERY_SHORT_RUN_MAX = 2.0
LR_VERY_SHORT_RUN_CEILING = 5.6e-3
"""The raise for short runs stops at this lr, 7× Gao et al.'s at n = 1024 (14× at n = 4096), and batches of
fewer than `LR_BOOST_REFERENCE_BATCH` tokens do not get it: at batch 1024, n = 1024 lost 10.9 % of its
features in 48 steps at 14× (1.1e-2; 0.10 % at 7×) and n = 2048 1.6–2.4 % in 48–96 steps at 9.9× (0.2–1.6 % at
6.9×)."""
LR_BOOST_REFERENCE_BATCH = 4096
"""Batches of more tokens raise the boost's cap by √(batch / this): their gradients are less noisy. At batch
16384 (488 steps of 8M DINOv2-S tokens) 14× reached held-out FVU 0.1706 with 0.61 % dead features, against
0.1742 at 7× (docs/benchmarks.md, "Default recipe")."""


@legacy_kwargs
def default_lr(n_features: int, total_steps: int | None = None, batch_size: int | None = None) -> float:
    """The lr when `lr=None`: 2e-4 / √(n / 2¹⁴) (Gao et al.), raised for runs of fewer than
    `LR_SHORT_RUN_STEPS` optimizer steps (up to 7×, at ≤ 1,632 steps; up to 7 × √(batch / 4096) for
    larger batches of `batch_size` tokens, or, with batches of at least 4096 tokens, up to 14× but not above
    5.6e-3 for runs of fewer than 250 steps); `total_steps=None` = a long run."""
    lr = 2e-4 / math.sqrt(n_features / 2**14)
    if total_steps is None:
        return lr
    boost = math.sqrt(LR_SHORT_RUN_STEPS / max(1, total_steps))
    batch_share = max(1.0, (batch_size or LR_BOOST_REFERENCE_BATCH) / LR_BOOST_REFERENCE_BATCH)
    very_short = min(
        LR_VERY_SHORT_RUN_MAX,
        math.sqrt(LR_VERY_SHORT_RUN_STEPS / max(1, total_steps)),
        LR_VERY_SHORT_RUN_CEILING / (LR_SHORT_RUN_MAX_BOOST * lr),
    )
    if (batch_size or LR_BOOST_REFERENCE_BATCH) < LR_BOOST_REFERENCE_BATCH:
        very_short = 1.0
    cap = LR_SHORT_RUN_MAX_BOOST * max(1.0, math.sqrt(batch_share), very_short)
    return lr * min(cap, max(1.0, boost))


__all__ = ["default_lr"]
