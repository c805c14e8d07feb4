"""CUDA-graphed training steps (`mmsae.trainer.graphs`): the graphed path trains exactly as the eager one.

Eager and graphed training run one step function (`SAEModule._step`: forward, backward, clipping, Adam,
renormalisation, dead clocks). On CPU nothing can be captured, so the CPU twins run it through `GraphedStep`
(as a GPU run would, minus the capture) against the plain eager path, for every SAE variant. The GPU tests
capture and replay it.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from test_sae_variants import VARIANTS

from mmsae.datasets.synthetic import SyntheticActivations
from mmsae.sae import REGISTRY, TopKSAE
from mmsae.sae.topk import TopKConfig
from mmsae.trainer import SAEDataModule, SAEModule, SAESpec
from mmsae.trainer.state import DeadFeatureClock

D, N, BATCH, STEPS = 16, 64, 64, 40
NEEDS_CUDA = "needs CUDA; CPU twin: test_step_through_graphed_step_trains_like_eager"


def data(n: int = STEPS * BATCH) -> torch.Tensor:
    return SyntheticActivations(d=D, n_directions=64, mean_active=3, seed=0).sample(n) * 3.0


def train(arch: str, options: dict[str, Any], accelerator: str = "cpu", **module_kw: Any) -> SAEModule:
    torch.manual_seed(0)
    # dead_tokens of a few batches: features die and revive during the run, so AuxK's size changes.
    spec = SAESpec(arch=arch, n_features=N, options={**options, "dead_tokens": 4 * BATCH})
    # A small clip norm so that clipping acts (at 1.0 it never does here, and would go untested).
    module = SAEModule([spec], d_in=D, warmup_steps=5, grad_clip=0.01, **module_kw)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator=accelerator,
        devices=1,
        logger=False,
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        precision="32-true",
    )
    trainer.fit(module, datamodule=SAEDataModule(data(), tokens=STEPS * BATCH, batch_size=BATCH, seed=0))
    assert trainer.global_step == STEPS
    return module


def state(module: SAEModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in module.saes[0].state_dict().items()}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_step_through_graphed_step_trains_like_eager(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    arch, options = VARIANTS[name]
    eager = train(arch, options, cuda_graphs=False)
    assert eager._graphed is None
    monkeypatch.setattr(SAEModule, "_graph_blocker", lambda self: None)  # as on a GPU
    full = train(arch, options)
    assert full._graphed is not None
    expected, got = state(eager), state(full)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
    assert full.tokens_seen.item() == eager.tokens_seen.item() == STEPS * BATCH


def test_every_variant_is_covered() -> None:
    assert {arch for arch, _ in VARIANTS.values()} == set(REGISTRY)


def test_cuda_graphs_required_off_cuda_names_the_reason() -> None:
    with pytest.raises(ValueError, match="cuda_graphs=True, but the SAEs are on cpu"):
        train("topk", {"k": 4}, cuda_graphs=True)


def test_aux_size_rounds_dead_count_up_to_a_power_of_two() -> None:
    sae = REGISTRY["topk"](TopKConfig(d_in=D, n_features=N, k=4, aux_k=8, dead_tokens=10))
    clock = DeadFeatureClock(N, dead_tokens=10)
    assert sae.aux_size(clock.count()) == 0  # nothing dead: AuxK off
    for dead, size in [(1, 1), (3, 4), (5, 8), (40, 8)]:
        fired = torch.ones(N, dtype=torch.bool)
        fired[:dead] = False
        clock.tokens_since_fired.zero_()
        clock.update(fired, 10)
        assert clock.count() != dead  # the count in force: only refresh_count() changes it
        clock.refresh_count()  # takes the count; the one taken before comes into force
        clock.refresh_count()
        assert clock.count() == dead
        assert sae.aux_size(clock.count()) == size and sae.loss_structure(clock.count()) == size


def kill(clock: DeadFeatureClock, dead: int) -> None:
    fired = torch.ones(
        len(clock.tokens_since_fired), dtype=torch.bool, device=clock.tokens_since_fired.device
    )
    fired[:dead] = False
    clock.tokens_since_fired.zero_()
    clock.update(fired, clock.dead_tokens)


def test_a_dead_count_comes_into_force_one_refresh_after_it_is_taken() -> None:
    """The count is copied to the host while the GPU runs on, and used from the next refresh: the host never
    waits for it (tests/test_graphs.py's GPU twin checks that no refresh syncs)."""
    clock = DeadFeatureClock(N, dead_tokens=10)
    clock.refresh_count()  # a new clock counts now: nothing dead
    in_force = []
    for dead in (3, 5, 5, 0):
        kill(clock, dead)
        clock.refresh_count()
        in_force.append(clock.count())
    assert in_force == [0, 3, 5, 5]


def test_a_loaded_clock_uses_the_counts_it_was_saved_with() -> None:
    """A resume continues exactly: the count in force and the one taken come back from the checkpoint."""
    saved = DeadFeatureClock(N, dead_tokens=10)
    for dead in (3, 7):
        kill(saved, dead)
        saved.refresh_count()
    kill(saved, 9)  # the mask moved on since the last refresh
    loaded = DeadFeatureClock(N, dead_tokens=10)
    loaded.refresh_count()  # host-side caches that loading must drop
    loaded.load_state_dict(saved.state_dict())
    assert loaded.count() == saved.count() == 3
    for clock in (saved, loaded):
        clock.refresh_count()
    assert loaded.count() == saved.count() == 7


# ------------------------------------------------------------------------------------------- GPU
class SyncingTopK(TopKSAE):
    """A step that reads the GPU on the host (as a careless user variant might): capture must fail."""

    arch = "_test_syncing_topk"

    def loss(self, x, out, step=0, dead=None):
        result = super().loss(x, out, step, dead)
        if float(result.loss) < 0:  # a host read of a device scalar
            raise AssertionError
        return result


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NEEDS_CUDA)
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_graphed_training_equals_eager_on_cuda(name: str) -> None:
    arch, options = VARIANTS[name]
    eager = train(arch, options, "gpu", cuda_graphs=False)
    graphed = train(arch, options, "gpu", cuda_graphs=True)
    assert graphed._graphed is not None and graphed._graphed.disabled is None
    assert graphed._graphed.replays >= STEPS // 2, "most steps should be replays"
    expected, got = state(eager), state(graphed)
    for key, value in expected.items():
        # Capturable Adam computes its bias correction on the device: float rounding, not drift.
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NEEDS_CUDA)
def test_failed_capture_warns_and_trains_eagerly_on_cuda() -> None:
    eager = train("topk", {"k": 4}, "gpu", cuda_graphs=False)
    REGISTRY[SyncingTopK.arch] = SyncingTopK
    try:
        with pytest.warns(UserWarning, match="CUDA graph capture failed"):
            module = train(SyncingTopK.arch, {"k": 4}, "gpu")
    finally:
        del REGISTRY[SyncingTopK.arch]
    assert module._graphed is not None and module._graphed.disabled and module._graphed.replays == 0
    torch.randn(8, device="cuda")  # the aborted capture left the CUDA generators usable
    for key, value in state(eager).items():
        torch.testing.assert_close(state(module)[key], value, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs CUDA; CPU twin: test_a_dead_count_comes_into_force_one_refresh_after_it_is_taken",
)
def test_dead_count_refreshes_never_wait_for_the_gpu() -> None:
    clock = DeadFeatureClock(N, dead_tokens=10).cuda()
    clock.refresh_count()  # a new clock reads the device once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for dead in (3, 5, 5):
            kill(clock, dead)
            clock.refresh_count()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert clock.count() == 5
