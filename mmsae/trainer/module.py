"""`SAEModule`: trains one SAE, or a sweep of SAEs on the same batch stream, with the TopK-family recipe.

Recipe (method notes): inputs scaled so E‖s·x‖ = √d, b_dec at the geometric median of the first batch,
Adam(0.9, 0.999) with one param group per SAE, linear warm-up then linear decay to 0 over the last 20%,
per-SAE grad clipping, decoder-parallel gradients removed before the step and atoms renormalised after.
The scale is folded into a *copy* of each SAE when it is written out, so the live SAE keeps training on s·x.

One step function (`SAEModule._step`) runs under Lightning's manual optimisation, eagerly or captured and
replayed as one CUDA graph (`mmsae.trainer.graphs`). Dead-feature clocks and the run's configuration are the
module's state (`mmsae.trainer.state`), saved in the Lightning checkpoint, not in the published SAEs.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from mmsae.checkpoint import save_sae
from mmsae.legacy_names import LegacyKwargsMeta, renamed_from, upgrade_run_config
from mmsae.metrics import l0_tensor
from mmsae.sae import SAE, build_sae, default_lr, fired_mask, get_sae_class, normalized_mse
from mmsae.sae.ranks import ddp_active
from mmsae.staging import RowScreen, finite_rows_mask
from mmsae.trainer.data import SAEDataModule, first_batches
from mmsae.trainer.finish import FinalCheckpoint
from mmsae.trainer.graphs import GraphedStep, graph_blocker, graphed_step_for_run
from mmsae.trainer.iterations import (
    as_batches,
    check_resumed_steps,
    check_steps_per_iteration,
    choose_steps_per_iteration,
    count_inner_step,
    count_replayed_step,
    run_steps,
)
from mmsae.trainer.logs import DeferredMetrics
from mmsae.trainer.optim import WarmupDecay, keeps_unit_rows, make_optimizer, restart_adam
from mmsae.trainer.state import DeadFeatureClock, check_resume, fit_to_run, run_config, upgrade_checkpoint


@renamed_from("n_features")
@dataclass
class SAESpec(metaclass=LegacyKwargsMeta):
    """One SAE of a run: architecture plus options."""

    arch: str = "topk"
    n_features: int = 4096
    k: int | None = None
    """Active features per token; None keeps the architecture's default (TopK family: 32) where that is at
    most an eighth of n_features, and is an error otherwise (it would make a nearly dense SAE)."""
    lr: float | None = None
    """None = default_lr(n_features, steps of the run, tokens per step): 2e-4 / √(n / 2¹⁴), raised up to 7×
    for short runs (more for batches above 4096 tokens), times the variant's `default_lr_scale` (AbsTopK:
    half, less in runs of more than 1,953 steps; archetypal: 4×, less for batches below 1024 tokens)."""
    name: str | None = None
    """Output folder name; None = the hook (single SAE) or '<arch>_n<n>_k<k>' (sweeps)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Further config fields of the architecture, e.g. {aux_k: 256, dead_tokens: 1000000}."""

    def build(self, d_in: int, hook: str | None, encoder: str | None) -> SAE:
        kwargs = dict(self.options)
        if self.k is not None:
            kwargs["k"] = self.k
        elif "k" not in kwargs:
            default_k = get_sae_class(self.arch).Config.k  # a dataclass default, read on the class
            if default_k is not None and 8 * default_k > self.n_features:
                raise ValueError(
                    f"No k given for the {self.arch!r} SAE, and its default k={default_k} would keep "
                    f"{default_k} of n_features={self.n_features} features per token (nearly dense): pass k, "
                    f"e.g. k={max(1, self.n_features // 16)}."
                )
        return build_sae(self.arch, d_in, self.n_features, hook=hook, encoder=encoder, **kwargs)

    def default_name(self, single: bool, hook: str | None) -> str:
        if self.name:
            return self.name
        if single:
            return hook or "sae"
        return f"{self.arch}_n{self.n_features}" + (f"_k{self.k}" if self.k is not None else "")


class SAEModule(L.LightningModule):
    """Train SAEs on activations from `SAEDataModule` (or any loader of [B, d] batches).

    Args:
        saes: the SAEs to train on one stream; default one TopK SAE.
        d_in: activation width; None reads it from the datamodule when the trainer starts.
        hook, encoder: provenance recorded in every SAE's cfg (e.g. 'visual.transformer.resblocks.8',
            'clip:ViT-B-32/openai'); None takes them from a training store, which also sets the site.
        warmup_steps: linear LR warm-up (capped at 10% of the run so short runs still train).
        decay_fraction: share of the run over which the LR decays linearly to 0.
        grad_clip: max grad norm, per SAE (a sweep member never clips another); None disables.
        normalize_inputs: scale inputs so E‖s·x‖ = √d (folded back into the saved weights).
        init_batches: batches used to estimate the input scale.
        out_dir: where SAEs are written (`<out_dir>/<name>/{cfg.json,sae.safetensors}`) with every
            checkpoint and at the end; None = `<log_dir>/saes` when logging, nothing when not.
        cuda_graphs: replay each training step as one CUDA graph (`mmsae.trainer.graphs`): None = wherever
            possible (one CUDA device, no fp16 loss scaling; a step that fails to capture runs eagerly with a
            warning), True = required (an error says what prevents it), False = never.
        steps_per_iteration: optimizer steps per Lightning loop iteration, on a block of that many batches of
            an `SAEDataModule`, trained the same (`mmsae.trainer.iterations`). None = per run: up to 16 with
            CUDA graphs, dividing the logging, checkpoint and max_steps periods, else 1; a resume keeps its
            checkpoint's. Callbacks' batch hooks run once per iteration.
    """

    def __init__(
        self,
        saes: list[SAESpec] | None = None,
        d_in: int | None = None,
        hook: str | None = None,
        encoder: str | None = None,
        warmup_steps: int = 1000,
        decay_fraction: float = 0.2,
        grad_clip: float | None = 1.0,
        normalize_inputs: bool = True,
        init_batches: int = 10,
        out_dir: str | None = None,
        cuda_graphs: bool | None = None,
        steps_per_iteration: int | None = None,
    ):
        super().__init__()
        check_steps_per_iteration(steps_per_iteration)
        self.specs = [s if isinstance(s, SAESpec) else SAESpec(**s) for s in (saes or [SAESpec()])]
        self.save_hyperparameters()
        # Plain dicts, so the Lightning checkpoint stays loadable with torch.load(weights_only=True).
        self.hparams["saes"] = [dataclasses.asdict(s) for s in self.specs]
        self.names = [s.default_name(len(self.specs) == 1, hook) for s in self.specs]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"SAE names {self.names} collide: give each sweep member a distinct `name`.")
        if not 0 <= decay_fraction <= 1:
            raise ValueError(f"decay_fraction={decay_fraction} must be in [0, 1].")
        self.hook, self.encoder = hook, encoder
        self.warmup_steps, self.decay_fraction, self.grad_clip = warmup_steps, decay_fraction, grad_clip
        self.normalize_inputs, self.init_batches, self.out_dir = normalize_inputs, init_batches, out_dir
        self.cuda_graphs, self.steps_per_iteration = cuda_graphs, steps_per_iteration
        self._steps_per_iteration = 1  # this run's (`_use_steps_per_iteration`)
        self._graphed: GraphedStep | None = None
        # One step function, run eagerly or replayed as a CUDA graph, drives Adam itself (`_step`).
        self.automatic_optimization = False
        self.saes = nn.ModuleList()
        self.clocks = nn.ModuleList()  # a dead-feature clock per SAE: training state, not the SAE's
        self.register_buffer("input_scale", torch.zeros((), dtype=torch.float64))  # 0 = not estimated yet
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.int64))
        self.register_buffer("skipped_rows", torch.zeros((), dtype=torch.int64))
        self._row_screen = RowScreen()  # for batches from loaders other than SAEDataModule
        self._dropped_counted = 0  # of the rows the screens dropped this run, those added to skipped_rows
        self._export_dir: Path | None = None
        self.data_provenance: dict[str, str] = {}  # what the training store records; see setup()
        if d_in is not None:
            self.configure_model(d_in)

    # ----------------------------------------------------------------- construction
    def configure_model(self, d_in: int | None = None) -> None:
        if len(self.saes):
            return
        if d_in is None:
            datamodule = getattr(self.trainer, "datamodule", None)
            if datamodule is None or not hasattr(datamodule, "d_in"):
                raise ValueError("SAEModule needs d_in: pass d_in=... or train with an SAEDataModule.")
            d_in = int(datamodule.d_in)
        for spec in self.specs:
            sae = spec.build(d_in, self.hook, self.encoder).train()  # SAEs are built for inference
            self._record_provenance(sae)
            self.saes.append(sae)
            self.clocks.append(DeadFeatureClock(sae.n_features, sae.cfg.dead_tokens))

    def setup(self, stage: str) -> None:
        # A store records what it holds (encoder, hook, site): SAEs trained on it inherit what this run was
        # not told. SAEs built in __init__ (d_in given) get it here, the others in configure_model, next.
        datamodule = getattr(self.trainer, "datamodule", None)
        self.data_provenance = datamodule.provenance() if isinstance(datamodule, SAEDataModule) else {}
        for sae in self.saes:
            self._record_provenance(sae)
        if isinstance(datamodule, SAEDataModule):
            # It screens its own batches: Lightning's identity hook, bound on this instance, so that Lightning
            # sees no module hook competing with the data module's.
            self.on_before_batch_transfer = super().on_before_batch_transfer
        else:
            self.__dict__.pop("on_before_batch_transfer", None)
        if stage == "fit":
            self._use_steps_per_iteration(self.steps_per_iteration)

    def _use_steps_per_iteration(self, requested: int | None) -> None:
        """Fix this run's steps per loop iteration (`mmsae.trainer.iterations`), before its loader is made."""
        datamodule = getattr(self.trainer, "datamodule", None)
        graphs = self.cuda_graphs is not False and self._graph_blocker() is None
        blocks = isinstance(datamodule, SAEDataModule)
        self._steps_per_iteration = choose_steps_per_iteration(requested, self.trainer, graphs, blocks)
        if blocks:  # the one loader that makes blocks
            datamodule.steps_per_iteration = self._steps_per_iteration

    def _record_provenance(self, sae: SAE) -> None:
        known, cfg = self.data_provenance, sae.cfg
        site = known.get("site", cfg.site)
        if cfg.site not in ("output", site):  # "output" is the default, so only an explicit option can clash
            raise ValueError(
                f"The SAE option site={cfg.site!r} contradicts the store, which holds {site!r} "
                "activations: drop the site option (the store records it)."
            )
        cfg.hook = cfg.hook or known.get("hook")
        cfg.encoder = cfg.encoder or known.get("encoder")
        cfg.site = site

    def configure_callbacks(self) -> list[L.Callback]:
        self._logs = DeferredMetrics(f"train/{self.names[0]}/fvu")  # the training metrics', for each run
        return [self._logs, FinalCheckpoint()]  # last.ckpt at the final step: a rerun trains nothing

    def configure_optimizers(self) -> dict[str, Any]:
        total = run_steps(self.trainer, self._steps_per_iteration)
        datamodule = getattr(self.trainer, "datamodule", None)
        batch = datamodule.batch_size if isinstance(datamodule, SAEDataModule) else None
        step_tokens = None if batch is None else batch * self.trainer.world_size
        lrs = [
            spec.lr
            or sae.default_lr_scale(total, step_tokens) * default_lr(spec.n_features, total, step_tokens)
            for spec, sae in zip(self.specs, self.saes, strict=True)
        ]
        # Clipping, and for plain unit-norm decoders the projection and renormalisation, are the optimizer's:
        # one Triton pass per weight on CUDA (`mmsae.trainer.optim`).
        optimizer = make_optimizer(list(self.saes), lrs, self.grad_clip)
        warmup = min(self.warmup_steps, max(1, total // 10))
        if warmup < self.warmup_steps:
            rank_zero_info(f"mmsae: warm-up shortened to {warmup} steps (10% of a {total}-step run).")
        schedule = WarmupDecay(total, warmup, int(self.decay_fraction * total))
        # The default dead windows and BatchTopK θ horizons, scaled to the run (its SAEs' cfgs record them).
        fit_to_run(self.saes, self.clocks, total, schedule.decay_steps, step_tokens)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------- data-dependent init
    def on_fit_start(self) -> None:
        # trainer.log_dir is a collective under DDP: resolve it on every rank, use it on rank 0.
        if self.out_dir is not None:
            self._export_dir = Path(self.out_dir)
        elif self.trainer.logger is not None:
            self._export_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "saes"

    def on_train_start(self) -> None:
        self._setup_graphs()
        if self.input_scale > 0:
            return  # restored from a checkpoint
        wanted = max(sae.init_sample_rows() for sae in self.saes)  # 0: the SAEs' init needs one batch
        batches = first_batches(self.trainer.train_dataloader, self.init_batches, wanted, self.device)
        if not batches:
            raise ValueError(
                "The training data yielded no batches: check the source is not empty and "
                "that tokens >= batch_size × devices."
            )
        # Rows a custom loader let through unscreened are dropped (and counted) in training, not here.
        sample = [b for b in (b[finite_rows_mask(b)] for b in batches) if len(b)]
        if not sample:
            raise ValueError(
                "The first training batches have only non-finite (NaN/Inf) activations: the "
                "data is corrupt (fp16 overflow in extraction?). Re-extract it in bf16/fp32."
            )
        d = sample[0].shape[-1]
        if self.normalize_inputs:
            norm_sum = sum(float(b.double().norm(dim=-1).sum()) for b in sample)
            n_rows = sum(len(b) for b in sample)
            stats = torch.tensor([norm_sum, n_rows], dtype=torch.float64, device=self.device)
            stats = self.trainer.strategy.reduce(stats, reduce_op="sum")  # one scale for all ranks
            self.input_scale.fill_(math.sqrt(d) / (stats[0] / stats[1]).item())
        else:
            self.input_scale.fill_(1.0)
        for sae in self.saes:  # the first batch, or the rows an SAE wants (all there are, if fewer)
            rows_ND = torch.cat(sample)[: sae.init_sample_rows()] if sae.init_sample_rows() else sample[0]
            sae.init_from_data(rows_ND.float() * self.input_scale.float())
            if ddp_active():
                for tensor in itertools.chain(sae.parameters(), sae.buffers()):
                    torch.distributed.broadcast(tensor.data, src=0)  # every rank starts from rank 0's init
        rank_zero_info(f"mmsae: input scale s = {self.input_scale.item():.4g} (E‖s·x‖ = √{d})")

    def on_before_batch_transfer(self, batch_BD: Tensor, dataloader_idx: int) -> Tensor:
        if isinstance(self.trainer.datamodule, SAEDataModule):
            return batch_BD  # screened by the data module, off this thread (and before any GPU staging)
        # Any other loader: screened here (on the host, before the copy, it costs no GPU sync).
        return self._row_screen(batch_BD, f"batch {self.trainer.global_step if self.training else -1}")

    def _count_dropped_rows(self) -> None:
        # Rows dropped so far (by the data module's screen or this module's) join the checkpointed count. Host
        # integers: a kernel is launched only when the count changed, never a sync.
        screen = getattr(self.trainer.datamodule, "screen", None)  # an SAEDataModule's
        dropped = self._row_screen.dropped + (screen.dropped if isinstance(screen, RowScreen) else 0)
        if dropped > self._dropped_counted:
            self.skipped_rows += dropped - self._dropped_counted
            self._dropped_counted = dropped

    # ----------------------------------------------------------------- training
    def training_step(self, batch: Tensor | list[Tensor], batch_idx: int) -> None:
        """One optimizer step per batch of this loop iteration (`steps_per_iteration` of them, or one)."""
        for i, batch_BD in enumerate(as_batches(batch)):
            if i:
                count_inner_step(self.trainer)
            self._train_step(batch_BD)

    def _train_step(self, batch_BD: Tensor) -> None:
        """One optimizer step, by `_step`: eagerly, or as a CUDA graph replay (`_setup_graphs`)."""
        self._count_dropped_rows()
        step = self.global_step
        for clock in self.clocks:
            if step % clock.count_every == 0:
                clock.refresh_count()  # host-side counts change here, outside any capture
        self._step_t.fill_(step)
        restart_adam(self.optimizers(), self.saes, step)  # between steps, as a replay needs
        # Lightning's log() costs ~1 ms of Python per metric: eagerly, metrics are made only on logging steps.
        log_now = step % self.trainer.log_every_n_steps == 0
        if self._graphed is None:
            logs = self._step(batch_BD, metrics=log_now)
        else:
            key = tuple(sae.loss_structure(clock.count()) for sae, clock in zip(self.saes, self.clocks))
            # Two graphs per structure: with the metrics (logging steps) and without (all the others).
            logs = self._graphed(batch_BD, key, metrics=log_now)
            if not self._graphed.ran_step_fn:
                count_replayed_step(self.optimizers())
            # Static outputs, which the next replay overwrites: `_log_train` copies them before it, in order.
        self.lr_schedulers().step()
        if log_now:
            self._log_train(logs)

    def _step(self, batch_BD: Tensor, metrics: bool = True) -> dict[str, Tensor]:
        """The training step: forward, backward, grad projection and clipping, Adam, atom renormalisation and
        dead clocks, with no host sync (so `GraphedStep` can capture it); returns the training metrics."""
        optimizer = self.optimizers()
        # Fresh gradients (in a capture: in the graph's pool, where every replay rewrites them). Zeroing
        # static ones instead cost a memset plus a read-add-write of every gradient: −13 % at d=4096.
        optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            total, fired, logs = self._losses(batch_BD, self._step_t, metrics)
        with torch.autocast(self.device.type, enabled=False):
            self.manual_backward(total)
            optimizer.step()  # after on_before_optimizer_step; clips, and keeps plain atoms unit norm
            for sae in self.saes:
                if not keeps_unit_rows(optimizer, sae):
                    sae.normalize_decoder()  # right after the step, before any callback sees the weights
            self._update_dead(fired, len(batch_BD))
        return logs

    def _autocast(self) -> AbstractContextManager:
        """Autocast as Lightning's precision plugin applies it, with its weight-cast cache off: cached casts
        made during a capture would outlive it."""
        if self.trainer.precision != "bf16-mixed":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False)

    def _losses(
        self,
        batch_BD: Tensor,
        step: int | Tensor,
        metrics: bool,
    ) -> tuple[Tensor, list[Tensor], dict[str, Tensor]]:
        """Summed loss of every SAE, the features each fired, and (if `metrics`) the training metrics."""
        x_BD = batch_BD.float() * self.input_scale.float()
        total = x_BD.new_zeros((), dtype=torch.float32)
        fired = []
        logs: dict[str, Tensor] = {}
        for name, sae, clock in zip(self.names, self.saes, self.clocks):
            out = sae(x_BD)
            loss_out = sae.loss(x_BD, out, step, dead=clock.dead())
            total = total + loss_out.loss.float()
            fired.append(fired_mask(out.codes, sae.n_features))
            if metrics:
                with torch.no_grad():
                    values = {
                        **loss_out.metrics,
                        "loss": loss_out.loss.float(),
                        "mse": (x_BD.float() - out.x_hat.float()).pow(2).mean(),
                        "fvu": normalized_mse(x_BD, out.x_hat),
                        "l0": l0_tensor(out.codes),
                        "dead_frac": clock.mask().float().mean(),
                    }
                logs.update({f"train/{name}/{k}": v.float() for k, v in values.items()})
        return total, fired, logs

    def _log_train(self, logs: dict[str, Tensor]) -> None:  # of the step just taken, with no host sync
        self._logs.record(self, logs | {"train/skipped_rows": self.skipped_rows}, self.global_step - 1)

    @torch.no_grad()
    def _update_dead(self, fired: list[Tensor], n_rows: int) -> None:
        """Advance each dead-feature clock by all ranks' tokens; a feature fired if it fired on any rank."""
        strategy = self.trainer.strategy
        fired_N = strategy.reduce(torch.cat(fired).float(), reduce_op="max").bool()
        # Made on the device (torch.full, not torch.tensor(n_rows, device=...): that is a blocking host→device
        # copy, a full stream sync every step) and never read back on the host.
        n_tokens = strategy.reduce(torch.full((), n_rows, device=self.device), reduce_op="sum")
        for clock, fired_n in zip(self.clocks, fired_N.split([s.n_features for s in self.saes])):
            clock.update(fired_n, n_tokens)
        self.tokens_seen += n_tokens

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        for sae in self.saes:  # the optimizer clips each SAE's group (`mmsae.trainer.optim`)
            if not keeps_unit_rows(optimizer, sae):
                sae.remove_parallel_grads()

    # ----------------------------------------------------------------- CUDA graphs
    def _graph_blocker(self) -> str | None:
        """Why this run cannot replay its steps as CUDA graphs (None: it can)."""
        return graph_blocker(self.trainer)

    def _setup_graphs(self) -> None:
        """Decide on CUDA graphs for this run (`cuda_graphs`: None = where possible, True = required)."""
        self._step_t = torch.zeros((), dtype=torch.int64, device=self.device)
        self._graphed = graphed_step_for_run(
            self._step, self.trainer, self.cuda_graphs, self._graph_blocker()
        )

    # ----------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        # float64 sums: FVU = Σ‖x − x̂‖² / (Σ‖x‖² − ‖Σx‖²/N) over all held-out tokens.
        self._val_x = torch.zeros(self.saes[0].d_in, dtype=torch.float64, device=self.device)
        self._val_sums = torch.zeros(2 + 2 * len(self.saes), dtype=torch.float64, device=self.device)

    def validation_step(self, batch_BD: Tensor, batch_idx: int) -> None:
        if self.trainer.sanity_checking:
            return  # runs before the input scale exists
        if self.input_scale == 0:
            raise ValueError("validate needs trained SAEs: pass --ckpt_path (a checkpoint of this run).")
        x_BD = batch_BD.float() * self.input_scale.float()
        x64_BD = x_BD.double()
        self._val_x += x64_BD.sum(0)
        self._val_sums[0] += len(x_BD)
        self._val_sums[1] += x64_BD.pow(2).sum()
        for i, sae in enumerate(self.saes):
            out = sae(x_BD)
            self._val_sums[2 + 2 * i] += (x64_BD - out.x_hat.double()).pow(2).sum()
            self._val_sums[3 + 2 * i] += l0_tensor(out.codes) * len(x_BD)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        strategy = self.trainer.strategy
        sum_x = strategy.reduce(self._val_x, reduce_op="sum")
        sums = strategy.reduce(self._val_sums, reduce_op="sum")
        n = sums[0].clamp_min(1)
        total_var = (sums[1] - sum_x.pow(2).sum() / n).clamp_min(1e-12)
        for i, name in enumerate(self.names):
            self.log(f"val/{name}/fvu", (sums[2 + 2 * i] / total_var).float())
            self.log(f"val/{name}/l0", (sums[3 + 2 * i] / n).float())

    # ----------------------------------------------------------------- output
    def folded_sae(self, index: int = 0) -> SAE:
        """A CPU fp32 copy of SAE `index` acting on raw activations (scale folded, provenance filled in)."""
        live = self.saes[index]
        live.cfg.training_tokens = int(self.tokens_seen)
        sae = type(live)(copy.deepcopy(live.cfg))
        sae.load_state_dict({k: v.detach().float().cpu() for k, v in live.state_dict().items()})
        scale = self.input_scale.item()
        sae.fold_input_scale(scale if scale > 0 else 1.0)
        return sae

    def export(self, out_dir: str | Path) -> list[Path]:
        """Write every SAE (scale folded) to `out_dir/<name>/`."""
        return [save_sae(self.folded_sae(i), Path(out_dir) / name) for i, name in enumerate(self.names)]

    def run_config(self) -> dict[str, Any]:
        """What this run trains: the module's settings and, from an `SAEDataModule`, the data budget."""
        config = run_config(dict(self.hparams))
        if len(self.saes):
            config["d_in"] = self.saes[0].d_in  # None in the hparams when the data module tells it
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        if isinstance(datamodule, SAEDataModule):
            config["data"] = {k: getattr(datamodule, k) for k in ("tokens", "batch_size", "seed")}
        return config

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["mmsae_run"] = self.run_config()
        # Lightning's loop progress in the checkpoint counts iterations of this many steps.
        checkpoint["mmsae_steps_per_iteration"] = self._steps_per_iteration
        if self._export_dir is not None and self.trainer.is_global_zero:
            self.export(self._export_dir)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Before Lightning loads the weights: another configuration is named, not a raw size mismatch.
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"  # validate may use other data
        if "mmsae_run" in checkpoint:  # runs of earlier versions: old key names
            checkpoint["mmsae_run"] = upgrade_run_config(checkpoint["mmsae_run"])
        if "hyper_parameters" in checkpoint:
            checkpoint["hyper_parameters"] = upgrade_run_config(checkpoint["hyper_parameters"])
        if "mmsae_run" in checkpoint and fitting:
            check_resume(checkpoint["mmsae_run"], self.run_config(), self.trainer.ckpt_path)
        saved = checkpoint.get("mmsae_steps_per_iteration", 1)  # earlier versions: one step per iteration
        if fitting and saved != self._steps_per_iteration:
            check_resumed_steps(saved, self.steps_per_iteration, self.trainer.ckpt_path)
            self._use_steps_per_iteration(saved)
        upgrade_checkpoint(checkpoint, len(self.saes))

    def on_train_end(self) -> None:
        if self._export_dir is not None and self.trainer.is_global_zero:
            paths = self.export(self._export_dir)
            rank_zero_info(f"mmsae: wrote {', '.join(map(str, paths))}")
