"""Per-latent feature statistics from one streaming pass of an SAE over activations.

Memory is O(n_latents · (top_k + hist_bins)) whatever the number of tokens: counts, sums and maxima
are running reductions, the top-k activating examples are merged batch by batch, and the
activation histogram has fixed log-spaced bins. The pass is resumable: `feature_stats` writes the
accumulator to a checkpoint every few batches and, given the same deterministic source, skips the
batches it has already seen.

Top-k examples are *examples* (meta['example_id']: an image, or a UNet sample), not tokens: an
example's value for latent j is its largest activation over its tokens, and the token (and, for
UNets, the timestep) where that maximum occurs is kept for patch heatmaps.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as st_save
from torch import Tensor
from tqdm.auto import tqdm

from mmsae.encoders.base import TokenActs
from mmsae.fileio import atomic_write_bytes
from mmsae.sae import SAE, Codes, SparseCodes

Batch = TokenActs | Tensor


@dataclass
class StatsConfig:
    top_k: int = 16
    """Top-activating examples kept per latent."""
    hist_bins: int = 64
    hist_log10_range: tuple[float, float] = (-4.0, 4.0)
    """Per-latent histogram of log10(activation) over firing tokens; values outside fall in the edge bins."""
    chunk_tokens: int | None = None
    """Tokens encoded at once (None: 16384 on a GPU, 2048 on the CPU, where the reference encoder holds a
    dense [chunk, n] pre-activation). Per-chunk work is O(chunk · k), so on a GPU bigger is faster."""

    def chunk_for(self, device: torch.device) -> int:
        if self.chunk_tokens is not None:
            if self.chunk_tokens < 1:
                raise ValueError(f"StatsConfig.chunk_tokens must be >= 1, got {self.chunk_tokens}.")
            return self.chunk_tokens
        return 16384 if device.type == "cuda" else 2048


@dataclass
class TopExamples:
    """Top-k examples of one latent, best first (fewer than k if it fired on fewer examples)."""

    values: np.ndarray
    example_ids: np.ndarray
    token_index: np.ndarray
    timestep: np.ndarray | None


class FeatureStats:
    """Running per-latent statistics; `update` with SAE codes, read the properties at any time."""

    _TENSORS = (
        "fire_count",
        "act_sum",
        "act_max",
        "hist",
        "top_values",
        "top_ids",
        "top_tokens",
        "top_timesteps",
        "sq_err",
        "x_sum",
        "x_sq",
        "l0_sum",
    )

    def __init__(
        self, n_latents: int, d_in: int, cfg: StatsConfig | None = None, device: str | torch.device = "cpu"
    ):
        self.cfg = cfg or StatsConfig()
        self.n_latents, self.d_in = n_latents, d_in
        n, k, dev = n_latents, self.cfg.top_k, torch.device(device)
        # Counts and sums in float64: 1e9 tokens must not round away single firings.
        self.fire_count = torch.zeros(n, dtype=torch.float64, device=dev)
        self.act_sum = torch.zeros(n, dtype=torch.float64, device=dev)
        self.act_max = torch.full((n,), -math.inf, dtype=torch.float32, device=dev)
        self.hist = torch.zeros(n, self.cfg.hist_bins, dtype=torch.float64, device=dev)
        self.top_values = torch.full((k, n), -math.inf, dtype=torch.float32, device=dev)
        self.top_ids = torch.full((k, n), -1, dtype=torch.long, device=dev)
        self.top_tokens = torch.full((k, n), -1, dtype=torch.long, device=dev)
        self.top_timesteps = torch.full((k, n), -1, dtype=torch.long, device=dev)
        # Reconstruction totals for FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖² and L0 (the summary report's axes).
        self.sq_err = torch.zeros((), dtype=torch.float64, device=dev)
        self.x_sum = torch.zeros(d_in, dtype=torch.float64, device=dev)
        self.x_sq = torch.zeros((), dtype=torch.float64, device=dev)
        self.l0_sum = torch.zeros((), dtype=torch.float64, device=dev)
        self.n_tokens = 0
        self.n_batches = 0
        self.has_timesteps = False

    # ------------------------------------------------------------------ accumulation
    @torch.inference_mode()
    def update(
        self,
        x_ND: Tensor,
        x_hat_ND: Tensor,
        codes: Codes,
        example_id: Tensor,
        token_index: Tensor,
        timestep: Tensor | None = None,
    ) -> None:
        """Add one chunk: inputs, reconstructions, codes ([N, n] dense or SparseCodes) and metadata [N].

        Everything is computed on the (token, latent, value) pairs, O(N·k) for sparse (TopK) codes, with
        fixed-size scatters and sorts: no boolean indexing, `unique` or `bincount`, whose output sizes
        depend on the data and so wait for the device on every chunk. Dense codes give their nonzero
        entries (one wait per chunk).
        """
        rows, lat, raw = _pairs(codes)
        active = raw != 0  # != rather than > so signed (AbsTopK) codes count as firing
        on = active.double()
        self.fire_count.index_add_(0, lat, on)
        self.act_sum.index_add_(0, lat, raw.double() * on)
        val = raw.masked_fill(~active, -math.inf)  # silent pairs never win a maximum
        self.act_max.scatter_reduce_(0, lat, val, "amax")
        self.l0_sum += on.sum()
        self._update_hist(lat, raw, on)
        x64 = x_ND.double()
        self.sq_err += (x64 - x_hat_ND.double()).pow(2).sum()
        self.x_sum += x64.sum(0)
        self.x_sq += x64.pow(2).sum()
        self.n_tokens += x_ND.shape[0]
        if timestep is not None:
            self.has_timesteps = True
        self._update_top(rows, lat, val, example_id.to(lat.device), token_index.to(lat.device), timestep)

    def _update_hist(self, lat: Tensor, val: Tensor, on: Tensor) -> None:
        lo, hi = self.cfg.hist_log10_range
        bins = self.cfg.hist_bins
        # Silent pairs (log10 0 = −inf) land in bin 0 with weight 0.
        b = ((val.abs().log10() - lo) / (hi - lo) * bins).floor().clamp(0, bins - 1).long()
        self.hist.view(-1).index_add_(0, lat * bins + b, on)

    def _update_top(
        self,
        rows: Tensor,
        lat: Tensor,
        val: Tensor,
        example_id: Tensor,
        token_index: Tensor,
        timestep: Tensor | None,
    ) -> None:
        """Merge the chunk's best k examples per latent into the running top k. `rows`, `lat`, `val`:
        one entry per (token, latent) pair, −inf where the latent is silent."""
        k, n = self.cfg.top_k, self.n_latents
        # 1. Per (example, latent), keep the pair with the largest value: sort by value, then (stably)
        #    by (latent, example); the first of each run is the example's maximum and its token.
        N = example_id.shape[0]
        pair_key = lat * N + _example_rank(example_id)[rows]
        perm = _group_then_descending(pair_key, val, n * N)
        key = pair_key[perm]
        first = torch.ones_like(key, dtype=torch.bool)
        first[1:] = key[1:] != key[:-1]
        best = val[perm].masked_fill(~first, -math.inf)
        # 2. Per latent, its pairs best first: the first k of each latent's run are the chunk's top k.
        order = _group_then_descending(lat[perm], best, n)
        sel = perm[order]
        lat_s, v_s = lat[sel], best[order]
        count = torch.zeros(n, dtype=torch.long, device=lat.device).index_add_(0, lat, torch.ones_like(lat))
        rank = torch.arange(lat.numel(), device=lat.device) - (count.cumsum(0) - count)[lat_s]
        slot = rank.clamp(max=k) * n + lat_s  # row k collects every pair past the k-th, and is dropped
        r = rows[sel]
        ts = timestep.to(lat.device)[r] if timestep is not None else torch.full_like(r, -1)
        chunk = [
            torch.full(((k + 1) * n,), fill, dtype=src.dtype, device=lat.device).scatter_(0, slot, src)
            for src, fill in ((v_s, -math.inf), (example_id[r], -1), (token_index[r], -1), (ts, -1))
        ]
        best_v, best_id, best_tok, best_ts = (t.view(k + 1, n)[:k] for t in chunk)
        # 3. Merge with the running top k; an example split across chunks may appear twice: keep only
        #    its best entry.
        cand_v = torch.cat([self.top_values, best_v])
        cand_id = torch.cat([self.top_ids, best_id.masked_fill(best_v == -math.inf, -1)])
        cand_tok = torch.cat([self.top_tokens, best_tok])
        cand_ts = torch.cat([self.top_timesteps, best_ts])
        cand_v = cand_v.masked_fill(_duplicates(cand_v, cand_id), -math.inf)
        top_v, top_i = cand_v.topk(k, dim=0)
        empty = top_v == -math.inf
        self.top_values = top_v
        self.top_ids = cand_id.gather(0, top_i).masked_fill(empty, -1)
        self.top_tokens = cand_tok.gather(0, top_i).masked_fill(empty, -1)
        self.top_timesteps = cand_ts.gather(0, top_i).masked_fill(empty, -1)

    # ------------------------------------------------------------------ results
    @property
    def frequency(self) -> Tensor:
        """Share of tokens on which each latent fired, [n]."""
        return (self.fire_count / max(self.n_tokens, 1)).float().cpu()

    @property
    def mean_activation(self) -> Tensor:
        """Mean activation over the tokens where the latent fired (0 for dead latents), [n]."""
        return (self.act_sum / self.fire_count.clamp_min(1)).float().cpu()

    @property
    def max_activation(self) -> Tensor:
        """Largest activation seen, [n]; 0 for latents that never fired."""
        m = self.act_max.cpu()
        return torch.where(self.fire_count.cpu() > 0, m, torch.zeros_like(m))

    @property
    def dead(self) -> Tensor:
        return (self.fire_count == 0).cpu()

    @property
    def fvu(self) -> float:
        total_var = self.x_sq - self.x_sum.pow(2).sum() / max(self.n_tokens, 1)
        return float(self.sq_err / total_var.clamp_min(1e-12))

    @property
    def l0(self) -> float:
        return float(self.l0_sum) / max(self.n_tokens, 1)

    def density_histogram(self, bins: int = 50) -> tuple[np.ndarray, np.ndarray, int]:
        """Histogram of log10(firing frequency) over live latents: (counts, edges, n_dead)."""
        freq = self.frequency.numpy()
        live = freq > 0
        lo = math.floor(np.log10(1 / max(self.n_tokens, 1)))
        counts, edges = np.histogram(np.log10(freq[live]), bins=bins, range=(lo, 0))
        return counts, edges, int((~live).sum())

    def activation_histogram(self, latent: int) -> tuple[np.ndarray, np.ndarray]:
        """Counts of log10(activation) over firing tokens for one latent: (counts, log10 edges)."""
        self._check_latent(latent)
        lo, hi = self.cfg.hist_log10_range
        return self.hist[latent].cpu().numpy(), np.linspace(lo, hi, self.cfg.hist_bins + 1)

    def top_examples(self, latent: int) -> TopExamples:
        self._check_latent(latent)
        keep = (self.top_ids[:, latent] >= 0).cpu().numpy()
        col = lambda t: t[:, latent].cpu().numpy()[keep]
        return TopExamples(
            col(self.top_values),
            col(self.top_ids),
            col(self.top_tokens),
            col(self.top_timesteps) if self.has_timesteps else None,
        )

    def _check_latent(self, latent: int) -> None:
        if not 0 <= latent < self.n_latents:
            raise IndexError(f"Latent {latent} is out of range for an SAE with {self.n_latents} latents.")

    # ------------------------------------------------------------------ persistence
    def state(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        tensors = {name: getattr(self, name).detach().cpu().contiguous() for name in self._TENSORS}
        meta = {
            "cfg": json.dumps(asdict(self.cfg)),
            "n_latents": str(self.n_latents),
            "d_in": str(self.d_in),
            "n_tokens": str(self.n_tokens),
            "n_batches": str(self.n_batches),
            "has_timesteps": str(int(self.has_timesteps)),
        }
        return tensors, meta

    def save(self, path: str | Path) -> None:
        """Atomic safetensors file (tensors + counters as metadata)."""
        tensors, meta = self.state()
        atomic_write_bytes(Path(path), st_save(tensors, metadata=meta))

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> FeatureStats:
        with safe_open(str(path), "pt", device=str(device)) as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is no dict)
        if "n_latents" not in meta:
            raise ValueError(f"{path} is not a FeatureStats file (no n_latents metadata).")
        cfg = json.loads(meta["cfg"])
        cfg["hist_log10_range"] = tuple(cfg["hist_log10_range"])
        stats = cls(int(meta["n_latents"]), int(meta["d_in"]), StatsConfig(**cfg), device=device)
        for name, t in tensors.items():
            setattr(stats, name, t)
        stats.n_tokens, stats.n_batches = int(meta["n_tokens"]), int(meta["n_batches"])
        stats.has_timesteps = meta["has_timesteps"] == "1"
        return stats


def _pairs(codes: Codes) -> tuple[Tensor, Tensor, Tensor]:
    """Flat (token row, latent id, float32 value) of SAE codes: all N·k pairs of sparse codes, without a
    device wait; the nonzero entries of dense [N, n] codes (one wait, which spares N·n-sized buffers)."""
    if isinstance(codes, SparseCodes):
        N, k = codes.values.shape
        rows = torch.arange(N, device=codes.values.device).repeat_interleave(k)
        return rows, codes.indices.reshape(-1), codes.values.reshape(-1).float()
    rows, lat = codes.nonzero(as_tuple=True)
    return rows, lat, codes[rows, lat].float()


def _group_then_descending(group: Tensor, val: Tensor, n_groups: int) -> Tensor:
    """The permutation sorting pairs by `group` (int, < n_groups), then by float32 `val`, largest first.

    One sort of an int64 key (group, then the value's bits mapped to a descending integer) where the
    groups fit in 31 bits, else two stable sorts."""
    if n_groups < 2**31:
        bits = val.float().view(torch.int32).long()
        ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # increases with the float value
        return (group * 2**32 + (2**31 - 1 - ordered)).argsort(stable=True)
    by_val = val.argsort(descending=True, stable=True)
    return by_val[group[by_val].argsort(stable=True)]


def _example_rank(example_id: Tensor) -> Tensor:
    """[N] → each token's example as a rank 0..N−1 (equal ids, equal ranks): `unique`'s inverse without
    its data-dependent output size."""
    ids_s, order = example_id.sort(stable=True)
    new = torch.ones_like(ids_s, dtype=torch.long)
    new[1:] = (ids_s[1:] != ids_s[:-1]).long()
    return torch.empty_like(new).scatter_(0, order, new.cumsum(0) - 1)


def _duplicates(values_Mn: Tensor, ids_Mn: Tensor) -> Tensor:
    """Bool [M, n]: entries whose example id already appears with a larger value in the same column."""
    by_value = values_Mn.argsort(dim=0, descending=True)
    ids_v = ids_Mn.gather(0, by_value)
    by_id = ids_v.argsort(dim=0, stable=True)  # stable: equal ids stay in descending-value order
    ids_s = ids_v.gather(0, by_id)
    dup_s = torch.zeros_like(ids_s, dtype=torch.bool)
    dup_s[1:] = (ids_s[1:] == ids_s[:-1]) & (ids_s[1:] >= 0)
    perm = by_value.gather(0, by_id)
    return torch.zeros_like(dup_s).scatter_(0, perm, dup_s)


def _as_token_acts(batch: Batch, offset: int) -> TokenActs:
    """Plain [N, D] tensors (e.g. from an activation store without metadata): one example per token."""
    if isinstance(batch, TokenActs):
        return batch
    if isinstance(batch, Tensor) and batch.ndim == 2:
        n = batch.shape[0]
        return TokenActs(
            batch,
            {
                "example_id": torch.arange(offset, offset + n),
                "token_index": torch.full((n,), -1, dtype=torch.long),
            },
        )
    raise TypeError(
        f"Expected TokenActs or an [N, D] tensor per batch, got {type(batch).__name__} "
        f"{tuple(getattr(batch, 'shape', ()))}."
    )


@torch.inference_mode()
def feature_stats(
    sae: SAE,
    batches: Iterable[Batch],
    cfg: StatsConfig | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 100,
    total: int | None = None,
) -> FeatureStats:
    """One pass of `sae` over `batches` (TokenActs from an encoder/store, or [N, D] tensors).

    Runs on the SAE's device (CUDA if the SAE is there), in the SAE's dtype (a bf16 SAE encodes in bf16
    with the fused kernels of `mmsae.kernels`); nothing waits for the device between checkpoints. With
    `checkpoint`, the accumulator is saved
    every `checkpoint_every` batches and at the end; rerunning with the same, deterministic
    `batches` resumes after the last saved batch.
    """
    cfg = cfg or StatsConfig()
    device = sae.W_dec.device
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and ckpt.exists():
        stats = FeatureStats.load(ckpt, device=device)
        if (stats.n_latents, stats.d_in) != (sae.n_latents, sae.d_in):
            raise ValueError(
                f"Checkpoint {ckpt} holds stats for n={stats.n_latents}, d={stats.d_in}, but the SAE "
                f"has n={sae.n_latents}, d={sae.d_in}: delete it or pass another checkpoint path."
            )
    else:
        stats = FeatureStats(sae.n_latents, sae.d_in, cfg, device=device)
    source: Iterator[Batch] = itertools.islice(iter(batches), stats.n_batches, None)
    remaining = None if total is None else max(total - stats.n_batches, 0)
    chunk = cfg.chunk_for(device)
    for batch in tqdm(source, total=remaining, desc="feature stats", unit="batch"):
        acts = _as_token_acts(batch, offset=stats.n_tokens)
        meta = {key: v.to(device) for key, v in acts.meta.items() if isinstance(v, Tensor)}
        acts_ND = acts.acts_ND.to(device=device, dtype=sae.W_dec.dtype)
        for s in range(0, acts_ND.shape[0], chunk):
            sl = slice(s, s + chunk)
            x = acts_ND[sl]
            out = sae(x)
            timestep = meta.get("timestep")
            stats.update(
                x,
                out.x_hat,
                out.codes,
                meta["example_id"][sl],
                meta["token_index"][sl],
                None if timestep is None else timestep[sl],
            )
        stats.n_batches += 1
        if ckpt is not None and stats.n_batches % checkpoint_every == 0:
            stats.save(ckpt)
    if ckpt is not None:
        stats.save(ckpt)
    return stats
