"""`SAEModule`: trains one SAE, or a sweep of SAEs on the same batch stream, with the TopK-family recipe.

Recipe (method notes): inputs scaled so E‖s·x‖ = √d, b_dec at the geometric median of the first batch,
Adam(0.9, 0.999) with one param group per SAE, linear warm-up then linear decay to 0 over the last 20%,
per-SAE grad clipping, decoder-parallel gradients removed before the step and atoms renormalised after.
The scale is folded into a *copy* of each SAE when it is written out, so the live SAE keeps training on s·x.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from mmsae.checkpoint import save_sae
from mmsae.kernels.optim import Adam
from mmsae.metrics import l0_tensor
from mmsae.sae import SAE, build_sae, default_lr, fired_mask, normalized_mse
from mmsae.sae.base import DEAD_COUNT_EVERY
from mmsae.staging import RowScreen, finite_rows_mask
from mmsae.trainer.data import SAEDataModule
from mmsae.trainer.graphs import GraphedStep


@dataclass
class SAESpec:
    """One SAE of a run: architecture plus options."""

    arch: str = "topk"
    n_latents: int = 4096
    k: int | None = None
    """Active latents per token; None keeps the architecture's default."""
    lr: float | None = None
    """None = default_lr(n_latents, steps of the run): 2e-4 / √(n / 2¹⁴), raised up to 10× for short runs."""
    name: str | None = None
    """Output folder name; None = the hook (single SAE) or '<arch>_n<n>_k<k>' (sweeps)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Further config fields of the architecture, e.g. {aux_k: 256, dead_tokens: 1000000}."""

    def build(self, d_in: int, hook: str | None, encoder: str | None) -> SAE:
        kwargs = dict(self.options)
        if self.k is not None:
            kwargs["k"] = self.k
        return build_sae(self.arch, d_in, self.n_latents, hook=hook, encoder=encoder, **kwargs)

    def default_name(self, single: bool, hook: str | None) -> str:
        if self.name:
            return self.name
        if single:
            return hook or "sae"
        return f"{self.arch}_n{self.n_latents}" + (f"_k{self.k}" if self.k is not None else "")


@dataclass
class WarmupDecay:
    """LR factor: linear warm-up, flat, linear decay to 0 over the last `decay_steps`.

    A dataclass rather than a lambda so LambdaLR's state_dict (plain ints) is checkpointed weights-only safe.
    """

    total_steps: int
    warmup_steps: int
    decay_steps: int

    def __call__(self, step: int) -> float:
        warm = (step + 1) / max(1, self.warmup_steps)
        decay = (self.total_steps - step) / max(1, self.decay_steps)
        return max(0.0, min(1.0, warm, decay))


