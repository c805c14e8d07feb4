"""The trainer's step with clipping, gradient projection and atom renormalisation done inside the optimizer
(`mmsae.trainer.optim`, `mmsae.kernels.optim.Adam`) trains the same SAE as with those done by torch ops; and
the CUDA-graphed step computes the training metrics only on logging steps.

On CPU the fused optimizer step runs in the Triton interpreter (`fused_optimizer`: the optimizer takes its
Triton path while the SAE's own kernels keep torch's, which the interpreter would make slow).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import mmsae
from mmsae import kernels
from mmsae.datasets.synthetic import SyntheticActivations
from mmsae.kernels import triton_adam
from mmsae.kernels.optim import Adam
from mmsae.sae import build_sae, normalized_mse
from mmsae.trainer import SAEDataModule, SAEModule, SAESpec
from mmsae.trainer import optim as trainer_optim
from mmsae.trainer.optim import keeps_unit_rows, unit_rows_of

D, N, BATCH, STEPS = 16, 32, 64, 10


def data(n: int = STEPS * BATCH) -> torch.Tensor:
    return SyntheticActivations(d=D, n_directions=64, mean_active=3, seed=0).sample(n) * 3.0


def count_fused_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    for name in ("adam_update_", "unit_rows_adam_update_", "unit_rows_grad_norm"):
        real = getattr(triton_adam, name)
        monkeypatch.setattr(
            triton_adam, name, lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw)
        )
    return calls


def fused_optimizer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The optimizer's Triton path wherever its inputs allow, whatever the kernel backend."""
    real = Adam._fused_applies

    def applies(group: dict) -> bool:
        backend, kernels._BACKEND = kernels._BACKEND, "triton"
        try:
            return real(group)
        finally:
            kernels._BACKEND = backend

    monkeypatch.setattr(Adam, "_fused_applies", staticmethod(applies))


def torch_ops_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused path off: the optimizer runs remove_parallel_grads → clip_grad_norm_ → torch's Adam →
    normalize_decoder as torch ops (what the module ran itself before)."""
    monkeypatch.setattr(Adam, "_fused_applies", staticmethod(lambda group: False))


def test_mmsae_train_gives_the_same_sae_with_the_fused_step(monkeypatch: pytest.MonkeyPatch) -> None:
    fused_optimizer(monkeypatch)
    kwargs: dict[str, Any] = dict(n_features=N, k=4, tokens=STEPS * BATCH, batch_size=BATCH, warmup_steps=3)
    calls = count_fused_calls(monkeypatch)
    fused = mmsae.train(data(), aux_k=8, dead_tokens=2 * BATCH, **kwargs)
    assert "unit_rows_adam_update_" in calls and "unit_rows_grad_norm" in calls  # grad_clip=1.0: clipping on
    calls.clear()
    with monkeypatch.context() as m:
        torch_ops_only(m)
        reference = mmsae.train(data(), aux_k=8, dead_tokens=2 * BATCH, **kwargs)
    assert not calls
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert not torch.equal(fused.W_dec, build_sae("topk", D, N, k=4).W_dec)


def train_module(arch: str, options: dict[str, Any]) -> SAEModule:
    torch.manual_seed(0)
    spec = SAESpec(arch=arch, n_features=N, options=options)
    # A small clip norm so that clipping acts.
    module = SAEModule([spec], d_in=D, warmup_steps=3, grad_clip=0.01, cuda_graphs=False)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        precision="32-true",
    )
    trainer.fit(module, datamodule=SAEDataModule(data(), tokens=STEPS * BATCH, batch_size=BATCH, seed=0))
    return module


@pytest.mark.parametrize(
    "arch, options, owned",
    [
        ("topk", {"k": 4}, True),
        ("jumprelu", {}, False),
        ("topk", {"k": 4, "unit_norm_decoder": False}, False),
    ],
    ids=["topk", "jumprelu", "free_decoder"],
)
def test_active_clipping_and_who_keeps_the_atoms(
    arch: str, options: dict[str, Any], owned: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plain unit-norm decoders are the optimizer's to project and renormalise; variants with their own
    constraint (JumpReLU clamps its threshold) or a free decoder keep the module's calls, and the optimizer
    only clips them. Either way the fused run equals the torch-ops run, with clipping active."""
    fused_optimizer(monkeypatch)
    calls = count_fused_calls(monkeypatch)
    fused = train_module(arch, options)
    sae = fused.saes[0]
    assert (unit_rows_of(sae) is not None) == owned == keeps_unit_rows(fused.optimizers().optimizer, sae)
    assert ("unit_rows_adam_update_" in calls) == owned and "adam_update_" in calls
    with monkeypatch.context() as m:
        torch_ops_only(m)
        reference = train_module(arch, options)
    for key, value in reference.saes[0].state_dict().items():
        torch.testing.assert_close(sae.state_dict()[key], value, rtol=1e-4, atol=1e-5, msg=key)
    if options.get("unit_norm_decoder", True):
        torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(N))


def test_variants_with_their_own_dictionary_are_not_the_optimizers() -> None:
    assert unit_rows_of(build_sae("archetypal", D, N, k=4, n_anchors=8)) is None
    assert unit_rows_of(build_sae("relu", D, N)) is None  # unit_norm_decoder=False by default
    for arch in ("topk", "batchtopk", "abstopk", "matryoshka", "gated", "mp", "hierarchical_topk"):
        sae = build_sae(arch, D, N, **({} if arch in ("gated", "hierarchical_topk") else {"k": 4}))
        assert unit_rows_of(sae) is sae.W_dec, arch
    assert trainer_optim.WarmupDecay(10, 2, 2)(0) == 0.5


