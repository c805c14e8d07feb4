"""Trainer: data sources, the Lightning module (scale, sweeps, NaN rows, resume, DDP) and `mmsae.train`."""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from conftest import ddp_rank_states, fit_checkpointed

import mmsae
from mmsae import kernels
from mmsae.checkpoint import load_sae
from mmsae.datasets.synthetic import SyntheticActivations
from mmsae.sae import default_lr, get_sae_class, normalized_mse
from mmsae.staging import RowScreen, finite_rows_mask, stage_budget
from mmsae.trainer import SAEDataModule, SAEModule, SAESpec
from mmsae.trainer.data import ArraySource, IterableSource, TokenBudget, as_source

D = 16


def acts(n: int, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Sparse superposition data: 64 features in d=16, ~3 active per token."""
    return SyntheticActivations(d=D, n_directions=64, mean_active=3, seed=seed).sample(n) * scale


def fit(module: SAEModule, datamodule: SAEDataModule, **kwargs) -> L.Trainer:
    defaults = dict(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer = L.Trainer(**{**defaults, **kwargs})
    trainer.fit(module, datamodule=datamodule, weights_only=True)
    return trainer


# ----------------------------------------------------------------------------- data
def test_token_budget_shards_ranks_and_skips_on_resume() -> None:
    source = ArraySource(torch.arange(64.0).repeat_interleave(2).reshape(64, 2))
    ranks = [list(TokenBudget(source, 4, n_batches=3, seed=1, rank=r, world_size=2)) for r in range(2)]
    rows = [set(b[:, 0].tolist()) for rank in ranks for b in rank]
    assert len(ranks[0]) == len(ranks[1]) == 3
    assert len(set().union(*rows)) == 24  # 6 batches of 4, all distinct rows: no rank sees another's batch
    resumed = list(TokenBudget(source, 4, n_batches=3, seed=1, rank=1, world_size=2, start=2))
    assert len(resumed) == 1 and torch.equal(resumed[0], ranks[1][2])


def test_array_source_reshuffles_each_pass_and_reads_memmap(tmp_path: Path) -> None:
    data = np.arange(40, dtype=np.float16).reshape(20, 2)
    mm = np.lib.format.open_memmap(tmp_path / "acts.npy", mode="w+", dtype=np.float16, shape=data.shape)
    mm[:] = data
    source = as_source(np.load(tmp_path / "acts.npy", mmap_mode="r"))
    first, second = list(source.stream(10, seed=0, n_tokens=0)), list(source.stream(10, seed=1, n_tokens=0))
    assert first[0].dtype == torch.float16 and first[0].shape == (10, 2)  # converted on the device
    assert sorted(torch.cat(first)[:, 0].tolist()) == sorted(data[:, 0].tolist())  # every row once per pass
    assert not torch.equal(torch.cat(first), torch.cat(second))


def test_array_source_shuffles_the_next_pass_in_a_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer's loop never waits for a pass's shuffle (a host sort of every row, ~0.1 s per 2M rows:
    with data on a GPU it drained the queue of steps at every pass boundary)."""
    drawn: list[bool] = []  # per shuffle: drawn on the thread reading the batches?
    randperm = torch.randperm

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        drawn.append(threading.current_thread() is threading.main_thread())
        return randperm(*args, **kwargs)

    source = ArraySource(torch.arange(40.0).reshape(20, 2))
    reference = torch.cat([b for s in (7, 8, 9) for b in source.stream(5, seed=s, n_tokens=0)])
    monkeypatch.setattr(torch, "randperm", spy)
    batches = source.global_batches(5, seed=7, n_tokens=0)
    first_pass = [next(batches) for _ in range(4)]
    deadline = time.monotonic() + 10
    while len(drawn) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(drawn) == 2 and not any(drawn)  # the second pass is drawn while the first is read
    rest = [next(batches) for _ in range(8)]
    assert not any(drawn)
    assert torch.equal(torch.cat(first_pass + rest), reference)  # the same batches as without the thread
    blocks = source.global_blocks(5, 7, 0, [3, 3, 3, 3])
    assert torch.equal(torch.cat([b for block in blocks for b in block]), reference)
    # A run of two passes shuffles no third one ahead (it would only hold up the exit); read past, it is
    # shuffled where it is read.
    drawn.clear()
    batches = source.global_batches(5, seed=7, n_tokens=40)
    two_passes = [next(batches) for _ in range(8)]
    time.sleep(0.2)
    assert drawn == [False, False]
    assert torch.equal(torch.cat(two_passes + [next(batches) for _ in range(4)]), reference)
    assert drawn == [False, False, True]


def test_iterable_source_rebatches_one_shot_iterators() -> None:
    chunks = [torch.full((3, 2), float(i)) for i in range(5)]  # 15 rows in chunks of 3
    source = IterableSource(iter(chunks))
    assert source.d_in == 2 and not source.replayable
    batches = list(source.global_batches(4, seed=0, n_tokens=0))
    assert [len(b) for b in batches] == [4, 4, 4]
    assert torch.cat(batches)[:, 0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]


def test_empty_or_bad_data_errors() -> None:
    with pytest.raises(ValueError, match="no rows"):
        mmsae.train(torch.empty(0, D), n_features=32, k=2, tokens=64, batch_size=8)
    with pytest.raises(ValueError, match="no batches"):
        mmsae.train([], n_features=32, k=2, tokens=64, batch_size=8)
    with pytest.raises(ValueError, match="less than one batch"):
        mmsae.train(acts(64), n_features=32, k=2, tokens=4, batch_size=8)
    with pytest.raises(TypeError, match="Cannot train on int"):
        mmsae.train(3, n_features=32, k=2)


# ----------------------------------------------------------------------------- training
def test_train_reduces_fvu_and_records_provenance(tmp_path: Path) -> None:
    x = acts(4096, scale=5.0)
    held_out = (
        SyntheticActivations(d=D, n_directions=64, mean_active=3, seed=0).sample(1024, offset=10**6) * 5
    )
    sae = mmsae.train(
        x,
        n_features=64,
        k=4,
        tokens=60 * 128,
        batch_size=128,
        warmup_steps=5,
        hook="blocks.3",
        encoder="timm:test_vit",
        out_dir=str(tmp_path),
        checkpoint_every=1000,
    )
    with torch.no_grad():
        fvu = normalized_mse(held_out, sae(held_out).x_hat).item()
    assert fvu < 0.4, fvu  # an untrained SAE has FVU ≈ 1
    assert sae.cfg.normalization == "folded" and sae.cfg.training_tokens == 60 * 128
    assert (sae.cfg.hook, sae.cfg.encoder) == ("blocks.3", "timm:test_vit")
    saved = load_sae(tmp_path / "blocks.3")
    assert torch.equal(saved.W_enc, sae.W_enc)
    assert not sae.training and not saved.training  # handed out for inference
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() and (tmp_path / "csv" / "metrics.csv").is_file()


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs CUDA; CPU twin: test_train_reduces_fvu_and_records_provenance",
)
def test_train_bf16_mixed_on_cuda() -> None:
    x = acts(8192, scale=5.0)
    held_out = (
        SyntheticActivations(d=D, n_directions=64, mean_active=3, seed=0).sample(1024, offset=10**6) * 5
    )
    sae = mmsae.train(x, n_features=64, k=4, tokens=60 * 128, batch_size=128, warmup_steps=5, devices=1)
    assert mmsae.trainer.default_precision() == "bf16-mixed"
    assert sae.W_enc.dtype == torch.float32 and sae.W_enc.device.type == "cpu"
    with torch.no_grad():
        assert normalized_mse(held_out, sae(held_out).x_hat).item() < 0.4


