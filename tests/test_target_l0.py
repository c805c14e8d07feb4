"""`target_l0` for the L1-penalty variants: λ is calibrated while training so that L0 lands on the target."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import ddp_rank_states

import mmsae
from mmsae import metrics
from mmsae.checkpoint import load_sae, save_sae
from mmsae.datasets.synthetic import SyntheticActivations
from mmsae.sae import build_sae


@pytest.mark.parametrize("arch", ["relu", "gated"])
def test_target_l0_gives_the_asked_l0_on_held_out_tokens_in_a_short_run(arch: str) -> None:
    # 200 steps with every controller default: a fixed 2000-step λ warm-up left L0 several times the target.
    data = SyntheticActivations(d=32, n_directions=256, mean_active=4, seed=0)
    train_ND, eval_ND = data.sample(102_400), data.sample(16_384, offset=2**40)
    sae = mmsae.train(
        train_ND, sae=arch, n_features=256, tokens=len(train_ND), batch_size=512, devices=1, target_l0=8
    )
    l0 = metrics.evaluate(sae, eval_ND.split(4096))["l0"]
    assert 8 * 0.85 <= l0 <= 8 * 1.15, l0
    assert sae.cfg.l1_warmup_steps == 20 and sae.cfg.l0_adapt_rate == pytest.approx(0.03)  # fitted to the run


def test_the_controller_defaults_scale_with_the_run_and_a_plain_run_keeps_its_warmup() -> None:
    short, long = build_sae("relu", 8, 16, target_l0=2), build_sae("gated", 8, 16, target_l0=2)
    short.fit_to_run(192)
    long.fit_to_run(16_000)
    assert (short.cfg.l1_warmup_steps, short.cfg.l0_adapt_rate) == (19, pytest.approx(0.03))
    assert (long.cfg.l1_warmup_steps, long.cfg.l0_adapt_rate) == (1600, pytest.approx(0.03 * 0.1**0.5))
    plain = build_sae("relu", 8, 16)
    plain.fit_to_run(192)
    assert plain.cfg.l1_warmup_steps is None and plain.l1_coef_at(1000) == pytest.approx(0.5 * 5 / 8)


def test_calibration_moves_lambda_towards_the_target_damped_and_is_saved(tmp_path) -> None:
    sae = build_sae("relu", 8, 16, target_l0=2, l1_warmup_steps=10, l0_adapt_rate=0.01, l0_damping=1.0)
    sae.train()  # calibrated in training only
    dense = torch.ones(4, 16)  # L0 16, far above the target: error log(8) clipped to 1, λ must grow
    sae.calibrate(dense, step=5)
    assert sae.l1_scale.item() == 1.0  # not during the warm-up: the weights cannot follow yet
    sae.calibrate(dense, step=torch.tensor(10))  # a device step, as in a CUDA-graphed step
    assert sae.l1_scale.item() == pytest.approx(torch.e**0.01)
    sae.calibrate(torch.zeros(4, 16), step=11)  # L0 0: error −1; its fall from +1 pulls λ down at once
    assert sae.l1_scale.item() == pytest.approx(torch.e ** (0.01 - 0.01 - 2.0))
    sae.l1_scale.fill_(3.0)
    assert sae.l1_coef_at(10).item() == pytest.approx(3 * 5 / 8)
    save_sae(sae, tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae")
    assert loaded.l1_scale.item() == 3.0 and loaded.l0_error.isnan()
    plain = build_sae("relu", 8, 16).train()  # no target: no calibration, nothing extra in the checkpoint
    plain.calibrate(dense, step=10**6)
    assert plain.l1_scale.item() == 1.0 and "l1_scale" not in plain.state_dict()


def test_bad_target_l0_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="target_l0=0"):
        build_sae("gated", 8, 16, target_l0=0)


@pytest.mark.parametrize("arch", ["relu", "gated"])
def test_ddp_ranks_calibrate_lambda_alike(arch: str, tmp_path: Path) -> None:
    """strategy='ddp' over gloo, each rank reading other rows: λ follows the L0 of all ranks' tokens, so the
    controller's state (and every weight) is equal on both ranks; from each rank's own L0 it drifted apart."""
    options = {"target_l0": 24, "l1_warmup_steps": 1}
    module = (
        f"SAEModule([SAESpec({arch!r}, n_features=64, options={options!r})], warmup_steps=2, init_batches=2)"
    )
    rank0, rank1 = ddp_rank_states(tmp_path, module, tokens=12 * 64, timeout=180)
    # A target near the ranks' L0 (~30 here): an error clipped to ±1 would move both ranks alike anyway.
    assert rank0["saes.0.l1_scale"] != 1.0
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