# ------------------------------------------------------------------------- metrics only on logging steps
LOG_EVERY = 4


def train_logged(
    monkeypatch: pytest.MonkeyPatch, graphed: bool, log_dir: str
) -> tuple[SAEModule, L.Trainer, list]:
    """A run with the graph runner (on CPU it runs the step eagerly, with the arguments a capture would
    get) or without it; records each step's `metrics` argument and the outputs it returned."""
    steps: list[tuple[bool, dict]] = []
    real = SAEModule._step

    def step(self: SAEModule, batch_BD: torch.Tensor, metrics: bool = True) -> dict:
        logs = real(self, batch_BD, metrics=metrics)
        steps.append((metrics, logs))
        return logs

    monkeypatch.setattr(SAEModule, "_step", step)
    if graphed:
        monkeypatch.setattr(SAEModule, "_graph_blocker", lambda self: None)  # as on a GPU
    torch.manual_seed(0)
    module = SAEModule(
        [SAESpec(n_features=N, k=4)], d_in=D, warmup_steps=3, cuda_graphs=None if graphed else False
    )
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=L.pytorch.loggers.CSVLogger(log_dir),
        log_every_n_steps=LOG_EVERY,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        precision="32-true",
    )
    trainer.fit(module, datamodule=SAEDataModule(data(), tokens=STEPS * BATCH, batch_size=BATCH, seed=0))
    return module, trainer, steps


def test_graphed_steps_compute_metrics_only_on_logging_steps(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The graph runner is asked for the metrics on logging steps only (its key then holds `metrics`, so a
    GPU run captures two graphs); the logged values are those of the eager run."""
    with monkeypatch.context() as m:
        _, eager_trainer, _ = train_logged(m, graphed=False, log_dir=str(tmp_path / "eager"))
    module, trainer, steps = train_logged(monkeypatch, graphed=True, log_dir=str(tmp_path / "graphed"))
    assert module._graphed is not None
    assert [metrics for metrics, _ in steps] == [i % LOG_EVERY == 0 for i in range(STEPS)]
    assert all(logs == {} for metrics, logs in steps if not metrics)
    assert all("train/sae/fvu" in logs for metrics, logs in steps if metrics)
    logged, expected = trainer.logged_metrics, eager_trainer.logged_metrics
    assert logged.keys() == expected.keys() and "train/sae/fvu" in logged
    for key, value in expected.items():
        torch.testing.assert_close(logged[key], value, rtol=1e-5, atol=1e-7, msg=key)


def test_graph_keys_tell_metrics_from_no_metrics() -> None:
    from mmsae.trainer.graphs import GraphedStep

    x = torch.zeros(2, 3)
    keys = {GraphedStep.full_key(x, (4,), {"metrics": m}) for m in (True, False)}
    assert len(keys) == 2 and GraphedStep.full_key(x, (4,), {"metrics": True}) in keys


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs CUDA; CPU twins: test_mmsae_train_gives_the_same_sae_with_the_fused_step, "
    "test_graphed_steps_compute_metrics_only_on_logging_steps",
)
def test_graphed_fused_training_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Captured and replayed on the GPU, the fused step trains the SAE the torch ops train: in fp32 to
    within float rounding; in bf16-mixed to the same held-out FVU, not the same weights: a bf16 copy one ulp
    apart flips top-k choices, which the short-run LR amplifies (on an H200 the two runs ended 0.52 apart in
    W_enc at FVU 0.360 and 0.355, where fp32 runs agreed to 2e-3). 120 steps log at 0, 50 and 100, so the
    metrics graph is captured as well."""
    data = SyntheticActivations(d=64, n_directions=512, mean_active=4, seed=0).sample(121 * 256) * 3.0
    x, held = data[: 120 * 256].cuda(), data[120 * 256 :].cuda()
    kwargs: dict[str, Any] = dict(n_features=256, k=8, tokens=120 * 256, batch_size=256, warmup_steps=3)
    for precision in ("32-true", "bf16-mixed"):
        fused = mmsae.train(x, cuda_graphs=True, precision=precision, **kwargs)
        with monkeypatch.context() as m:
            torch_ops_only(m)
            reference = mmsae.train(x, cuda_graphs=True, precision=precision, **kwargs)
        if precision == "32-true":
            for key, value in reference.state_dict().items():
                err = float((fused.state_dict()[key] - value).norm() / value.norm().clamp_min(1e-12))
                assert err < 1e-2, (key, err)
        fvu = [float(normalized_mse(held, sae.cuda()(held).x_hat)) for sae in (fused, reference)]
        assert abs(fvu[0] - fvu[1]) < 0.05 * fvu[1], (precision, fvu)
    real = SAEModule._setup_graphs
    runners: list = []
    monkeypatch.setattr(SAEModule, "_setup_graphs", lambda self: real(self) or runners.append(self))
    # No feature is ever dead: AuxK keeps one size, so the logging steps 0 and 50 warm up one metrics graph
    # and step 100 replays it (dead features change AuxK's size, hence the graph, between them).
    mmsae.train(x, cuda_graphs=True, precision="bf16-mixed", dead_tokens=10**12, **kwargs)
    graphed = runners[0]._graphed
    assert graphed.replays > 20 and {key[2] for key in graphed.graphs} == {
        (("metrics", False),),
        (("metrics", True),),
    }