def test_scale_folding_matches_training_fvu() -> None:
    x = acts(2048, scale=300.0)  # far from E‖x‖ = √d, so the scale matters
    module = SAEModule([SAESpec(n_features=64, k=4)], warmup_steps=2)
    fit(module, SAEDataModule(x, tokens=20 * 128, batch_size=128))
    s = module.input_scale.item()
    assert s == pytest.approx(math.sqrt(D) / x.norm(dim=-1).mean().item(), rel=0.05)
    live, folded = module.saes[0], module.folded_sae()
    with torch.no_grad():
        out_live, out_folded = live(x * s), folded(x)
        fvu_live, fvu_folded = normalized_mse(x * s, out_live.x_hat), normalized_mse(x, out_folded.x_hat)
    assert torch.equal(out_live.codes.indices, out_folded.codes.indices)
    assert fvu_folded.item() == pytest.approx(fvu_live.item(), rel=1e-4)
    assert module.saes[0].cfg.normalization == "none"  # the live SAE is untouched


class StopAtOnce(L.Callback):
    """Ends a fit after its first step: the optimizer is set up for the whole run."""

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        trainer.should_stop = True


def test_abstopk_default_lr_is_half_topks_and_less_in_long_runs() -> None:
    """AbsTopK's features die at TopK's lr on real activations; its default is half (`default_lr_scale`),
    × (1953 / steps)^¼ in runs of more steps (in 7812 steps half still lost 1.2 % of them), and an explicit
    lr is kept as given."""
    abstopk = get_sae_class("abstopk")
    assert (
        abstopk.default_lr_scale(None)
        == abstopk.default_lr_scale(100)
        == abstopk.default_lr_scale(1953)
        == 0.5
    )
    assert abstopk.default_lr_scale(4 * 1953) == pytest.approx(0.5 * 0.25**0.25)  # 0.354
    assert get_sae_class("topk").default_lr_scale(4 * 1953) == 1.0
    specs = [
        SAESpec(n_features=32, k=2),
        SAESpec("abstopk", 32, 2),
        SAESpec("abstopk", 32, 2, lr=1e-3, name="given"),
    ]
    trainer = fit(SAEModule(specs, warmup_steps=2), SAEDataModule(acts(1024), tokens=8 * 128, batch_size=128))
    groups = trainer.optimizers[0].param_groups
    assert [g["initial_lr"] for g in groups] == [default_lr(32, 8), 0.5 * default_lr(32, 8), 1e-3]
    long_run = SAEModule([SAESpec("abstopk", 32, 2)], warmup_steps=2)
    trainer = fit(
        long_run, SAEDataModule(acts(1024), tokens=3906 * 4, batch_size=4), callbacks=[StopAtOnce()]
    )
    (group,) = trainer.optimizers[0].param_groups
    assert group["initial_lr"] == pytest.approx(0.5 * 0.5**0.25 * default_lr(32, 3906))


