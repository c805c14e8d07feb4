"""`target_l0` for the L1-penalty variants: λ is calibrated while training so that L0 lands on the target."""

from __future__ import annotations

import pytest
import torch

import mmsae
from mmsae import metrics
from mmsae.checkpoint import load_sae, save_sae
from mmsae.datasets.synthetic import SyntheticActivations
from mmsae.sae import build_sae


@pytest.mark.parametrize("arch", ["relu", "gated"])
def test_target_l0_gives_the_asked_l0_on_held_out_tokens(arch: str) -> None:
    data = SyntheticActivations(d=32, n_directions=256, mean_active=4, seed=0)
    train_ND, eval_ND = data.sample(262_144), data.sample(16_384, offset=2**40)
    sae = mmsae.train(
        train_ND,
        sae=arch,
        n_features=256,
        tokens=len(train_ND),
        batch_size=512,
        devices=1,
        l1_warmup_steps=50,
        target_l0=8,
    )
    l0 = metrics.evaluate(sae, eval_ND.split(4096))["l0"]
    assert 6 <= l0 <= 10, l0


def test_calibration_moves_lambda_towards_the_target_and_is_saved(tmp_path) -> None:
    sae = build_sae("relu", 8, 16, target_l0=2, l1_warmup_steps=0).train()  # calibrated in training only
    dense = torch.ones(4, 16)  # L0 16, far above the target: λ must grow
    sae.calibrate(dense)
    assert sae.l1_scale.item() == pytest.approx(torch.e**0.01)
    sae.calibrate(torch.zeros(4, 16))  # L0 0, below: λ shrinks back
    assert sae.l1_scale.item() == pytest.approx(1.0)
    sae.l1_scale.fill_(3.0)
    assert sae.l1_coef_at(10).item() == pytest.approx(3 * 5 / 8)
    save_sae(sae, tmp_path / "sae")
    assert load_sae(tmp_path / "sae").l1_scale.item() == 3.0
    plain = build_sae("relu", 8, 16).train()  # no target: no calibration, nothing extra in the checkpoint
    plain.calibrate(dense)
    assert plain.l1_scale.item() == 1.0 and "l1_scale" not in plain.state_dict()


def test_bad_target_l0_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="target_l0=0"):
        build_sae("gated", 8, 16, target_l0=0)
