"""BatchTopK's θ under DDP: every rank keeps the same threshold, learnt from all ranks' batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import ddp_rank_states


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_ddp_ranks_keep_the_same_threshold(arch: str, tmp_path: Path) -> None:
    """strategy='ddp' over gloo, each rank reading other rows: θ and every weight equal on both ranks (each
    rank's own batch minimum let θ drift apart, and the exported SAE held rank 0's)."""
    module = f"SAEModule([SAESpec({arch!r}, n_features=64, k=4)], warmup_steps=2, init_batches=2)"
    rank0, rank1 = ddp_rank_states(tmp_path, module, tokens=12 * 64, timeout=180)
    assert rank0["saes.0.threshold"] > 0  # θ was learnt
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key


def test_one_process_keeps_its_own_value() -> None:
    from mmsae.sae.ranks import ranks_mean

    for value in (torch.tensor(0.5), torch.tensor(float("inf"))):
        assert torch.equal(ranks_mean(value), value)