def test_archetypal_default_lr_is_four_times_topks_less_for_batches_below_1024() -> None:
    """Its mixing logits move by about the lr per step: 4× TopK's lr, × √(batch / 1024) below 1024 tokens
    (4× left 2 % of the features dead at batch 128 on synthetic data); the trainer passes its batch."""
    archetypal = get_sae_class("archetypal")
    assert archetypal.default_lr_scale(None) == archetypal.default_lr_scale(100, 16384) == 4.0
    assert archetypal.default_lr_scale(100, 1024) == 4.0
    assert archetypal.default_lr_scale(100, 256) == pytest.approx(2.0)
    trainer = fit(
        SAEModule([SAESpec("archetypal", 32, 2, options={"n_anchors": 16, "anchor_sample": 128})]),
        SAEDataModule(acts(1024), tokens=8 * 128, batch_size=128),
    )
    (group,) = trainer.optimizers[0].param_groups
    assert group["initial_lr"] == pytest.approx(4 * math.sqrt(128 / 1024) * default_lr(32, 8, 128))


def test_default_lr_cap_grows_with_batches_above_4096_tokens() -> None:
    """Short runs train at up to 7× Gao et al.'s lr; batches above 4096 tokens raise that cap by √(batch /
    4096) (at 16384: 14×, measured better than 7× on DINOv2-S tokens), and the trainer passes its batch."""
    gao = default_lr(32)
    assert default_lr(32, 250) == default_lr(32, 250, 1024) == default_lr(32, 250, 4096) == 7 * gao
    assert default_lr(32, 250, 16384) == pytest.approx(14 * gao)
    assert default_lr(32, 488, 16384) == pytest.approx(math.sqrt(80_000 / 488) * gao)  # below the cap
    assert default_lr(32, 10**6, 16384) == gao


