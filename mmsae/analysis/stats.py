"""Per-feature statistics from one streaming pass of an SAE over activations.

Memory is O(n_features · (top_k + hist_bins)) whatever the number of tokens: counts, sums and maxima
are running reductions, the top-k activating examples are merged batch by batch, and the
activation histogram has fixed log-spaced bins. The pass is resumable: `feature_stats` writes the
accumulator to a checkpoint every few batches and, given the same deterministic source, skips the
batches it has already seen.

Top-k examples are *examples* (meta['example_id']: an image, or a UNet sample), not tokens: an
example's value for feature j is its largest activation over its tokens, and the token (and, for
UNets, the timestep) where that maximum occurs is kept for patch heatmaps. Equal values rank the
example seen first (an earlier chunk, then the earlier token) and an example keeps the first token that
reached its maximum.
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
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save as st_save
from torch import Tensor
from tqdm.auto import tqdm

from mmsae import kernels
from mmsae.analysis.stats_ops import Pairs, pairs_of, sorted_pairs
from mmsae.encoders.base import TokenActs
from mmsae.fileio import atomic_write_bytes
from mmsae.kernels.candidates import check_encode
from mmsae.legacy_names import legacy_keys, legacy_kwargs, renamed_from
from mmsae.sae import SAE, Codes

Batch = TokenActs | Tensor


@dataclass
class StatsConfig:
    top_k: int = 16
    """Top-activating examples kept per feature."""
    hist_bins: int = 64
    hist_log10_range: tuple[float, float] = (-4.0, 4.0)
    """Per-feature histogram of log10(activation) over firing tokens; values outside fall in the edge bins."""
    chunk_tokens: int | None = None
    """Tokens encoded at once (None: 16384 on a GPU, 2048 on the CPU, where the reference encoder holds a
    dense [chunk, n] pre-activation). Per-chunk work is O(chunk · k), so on a GPU bigger is faster."""
    encode: str = "exact"
    """How TopK codes are computed: 'exact' (the SAE's encode), or 'fp8' (on Hopper GPUs: candidate groups
    from an e4m3 GEMM, re-scored exactly, `mmsae.kernels.fp8_encode`; the exact encode elsewhere). fp8
    finds the same features for all but ~0.001–0.1 % of (token, feature) pairs on real activations (fewer
    than the bf16 encode itself loses to rounding) and keeps the exact values of those it finds; its GEMM
    runs at about twice the bf16 rate."""

    def __post_init__(self) -> None:
        lo, hi = self.hist_log10_range
        if self.top_k < 1 or self.hist_bins < 1:
            raise ValueError(
                f"StatsConfig.top_k and hist_bins must be >= 1, got top_k={self.top_k}, "
                f"hist_bins={self.hist_bins}."
            )
        check_encode(self.encode, "StatsConfig.encode")
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(
                f"StatsConfig.hist_log10_range must be finite (low, high) with low < high, got {(lo, hi)}; "
                "e.g. (-4.0, 4.0) bins activations from 1e-4 to 1e4."
            )

    def chunk_for(self, device: torch.device) -> int:
        if self.chunk_tokens is not None:
            if self.chunk_tokens < 1:
                raise ValueError(f"StatsConfig.chunk_tokens must be >= 1, got {self.chunk_tokens}.")
            return self.chunk_tokens
        return 16384 if device.type == "cuda" else 2048


@dataclass
class TopExamples:
    """Top-k examples of one feature, best first (fewer than k if it fired on fewer examples)."""

    values: np.ndarray
    example_ids: np.ndarray
    token_index: np.ndarray
    timestep: np.ndarray | None


@renamed_from("n_features")
class FeatureStats:
    """Running per-feature statistics; `update` with SAE codes, read the properties at any time."""

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
        "x_shift",
    )

    @legacy_kwargs
    def __init__(
        self, n_features: int, d_in: int, cfg: StatsConfig | None = None, device: str | torch.device = "cpu"
    ):
        self.cfg = cfg or StatsConfig()
        self.n_features, self.d_in = n_features, d_in
        n, k, dev = n_features, self.cfg.top_k, torch.device(device)
        # Per-feature accumulators have one spare entry, n, where silent pairs land (see stats_ops); the
        # public tensors are views of the first n. Counts and sums in float64: 1e9 tokens must not round
        # away single firings.
        self._fire_ext = torch.zeros(n + 1, dtype=torch.float64, device=dev)
        self._sum_ext = torch.zeros(n + 1, dtype=torch.float64, device=dev)
        self._max_ext = torch.full((n + 1,), -math.inf, dtype=torch.float32, device=dev)
        self._hist_ext = torch.zeros(n + 1, self.cfg.hist_bins, dtype=torch.float64, device=dev)
        self.fire_count, self.act_sum = self._fire_ext[:n], self._sum_ext[:n]
        self.act_max, self.hist = self._max_ext[:n], self._hist_ext[:n]
        self.top_values = torch.full((k, n), -math.inf, dtype=torch.float32, device=dev)
        self._top_meta = torch.full((k, n, 3), -1, dtype=torch.long, device=dev)  # example, token, timestep
        # Reconstruction totals for FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖² (the summary report's axis), with x
        # shifted by the first chunk's mean (see `_update_fvu`).
        self.sq_err = torch.zeros((), dtype=torch.float64, device=dev)
        self.x_sum = torch.zeros(d_in, dtype=torch.float64, device=dev)
        self.x_sq = torch.zeros((), dtype=torch.float64, device=dev)
        self.x_shift = torch.zeros(d_in, dtype=torch.float32, device=dev)
        self.n_tokens = 0
        self.n_batches = 0
        self.has_timesteps = False
        self.split_examples = False
        """Whether an update may have shared an example with another (so top-k merges look for it twice)."""

    top_ids = property(lambda self: self._top_meta[..., 0])
    top_tokens = property(lambda self: self._top_meta[..., 1])
    top_timesteps = property(lambda self: self._top_meta[..., 2])

    @property
    def l0_sum(self) -> Tensor:
        return self.fire_count.sum()  # every firing pair counts once in both

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
        *,
        tokens_are_examples: bool = False,
    ) -> None:
        """Add one chunk: inputs, reconstructions, codes ([N, n] dense or SparseCodes) and metadata [N].

        `tokens_are_examples`: every token is an example of its own that no other update holds (plain
        [N, D] batches): while every update so far says so, the top-k merge skips its duplicate checks.

        Everything is computed on the (token, feature, value) pairs, O(N·k) for sparse (TopK) codes, with
        fixed-size scatters and sorts: no boolean indexing, `unique` or `bincount`, whose output sizes
        depend on the data and so wait for the device on every chunk. Dense codes give their nonzero
        entries (one wait per chunk).
        """
        pairs = pairs_of(codes)
        n = self.n_features
        # != rather than > so signed (AbsTopK) codes count as firing; silent pairs go to group n.
        grp = torch.where(pairs.raw != 0, pairs.lat, n)
        kernels.feature_sums_(
            grp,
            pairs.raw,
            self._fire_ext,
            self._sum_ext,
            self._max_ext,
            self._hist_ext,
            self.cfg.hist_log10_range,
        )
        self._update_fvu(x_ND, x_hat_ND)
        self.n_tokens += x_ND.shape[0]
        if timestep is not None:
            self.has_timesteps = True
        self.split_examples |= not tokens_are_examples
        cols = [example_id, token_index] + ([timestep] if timestep is not None else [])
        meta_N3 = F.pad(
            torch.stack([c.to(grp.device, torch.long) for c in cols], 1), (0, 3 - len(cols)), value=-1
        )
        self._update_top(pairs, grp, meta_N3)

    def _update_fvu(self, x_ND: Tensor, x_hat_ND: Tensor) -> None:
        """Σ(x − s), Σ‖x − s‖² and Σ‖x − x̂‖² in float32 per chunk, accumulated in float64.

        No float64 [N, d] temporaries. The shift s (the first chunk's mean) keeps the variance
        Σ‖x − s‖² − ‖Σ(x − s)‖²/N free of cancellation for inputs with a large mean (its float32 sums
        would otherwise lose digits in proportion to mean²/variance); float64 accumulation keeps chunks
        from adding up error.
        """
        if self.n_tokens == 0:
            self.x_shift.copy_(x_ND.mean(0, dtype=torch.float32))
        kernels.residual_sums_(x_ND, x_hat_ND, self.x_shift, self.x_sum, self.x_sq, self.sq_err)

    def _update_top(self, pairs: Pairs, grp: Tensor, meta_N3: Tensor) -> None:
        """Merge the chunk's pairs, sorted by (feature, value descending), into the running top k; while
        updates may share examples, an example keeps only its best entry per feature."""
        grp_M, v_M, row_M = sorted_pairs(pairs, grp, self.n_features + 1)
        kernels.merge_sorted_top_(
            self.top_values, self._top_meta, grp_M, v_M, row_M, meta_N3, distinct=self.split_examples
        )

    # ------------------------------------------------------------------ results
    @property
    def frequency(self) -> Tensor:
        """Share of tokens on which each feature fired, [n]."""
        return (self.fire_count / max(self.n_tokens, 1)).float().cpu()

    @property
    def mean_activation(self) -> Tensor:
        """Mean activation over the tokens where the feature fired (0 for dead features), [n]."""
        return (self.act_sum / self.fire_count.clamp_min(1)).float().cpu()

    @property
    def max_activation(self) -> Tensor:
        """Largest activation seen, [n]; 0 for features that never fired."""
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
        """Histogram of log10(firing frequency) over live features: (counts, edges, n_dead)."""
        freq = self.frequency.numpy()
        live = freq > 0
        lo = math.floor(np.log10(1 / max(self.n_tokens, 1)))
        counts, edges = np.histogram(np.log10(freq[live]), bins=bins, range=(lo, 0))
        return counts, edges, int((~live).sum())

    def activation_histogram(self, feature: int) -> tuple[np.ndarray, np.ndarray]:
        """Counts of log10(activation) over firing tokens for one feature: (counts, log10 edges)."""
        self._check_feature(feature)
        lo, hi = self.cfg.hist_log10_range
        return self.hist[feature].cpu().numpy(), np.linspace(lo, hi, self.cfg.hist_bins + 1)

    def top_examples(self, feature: int) -> TopExamples:
        self._check_feature(feature)
        keep = (self.top_ids[:, feature] >= 0).cpu().numpy()
        col = lambda t: t[:, feature].cpu().numpy()[keep]
        return TopExamples(
            col(self.top_values),
            col(self.top_ids),
            col(self.top_tokens),
            col(self.top_timesteps) if self.has_timesteps else None,
        )

    def _check_feature(self, feature: int) -> None:
        if not 0 <= feature < self.n_features:
            raise IndexError(f"Feature {feature} is out of range for an SAE with {self.n_features} features.")

    # ------------------------------------------------------------------ persistence
    def state(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        tensors = {name: getattr(self, name).detach().cpu().contiguous() for name in self._TENSORS}
        meta = {
            "cfg": json.dumps(asdict(self.cfg)),
            "n_features": str(self.n_features),
            "d_in": str(self.d_in),
            "n_tokens": str(self.n_tokens),
            "n_batches": str(self.n_batches),
            "has_timesteps": str(int(self.has_timesteps)),
            "split_examples": str(int(self.split_examples)),
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
        meta = legacy_keys(meta)  # files of earlier versions use the old key names
        if "n_features" not in meta:
            raise ValueError(f"{path} is not a FeatureStats file (no n_features metadata).")
        cfg = json.loads(meta["cfg"])
        cfg["hist_log10_range"] = tuple(cfg["hist_log10_range"])
        stats = cls(int(meta["n_features"]), int(meta["d_in"]), StatsConfig(**cfg), device=device)
        for name, t in tensors.items():
            if name != "l0_sum":  # derived from fire_count
                getattr(stats, name).copy_(t)  # (views of the accumulators)
        stats.n_tokens, stats.n_batches = int(meta["n_tokens"]), int(meta["n_batches"])
        stats.has_timesteps = meta["has_timesteps"] == "1"
        # Files without x_shift hold unshifted sums, which a zero shift continues; files from before
        # split_examples was recorded may hold split examples.
        stats.split_examples = meta.get("split_examples", "1") == "1"
        return stats


class SeenExamples:
    """Tells, on the host, batches whose tokens are each an example of its own that no other batch holds
    (activation stores with one token per image, e.g. tokens="cls": their example ids are on the host,
    strictly increasing): while every batch is such, `FeatureStats.update`'s top-k merge skips its duplicate
    checks.

    Only host-side ids are read (no wait for the device): a batch with ids on a device, or before which
    the ids seen are unknown (a resumed pass), makes every later batch take the general path."""

    def __init__(self, known: bool = True):
        self.last: int | None = -1 if known else None  # largest example id seen; None: unknown

    def one_token_each(self, example_id: Tensor) -> bool:
        if self.last is None or example_id.device.type != "cpu":
            self.last = None
            return False
        if len(example_id) == 0:
            return True
        ids = example_id.view(-1)
        fresh = bool(ids[0] > self.last) and bool((ids[1:] > ids[:-1]).all())
        self.last = max(self.last, int(ids.max()))
        return fresh


def _as_token_acts(
    batch: Batch, offset: int, device: torch.device, seen: SeenExamples
) -> tuple[TokenActs, bool]:
    """(TokenActs, whether each token is an example of its own that no other batch holds): plain [N, D]
    tensors (e.g. from an activation store without metadata) make one example per token, numbered from
    `offset`; TokenActs are when `seen` says so."""
    if isinstance(batch, TokenActs):
        return batch, seen.one_token_each(batch.meta["example_id"])
    if isinstance(batch, Tensor) and batch.ndim == 2:
        n = batch.shape[0]
        meta = {
            "example_id": torch.arange(offset, offset + n, device=device),
            "token_index": torch.full((n,), -1, dtype=torch.long, device=device),
        }
        if seen.last is not None:
            seen.last = max(seen.last, offset + n - 1)
        return TokenActs(batch, meta), True
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
    `checkpoint`, the accumulator is saved every `checkpoint_every` batches and at the end; rerunning with
    the same, deterministic `batches` resumes after the last saved batch. `cfg.encode="fp8"` encodes from
    fp8 candidates where the GPU path applies (`StatsConfig.encode`).
    """
    cfg = cfg or StatsConfig()
    device = sae.W_dec.device
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and ckpt.exists():
        stats = FeatureStats.load(ckpt, device=device)
        if (stats.n_features, stats.d_in) != (sae.n_features, sae.d_in):
            raise ValueError(
                f"Checkpoint {ckpt} holds stats for n={stats.n_features}, d={stats.d_in}, but the SAE "
                f"has n={sae.n_features}, d={sae.d_in}: delete it or pass another checkpoint path."
            )
    else:
        stats = FeatureStats(sae.n_features, sae.d_in, cfg, device=device)
    source: Iterator[Batch] = itertools.islice(iter(batches), stats.n_batches, None)
    remaining = None if total is None else max(total - stats.n_batches, 0)
    seen = SeenExamples(known=stats.n_batches == 0)
    chunk = cfg.chunk_for(device)
    with kernels.encoding(cfg.encode):
        for batch in tqdm(source, total=remaining, desc="feature stats", unit="batch"):
            acts, tokens_are_examples = _as_token_acts(batch, stats.n_tokens, device, seen)
            meta = {key: v.to(device) for key, v in acts.meta.items() if isinstance(v, Tensor)}
            acts_ND = acts.acts_ND.to(device=device, dtype=sae.W_dec.dtype)
            timestep = meta.get("timestep")
            for sl in (slice(s, s + chunk) for s in range(0, acts_ND.shape[0], chunk)):
                out = sae(acts_ND[sl])
                stats.update(
                    acts_ND[sl],
                    out.x_hat,
                    out.codes,
                    meta["example_id"][sl],
                    meta["token_index"][sl],
                    None if timestep is None else timestep[sl],
                    tokens_are_examples=tokens_are_examples,
                )
            stats.n_batches += 1
            if ckpt is not None and stats.n_batches % checkpoint_every == 0:
                stats.save(ckpt)
    if ckpt is not None:
        stats.save(ckpt)
    return stats