# SAEModule.on_before_batch_transfer makes Lightning warn that it overrides a DataModule hook of the
# same name; SAEDataModule defines none.
warnings.filterwarnings("ignore", message="You have overridden `on_before_batch_transfer`")
# A graphed step returns None on purpose: it ran its own backward and optimizer step.
warnings.filterwarnings("ignore", message="`training_step` returned `None`")


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
            possible (one CUDA device, no fp16 loss scaling, every SAE `graph_safe`), True = required (an
            error says what prevents it), False = never.
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
    ):
        super().__init__()
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
        self.cuda_graphs = cuda_graphs
        self._graphed: GraphedStep | None = None
        self.saes = nn.ModuleList()
        # Checkpointed state besides the SAEs (their dead-latent clocks are SAE buffers).
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
            sae = spec.build(d_in, self.hook, self.encoder)
            self._record_provenance(sae)
            self.saes.append(sae)

    def setup(self, stage: str) -> None:
        # A store records what it holds (encoder, hook, site): SAEs trained on it inherit what this run was
        # not told. SAEs built in __init__ (d_in given) get it here, the others in configure_model, next.
        datamodule = getattr(self.trainer, "datamodule", None)
        self.data_provenance = datamodule.provenance() if isinstance(datamodule, SAEDataModule) else {}
        for sae in self.saes:
            self._record_provenance(sae)

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

    def configure_optimizers(self) -> dict[str, Any]:
        total = int(self.trainer.estimated_stepping_batches)
        groups = [
            {"params": list(sae.parameters()), "lr": spec.lr or default_lr(spec.n_latents, total)}
            for spec, sae in zip(self.specs, self.saes)
        ]
        # torch's Adam with a Triton step on CUDA: one pass per weight that also writes the 16-bit weight
        # copies the next forward reads (`mmsae.kernels.optim`). Where that step does not apply, torch's
        # fused Adam on CUDA (bf16-mixed uses no grad scaler, so nothing stops it); CPU keeps the default.
        fused = all(p.is_cuda for g in groups for p in g["params"])
        optimizer = Adam(groups, betas=(0.9, 0.999), fused=fused or None)
        warmup = min(self.warmup_steps, max(1, total // 10))
        if warmup < self.warmup_steps:
            rank_zero_info(f"mmsae: warm-up shortened to {warmup} steps (10% of a {total}-step run).")
        schedule = WarmupDecay(total, warmup, int(self.decay_fraction * total))
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
        batches = [
            b.to(self.device)
            for b in itertools.islice(iter(self.trainer.train_dataloader), self.init_batches)
        ]
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
        first_BD = sample[0].float() * self.input_scale.float()
        for sae in self.saes:
            sae.init_from_data(first_BD)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.broadcast(sae.b_dec.data, src=0)  # every rank starts from rank 0's init
        rank_zero_info(f"mmsae: input scale s = {self.input_scale.item():.4g} (E‖s·x‖ = √{d})")

    def on_before_batch_transfer(self, batch_BD: Tensor, dataloader_idx: int) -> Tensor:
        if isinstance(self.trainer.datamodule, SAEDataModule):
            return batch_BD  # screened by the data module, off this thread (and before any GPU staging)
        # Any other loader: screened here (on the host, before the copy, it costs no GPU sync).
        return self._row_screen(batch_BD, f"batch {self.trainer.global_step if self.training else -1}")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Rows dropped so far (by the data module's screen or this module's) join the checkpointed count. Host
        # integers: a kernel is launched only when the count changed, never a sync.
        datamodule = self.trainer.datamodule
        dropped = self._row_screen.dropped + (
            datamodule.screen.dropped if isinstance(datamodule, SAEDataModule) else 0
        )
        if dropped > self._dropped_counted:
            self.skipped_rows += dropped - self._dropped_counted
            self._dropped_counted = dropped

    # ----------------------------------------------------------------- training
    def training_step(self, batch_BD: Tensor, batch_idx: int) -> Tensor | None:
        if self._graphed is not None:
            self._graphed_training_step(batch_BD)
            return None  # the step ran whole (backward and optimizer included); see optimizer_step
        # Lightning's log() costs ~1 ms of Python per metric: compute and log only on logging steps.
        log_now = self.global_step % self.trainer.log_every_n_steps == 0
        total, fired, logs = self._losses(batch_BD, self.global_step, metrics=log_now)
        self._update_dead(fired, len(batch_BD))
        if log_now:
            self._log_train(logs)
        return total

    def _losses(
        self,
        batch_BD: Tensor,
        step: int | Tensor,
        metrics: bool,
    ) -> tuple[Tensor, list[Tensor], dict[str, Tensor]]:
        """Summed loss of every SAE, the latents each fired, and (if `metrics`) the training metrics."""
        x_BD = batch_BD.float() * self.input_scale.float()
        total = x_BD.new_zeros((), dtype=torch.float32)
        fired = []
        logs: dict[str, Tensor] = {}
        for name, sae in zip(self.names, self.saes):
            out = sae(x_BD)
            loss_out = sae.loss(x_BD, out, step)
            total = total + loss_out.loss.float()
            fired.append(fired_mask(out.codes, sae.n_latents))
            if metrics:
                with torch.no_grad():
                    values = {
                        **loss_out.metrics,
                        "loss": loss_out.loss.float(),
                        "mse": (x_BD.float() - out.x_hat.float()).pow(2).mean(),
                        "fvu": normalized_mse(x_BD, out.x_hat),
                        "l0": l0_tensor(out.codes),
                        "dead_frac": sae.dead_mask().float().mean(),
                    }
                logs.update({f"train/{name}/{k}": v.float() for k, v in values.items()})
        return total, fired, logs

    def _log_train(self, logs: dict[str, Tensor]) -> None:
        logs["train/skipped_rows"] = self.skipped_rows.float()
        self.log_dict(logs, on_step=True, prog_bar=False)
        # A host tensor: Lightning converts progress-bar values with .item() on every step, even between
        # logging steps (a stream sync each time for a GPU tensor), and it makes a Python float a tensor on
        # the module's device.
        self.log("fvu", logs[f"train/{self.names[0]}/fvu"].cpu(), prog_bar=True, logger=False)

    @torch.no_grad()
    def _update_dead(self, fired: list[Tensor], n_rows: int) -> None:
        """Advance each dead-latent clock by all ranks' tokens; a latent fired if it fired on any rank."""
        strategy = self.trainer.strategy
        fired_N = strategy.reduce(torch.cat(fired).float(), reduce_op="max").bool()
        # Made on the device (torch.full, not torch.tensor(n_rows, device=...): that is a blocking host→device
        # copy, a full stream sync every step) and never read back on the host.
        n_tokens = strategy.reduce(torch.full((), n_rows, device=self.device), reduce_op="sum")
        for sae, fired_n in zip(self.saes, fired_N.split([s.n_latents for s in self.saes])):
            sae.update_dead(fired_n, n_tokens)
        self.tokens_seen += n_tokens

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        for sae in self.saes:
            sae.remove_parallel_grads()

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        if self.grad_clip:
            for sae in self.saes:
                nn.utils.clip_grad_norm_(sae.parameters(), self.grad_clip)

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None
    ) -> None:
        if self._graphed is not None:
            optimizer_closure()  # training_step runs the whole step; Lightning still counts it
            return
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # Right after the step, before any callback (ModelCheckpoint) sees the weights.
        for sae in self.saes:
            sae.normalize_decoder()

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        if self._graphed is None:  # a graphed step drops its gradients itself
            optimizer.zero_grad()

    # ----------------------------------------------------------------- CUDA graphs
    def _graph_blocker(self) -> str | None:
        """Why this run cannot replay its steps as CUDA graphs (None: it can)."""
        trainer = self.trainer
        if self.device.type != "cuda":
            return f"the SAEs are on {self.device.type}, not a CUDA device"
        if trainer.world_size > 1:
            return "DDP all-reduces gradients from hooks a graph cannot hold; graphs are single-device"
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return "fp16 loss scaling checks for inf on the host every step; use bf16-mixed or 32-true"
        if trainer.accumulate_grad_batches != 1:
            return "gradient accumulation splits the step"
        unsafe = sorted({sae.arch for sae in self.saes if not sae.graph_safe})
        if unsafe:
            return f"the {', '.join(unsafe)} SAE step reads the GPU on the host"
        return None

    def _setup_graphs(self) -> None:
        """Decide on CUDA graphs for this run (`cuda_graphs`: None = where possible, True = required)."""
        self._graphed = None
        if self.cuda_graphs is False:
            return
        blocker = self._graph_blocker()
        if blocker is not None:
            if self.cuda_graphs:
                raise ValueError(
                    f"cuda_graphs=True, but {blocker}. Pass cuda_graphs=None (use them where "
                    "possible) or False."
                )
            return
        if self.device.type == "cuda":
            for group in self.trainer.optimizers[0].param_groups:
                # Replays read the LR from a device tensor the scheduler fills in place; a float would be
                # frozen into the graph. Capturable Adam likewise keeps its step count on the device.
                group["lr"] = torch.tensor(float(group["lr"]), device=self.device)
                group["capturable"] = True
        # Autocast as Lightning's precision plugin applies it, with its weight-cast cache off: cached casts
        # made during a capture would outlive it.
        self._autocast_dtype = torch.bfloat16 if self.trainer.precision == "bf16-mixed" else None
        self._step_t = torch.zeros((), dtype=torch.int64, device=self.device)
        self._graphed = GraphedStep(self._full_step)

    def _graphed_training_step(self, batch_BD: Tensor) -> None:
        step = self.global_step
        if step % DEAD_COUNT_EVERY == 0:
            for sae in self.saes:
                sae.expire_dead_count()  # re-read here, outside any capture
        key = tuple(sae.step_structure() for sae in self.saes)
        self._step_t.fill_(step)
        outputs = self._graphed(batch_BD, key)
        if step % self.trainer.log_every_n_steps == 0:
            # Clones: the next replay overwrites the graph's outputs.
            self._log_train({k: v.clone() for k, v in outputs.items()})

    def _full_step(self, batch_BD: Tensor) -> dict[str, Tensor]:
        """Forward, backward, clipping, Adam, atom renormalisation and dead clocks, with no host sync;
        returns the training metrics.

        The same pieces as the eager path (training_step, then Lightning's backward and the hooks below);
        `GraphedStep` captures this function and replays it.
        """
        optimizer = self.trainer.optimizers[0]
        # Fresh gradients (in a capture: in the graph's pool, where every replay rewrites them). Zeroing
        # static ones instead cost a memset plus a read-add-write of every gradient: −13 % at d=4096.
        optimizer.zero_grad(set_to_none=True)
        device = self.device.type
        amp = (
            nullcontext()
            if self._autocast_dtype is None
            else torch.autocast(device, dtype=self._autocast_dtype, cache_enabled=False)
        )
        with amp:
            total, fired, logs = self._losses(batch_BD, self._step_t, metrics=True)
        with torch.autocast(device, enabled=False):
            total.backward()
            self.on_before_optimizer_step(optimizer)
            self.configure_gradient_clipping(optimizer)
            optimizer.step()
            for sae in self.saes:
                sae.normalize_decoder()
            self._update_dead(fired, len(batch_BD))
        return logs

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

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._export_dir is not None and self.trainer.is_global_zero:
            self.export(self._export_dir)

    def on_train_end(self) -> None:
        if self._export_dir is not None and self.trainer.is_global_zero:
            paths = self.export(self._export_dir)
            rank_zero_info(f"mmsae: wrote {', '.join(map(str, paths))}")