def test_default_lr_cap_grows_in_runs_of_fewer_than_250_steps() -> None:
    """At 122 steps on DINOv2-S tokens (n = 4096) 7× left held-out FVU 3.9 % above 10× (0.2249 against
    0.2165, no feature dead at either): runs under 250 steps raise the cap by √(250 / steps), at most twice,
    not above an lr of 5.6e-3 and not for batches under 4096 tokens (at batch 1024 and n = 1024, 14× lost
    10.9 % of the features in 48 steps). Batches above 4096 tokens keep their own raise where it is larger (30
    steps at batch 16384 and 28× lost 1 %)."""
    n = 4096
    gao = default_lr(n)
    assert default_lr(n, 122) == pytest.approx(7 * math.sqrt(250 / 122) * gao)
    assert default_lr(n, 10) == default_lr(n, 62) == pytest.approx(14 * gao) == pytest.approx(5.6e-3)
    assert default_lr(n, 30, 16384) == default_lr(n, 250, 16384) == pytest.approx(14 * gao)
    assert default_lr(n, 122, 8192) == pytest.approx(7 * math.sqrt(250 / 122) * gao)
    at_ceiling = 7 * default_lr(1024)  # n = 1024: 7× already reaches 5.6e-3
    assert default_lr(1024, 48) == default_lr(1024, 250) == pytest.approx(at_ceiling)
    assert default_lr(2048, 48) == pytest.approx(5.6e-3)
    assert default_lr(n, 48, 2048) == default_lr(n, 48, 1024) == pytest.approx(7 * gao)  # small batches


def test_sweep_trains_two_saes_from_one_stream(tmp_path: Path) -> None:
    specs = [SAESpec(n_features=32, k=2), SAESpec(n_features=128, k=4, lr=1e-3, options={"aux_k": 0})]
    module = SAEModule(specs, warmup_steps=2, out_dir=str(tmp_path))
    assert len(module.saes) == 0  # built lazily from the datamodule's d_in
    trainer = fit(module, SAEDataModule(acts(2048), tokens=15 * 128, batch_size=128))
    groups = trainer.optimizers[0].param_groups
    assert [g["initial_lr"] for g in groups] == [default_lr(32, 15), 1e-3]
    assert {id(p) for p in groups[0]["params"]}.isdisjoint({id(p) for p in groups[1]["params"]})
    assert module.names == ["topk_n32_k2", "topk_n128_k4"]
    for name, n in [("topk_n32_k2", 32), ("topk_n128_k4", 128)]:
        cfg = json.loads((tmp_path / name / "cfg.json").read_text())
        assert (cfg["n_features"], cfg["training_tokens"]) == (n, 15 * 128)
    metrics = trainer.callback_metrics
    assert metrics["train/topk_n32_k2/l0"] <= 2 and metrics["train/topk_n128_k4/l0"] <= 4
    with pytest.raises(ValueError, match="collide"):
        SAEModule([SAESpec(name="a"), SAESpec(name="a")])


def test_nan_rows_are_counted_and_skipped() -> None:
    x = acts(1024)
    x[::10] = float("nan")  # 103 rows
    x[5, 3] = float("inf")
    module = SAEModule([SAESpec(n_features=32, k=2)], warmup_steps=2, init_batches=2)
    with pytest.warns(UserWarning, match="non-finite"):
        fit(module, SAEDataModule(x, tokens=1024, batch_size=128))  # exactly one pass over the rows
    assert module.skipped_rows.item() == 104
    assert module.tokens_seen.item() == 1024 - 104
    assert all(torch.isfinite(p).all() for p in module.parameters())
    x[:] = float("nan")
    with pytest.raises(ValueError, match="only non-finite"):
        fit(SAEModule([SAESpec(n_features=32, k=2)]), SAEDataModule(x, tokens=256, batch_size=128))


def test_rows_from_another_loader_are_screened_by_the_module() -> None:
    x = acts(512)
    x[::16] = float("inf")  # 32 rows
    loader = torch.utils.data.DataLoader(list(x.split(128)), batch_size=None)
    module = SAEModule([SAESpec(n_features=32, k=2)], d_in=D, warmup_steps=2, init_batches=2)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.warns(UserWarning, match="non-finite"):
        trainer.fit(module, train_dataloaders=loader)
    assert (module.skipped_rows.item(), module.tokens_seen.item()) == (32, 512 - 32)
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_row_screen_counts_each_place_once_and_keeps_hooks_aligned() -> None:
    screen = RowScreen()
    x = torch.arange(12.0).view(6, 2)
    y = x.clone()
    x[1, 0], y[4, 1] = float("nan"), float("-inf")
    with pytest.warns(UserWarning, match="non-finite"):
        kept = screen({"a": x, "b": y}, "batch 0")
    assert torch.equal(kept["a"], x[[0, 2, 3, 5]]) and torch.equal(kept["b"], y[[0, 2, 3, 5]])
    screen({"a": x, "b": y}, "batch 0")  # the same batch read again (the SAE's init sample)
    screen(x, "batch 1")
    assert screen.dropped == 3 and screen(torch.ones(2, 2), "batch 2").shape == (2, 2)
    with pytest.raises(ValueError, match="only non-finite"):
        screen(torch.full((2, 2), float("nan")), "batch 3")


