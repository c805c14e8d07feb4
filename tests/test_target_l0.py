"""`target_l0` for the L1-penalty variants: λ is calibrated while training so that L0 lands on the target."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import ddp_rank_states, fit_checkpointed
from test_graphs import state, train

import mmsae
from mmsae import metrics
from mmsae.checkpoint import load_sae, save_sae
from mmsae.datasets.synthetic import SyntheticActivations
from mmsae.sae import build_sae
from mmsae.trainer import SAEDataModule, SAEModule, SAESpec


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
    assert (short.adam_restart_step(), long.adam_restart_step()) == (19, None)  # Adam restarts in short runs
    plain = build_sae("relu", 8, 16)
    plain.fit_to_run(192)
    assert plain.cfg.l1_warmup_steps is None and plain.l1_coef_at(1000) == pytest.approx(0.5 * 5 / 8)
    assert plain.adam_restart_step() is None  # no target, no restart


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
    assert loaded.l1_scale.item() == 3.0 and loaded.l0_error.item() == -1.0  # the damping's memory too
    state = loaded.state_dict()
    del state["l0_error"]  # as SAEs saved before it was kept
    loaded.load_state_dict(state)
    assert loaded.l0_error.isnan()
    plain = build_sae("relu", 8, 16).train()  # no target: no calibration, nothing extra in the checkpoint
    plain.calibrate(dense, step=10**6)
    assert plain.l1_scale.item() == 1.0 and "l1_scale" not in plain.state_dict()


@pytest.mark.parametrize("arch", ["relu", "gated"])
def test_adam_restarts_when_lambdas_warmup_ends_and_on_resume_alike(arch: str, tmp_path: Path) -> None:
    # The dense first steps' gradients, kept in Adam's second moment, froze the encoder in short runs: at
    # n = 4096 on DINOv2-S tokens L0 ended 32 % above the target (ReLUConfig.restart_adam).
    def run(options: dict, ckpt_path: str | None = None, saves: str = "ckpt") -> tuple[SAEModule, L.Trainer]:
        L.seed_everything(0)
        module = SAEModule([SAESpec(arch, n_features=32, options=options)], warmup_steps=2)
        data = SyntheticActivations(d=16, n_directions=64, mean_active=3, seed=0).sample(2048)
        datamodule = SAEDataModule(data, tokens=12 * 64, batch_size=64)
        return module, fit_checkpointed(module, datamodule, tmp_path / saves, 3, ckpt_path)

    target = {"target_l0": 4, "l1_warmup_steps": 5}
    full, full_trainer = run(target)
    steps = [s["step"].item() for s in full_trainer.optimizers[0].state_dict()["state"].values()]
    assert steps == [12 - 5] * len(list(full.parameters()))  # restarted before step 5, once
    plain = run({"l1_warmup_steps": 5}, saves="plain")[1]  # no target: λ is fixed, and so is Adam
    assert {s["step"].item() for s in plain.optimizers[0].state_dict()["state"].values()} == {12}
    # Saved after 3 steps, the resumed run makes the restart itself; saved after 9, it calibrates λ on from
    # where the run was, damping included (the previous L0 error was not saved: its first step differed).
    for saved in (3, 9):
        resumed, resumed_trainer = run(target, str(tmp_path / "ckpt" / f"epoch=0-step={saved}.ckpt"))
        for key, value in full.state_dict().items():
            torch.testing.assert_close(resumed.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
        opt_full = full_trainer.optimizers[0].state_dict()["state"]
        opt_resumed = resumed_trainer.optimizers[0].state_dict()["state"]
        for i in opt_full:
            for key in ("step", "exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(opt_resumed[i][key], opt_full[i][key], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("arch", ["relu", "gated"])
def test_the_restart_trains_alike_through_graphed_steps(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    options = {"target_l0": 8, "l1_warmup_steps": 10}  # restarts before step 10 of 40
    eager = train(arch, options, cuda_graphs=False)
    monkeypatch.setattr(SAEModule, "_graph_blocker", lambda self: None)  # as on a GPU, minus the capture
    graphed = train(arch, options)
    assert graphed._graphed is not None
    for key, value in state(eager).items():
        torch.testing.assert_close(state(graphed)[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA; CPU twin: the test above")
@pytest.mark.parametrize("arch", ["relu", "gated"])
def test_the_restart_trains_alike_in_cuda_graphs(arch: str) -> None:
    # The restart zeroes the state tensors that the captured step reads, in place, between replays.
    options = {"target_l0": 8, "l1_warmup_steps": 10}
    eager = train(arch, options, "gpu", cuda_graphs=False)
    graphed = train(arch, options, "gpu", cuda_graphs=True)
    assert graphed._graphed is not None and graphed._graphed.disabled is None
    for key, value in state(eager).items():
        torch.testing.assert_close(state(graphed)[key], value, rtol=1e-4, atol=1e-5, msg=key)


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