def test_stage_needs_a_gpu() -> None:
    assert stage_budget(torch.device("cpu"), None) == 0 == stage_budget(torch.device("cpu"), False)
    with pytest.raises(ValueError, match="stage=True"):
        fit(
            SAEModule([SAESpec(n_features=32, k=2)]),
            SAEDataModule(acts(512), tokens=256, batch_size=128, stage=True),
        )


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA; CPU twin: test_nan_rows_are_counted_and_skipped"
)
def test_gpu_staged_array_trains_as_host_batches_and_drops_bad_rows_once() -> None:
    x = acts(2048)
    weights = []
    for stage in (None, False):
        L.seed_everything(0)
        module = SAEModule([SAESpec(n_features=32, k=2)], warmup_steps=2, cuda_graphs=False)
        datamodule = SAEDataModule(x, tokens=2 * 2048, batch_size=128, stage=stage)
        fit(module, datamodule, accelerator="gpu", precision="32-true")
        assert (datamodule._staged is not None and datamodule._staged[1].on_gpu) == (stage is None)
        weights.append(module.saes[0].W_dec.detach().cpu())
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-5, atol=1e-6)
    x[::10] = float("nan")  # 205 rows, dropped once when the array is staged, then two passes without them
    for data in (x, x.cuda()):  # copied to the GPU, or already there (screened only)
        module = SAEModule([SAESpec(n_features=32, k=2)], warmup_steps=2)
        with pytest.warns(UserWarning, match="non-finite"):
            fit(module, SAEDataModule(data, tokens=2 * 1792, batch_size=128), accelerator="gpu")
        assert (module.skipped_rows.item(), module.tokens_seen.item()) == (205, 2 * 1792)
        assert all(torch.isfinite(p).all() for p in module.parameters())


def test_huge_finite_rows_are_kept() -> None:
    # The fast screen (a row sum) overflows to inf on this finite row; the exact re-check must keep it.
    x = acts(8)
    x[2, :2] = 3e38
    x[5, 1] = float("nan")
    assert finite_rows_mask(x).tolist() == [True] * 5 + [False] + [True] * 2


# Triton runs on CPU tensors only in its interpreter, which conftest turns on where there is no CUDA.
TRITON_ON_CPU = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton on CPU tensors needs TRITON_INTERPRET=1; twin: [torch]",
)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=TRITON_ON_CPU)])
def test_resume_continues_exactly(tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Features die within these 16 steps: AuxK's host-side dead count must resume as it stood, or the
    # resumed run sizes AuxK differently and drifts (it did on the torch kernels, the CPU default).
    monkeypatch.setattr(kernels, "_BACKEND", backend)

    def run(ckpt_path: str | None) -> tuple[SAEModule, L.Trainer]:
        L.seed_everything(0)
        module = SAEModule(
            [SAESpec(n_features=32, k=2, options={"dead_tokens": 256, "aux_k": 8})], warmup_steps=3
        )
        datamodule = SAEDataModule(acts(2048), tokens=16 * 64, batch_size=64)
        return module, fit_checkpointed(module, datamodule, tmp_path / "ckpt", 8, ckpt_path)

    full, full_trainer = run(None)
    mid = tmp_path / "ckpt" / "epoch=0-step=8.ckpt"
    state = torch.load(mid, weights_only=True)  # no pickled objects anywhere in the checkpoint
    assert state["global_step"] == 8 and state["SAEDataModule"] == {"batches_done": 8}
    assert state["state_dict"]["clocks.0.tokens_since_fired"].max() > 0
    resumed, resumed_trainer = run(str(mid))
    assert resumed_trainer.global_step == full_trainer.global_step == 16
    assert resumed.tokens_seen.item() == full.tokens_seen.item() == 16 * 64
    for key, value in full.state_dict().items():  # weights, scale, dead-feature clocks
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
    opt_full = full_trainer.optimizers[0].state_dict()["state"]
    opt_resumed = resumed_trainer.optimizers[0].state_dict()["state"]
    for i in opt_full:
        torch.testing.assert_close(
            opt_resumed[i]["exp_avg_sq"], opt_full[i]["exp_avg_sq"], rtol=1e-5, atol=1e-9
        )


def test_validate_fvu_in_float64_on_held_out_rows() -> None:
    x = acts(1536, scale=3.0)
    datamodule = SAEDataModule(x, tokens=10 * 128, batch_size=128, val_tokens=512)
    module = SAEModule([SAESpec(n_features=32, k=2)], warmup_steps=2)
    trainer = fit(module, datamodule)
    (metrics,) = trainer.validate(module, datamodule=datamodule, verbose=False)
    val = x[-512:].double() * module.input_scale
    with torch.no_grad():
        x_hat = module.saes[0](val.float()).x_hat.double()
    expected = (val - x_hat).pow(2).sum() / (val - val.mean(0)).pow(2).sum()
    assert metrics["val/sae/fvu"] == pytest.approx(expected.item(), rel=1e-4)
    assert metrics["val/sae/l0"] <= 2


def test_ddp_two_cpu_processes_share_dead_counters(tmp_path: Path) -> None:
    """strategy='ddp' over gloo: one input scale and identical (all-reduced) dead-feature clocks per rank."""
    module = "SAEModule([SAESpec(n_features=64, k=1)], warmup_steps=2, init_batches=2)"
    rank0, rank1 = ddp_rank_states(tmp_path, module, tokens=12 * 64)
    assert rank0["tokens_seen"].item() == 12 * 64  # both ranks' tokens counted on each
    assert rank0["clocks.0.tokens_since_fired"].max() > 0  # with k=1 some features skip a step
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key


def test_store_smaller_than_a_batch_is_a_clear_error(tmp_path) -> None:
    from mmsae.datasets import RandomCrops, SkimagePhotos

    encoder = mmsae.get_encoder("timm:test_vit")
    store = mmsae.extract(
        encoder, RandomCrops(SkimagePhotos(), n=2), hooks=["norm"], out_dir=tmp_path, progress=False
    )
    with pytest.raises(ValueError, match="fewer tokens than one batch"):
        mmsae.train(store, sae="topk", n_features=32, k=4, tokens=4096, batch_size=1024)


FIXTURES = Path(__file__).parent / "fixtures"


def test_resumes_a_checkpoint_written_before_the_clocks_left_the_sae(tmp_path: Path) -> None:
    """tests/fixtures/legacy_trainer_step4.ckpt was written when the dead-feature clock was an SAE buffer
    (`saes.0.tokens_since_fired`); resumed now, the run reaches the state that code reached at step 8."""
    L.seed_everything(0)
    x = torch.randn(1024, 8)
    module = SAEModule(
        [SAESpec(n_features=16, k=2, options={"dead_tokens": 64})], warmup_steps=2, init_batches=2
    )
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, max_epochs=1
    )
    datamodule = SAEDataModule(x, tokens=8 * 32, batch_size=32)
    trainer.fit(
        module, datamodule=datamodule, ckpt_path=FIXTURES / "legacy_trainer_step4.ckpt", weights_only=True
    )
    assert trainer.global_step == 8
    expected = torch.load(FIXTURES / "legacy_trainer_step8_state.pt", weights_only=True)["state_dict"]
    got = {k.replace("clocks.0.", "saes.0."): v for k, v in module.state_dict().items()}
    assert set(got) == set(expected) | {
        "saes.0.count_in_force",
        "saes.0.count_taken",
    }  # absent in the old layout
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert "tokens_since_fired" not in module.folded_sae().state_dict()


def test_topk_without_k_on_a_small_dictionary_is_an_error() -> None:
    with pytest.raises(
        ValueError, match=r"default k=32 would keep 32 of n_features=32 .* pass k, e\.g\. k=2"
    ):
        mmsae.train(acts(256), sae="topk", n_features=32, tokens=128, batch_size=64)
    assert SAESpec(arch="topk", n_features=256).build(D, None, None).cfg.k == 32  # a sparse default stays
