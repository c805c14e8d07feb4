"""The `SAE` base class, its config, the (values, indices) code type and the registry.

Every variant is a small subclass: it sets `arch`, may extend `Config`, and implements the hook
`_encode` (`_forward` and `loss` where its forward or objective differs). Weights are `W_enc` (n×d),
`b_enc` (n), `W_dec` (n×d, rows are atoms) and `b_dec` (d), as in the method notes.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from torch import Tensor, nn

from mmsae import kernels
from mmsae.kernels.weight_copies import WeightCopies
from mmsae.legacy_names import LegacyKwargsMeta, legacy_kwargs, module_getattr, renamed_from
from mmsae.sae.files import push_to_hub, save_sae

REGISTRY: dict[str, type[SAE]] = {}
InputNorm = Literal["none", "layer_norm", "constant_norm_rescale"]
INPUT_NORMS: tuple[str, ...] = ("none", "layer_norm", "constant_norm_rescale")
LAYER_NORM_EPS = 1e-5
"""Added to σ on the way in only, as SAELens and SAeUron do (their outputs multiply by σ alone)."""


def register(name: str):
    """Class decorator: make an SAE variant constructible by name (`build_sae(name, ...)`)."""

    def deco(cls: type[SAE]) -> type[SAE]:
        if name in REGISTRY:
            raise ValueError(f"SAE architecture {name!r} is already registered by {REGISTRY[name].__name__}")
        cls.arch = name
        REGISTRY[name] = cls
        return cls

    return deco


def get_sae_class(name: str) -> type[SAE]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"Unknown SAE architecture {name!r}. Valid names: {', '.join(sorted(REGISTRY))}."
        ) from None


@renamed_from("n_features")
@dataclass
class SAEConfig(metaclass=LegacyKwargsMeta):
    """Fields shared by every variant; variants add theirs in a subclass.

    Everything here is written to `cfg.json` beside `sae.safetensors`.
    """

    d_in: int
    n_features: int
    k: int | None = None
    """Active features per token (TopK-style variants); None where sparsity comes from a penalty."""
    unit_norm_decoder: bool = True
    dead_tokens: int | None = None
    """A feature that has not fired for this many training tokens counts as dead (AuxK). None: the trainer's
    default, 10M tokens (Gao et al.) but at most a 64th of the run and at least 4 batches
    (`mmsae.trainer.state.default_dead_window`); the trained SAE's cfg records the window used."""
    hook: str | None = None
    encoder: str | None = None
    site: Literal["output", "update"] = "output"
    """What the SAE reads at `hook`: the module's output, or its update output − input (sdxl-unbox's
    UNet blocks), which an `Intervention` then edits as out′ = in + edit(out − in)."""
    normalization: str = "none"
    """How inputs were scaled in training. 'folded': the scale to E‖x‖=√d is folded into the weights."""
    input_norm: InputNorm = "none"
    """Per-token normalisation of the input, undone on the output (SAEs converted from libraries that
    train that way; see `SAE.normalize`). 'layer_norm': (x − μ)/(σ + 1e-5) with the token's mean μ and
    (unbiased) standard deviation σ, x̂ = x̂ₙ·σ + μ (SAELens `normalize_activations="layer_norm"`, SAeUron
    `input_unit_norm`). 'constant_norm_rescale': x·√d/‖x‖, x̂ = x̂ₙ·‖x‖/√d (SAELens). Unlike the global
    scale of `normalization`, it depends on each token, so it cannot be folded into the weights."""
    training_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance (data set fingerprint, run id, ...)."""
    LEGACY_DEFAULTS: ClassVar[dict[str, Any]] = {}
    """Values assumed for fields that a cfg.json written before they existed lacks, where the behaviour
    of that older version differs from the field's default for new SAEs."""

    def validate(self) -> None:
        if self.d_in <= 0 or self.n_features <= 0:
            raise ValueError(
                f"d_in and n_features must be positive, got d_in={self.d_in}, n={self.n_features}"
            )
        if self.k is not None and not 0 < self.k <= self.n_features:
            raise ValueError(
                f"k={self.k} must be in 1..n_features={self.n_features}: lower k or raise n_features."
            )
        if self.dead_tokens is not None and self.dead_tokens <= 0:
            raise ValueError(
                f"dead_tokens={self.dead_tokens} must be positive (tokens), or None (the trainer's default)."
            )
        if self.input_norm not in INPUT_NORMS:
            raise ValueError(f"input_norm={self.input_norm!r} must be one of {', '.join(INPUT_NORMS)}.")
        if self.site not in ("output", "update"):
            raise ValueError(
                f"site={self.site!r} must be 'output' (module outputs) or 'update' (output − input)."
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class SparseCodes(NamedTuple):
    """Codes of a TopK-style SAE: the `k` kept values per token and their feature indices."""

    values: Tensor  # [B, k]
    indices: Tensor  # [B, k] int64
    n_features: int

    def dense(self) -> Tensor:
        out = self.values.new_zeros(*self.values.shape[:-1], self.n_features)
        return out.scatter(-1, self.indices, self.values)


Codes = Tensor | SparseCodes


class SAEOutput(NamedTuple):
    x_hat: Tensor
    codes: Codes
    aux: dict[str, Tensor]


class NormStats(NamedTuple):
    """Per-token statistics of `SAE.normalize`: x̂ = x̂ₙ·scale + shift undoes it on an output."""

    scale: Tensor  # [..., 1]
    shift: Tensor | None  # [..., 1], None where the normalisation does not centre


class LossOutput(NamedTuple):
    loss: Tensor
    metrics: dict[str, Tensor]


class DeadFeatures(NamedTuple):
    """Which features a trainer counts as dead (it keeps the clocks; the SAE only reads this in `loss`)."""

    mask: Tensor
    """[n] bool, current."""
    count: int
    """Dead features on the host; may lag the mask by some steps, so reading it never syncs the GPU."""


def as_dense(codes: Codes) -> Tensor:
    return codes.dense() if isinstance(codes, SparseCodes) else codes


@legacy_kwargs
def fired_mask(codes: Codes, n_features: int) -> Tensor:
    """Bool [n]: which features were non-zero for at least one token of the batch."""
    if isinstance(codes, SparseCodes):
        # Count non-zero uses per feature: boolean-mask indexing (indices[values != 0]) would need its
        # size on the host, a full stream sync every training step.
        uses = torch.zeros(n_features, dtype=torch.int32, device=codes.values.device)
        return uses.index_add_(0, codes.indices.flatten(), (codes.values != 0).flatten().int()) > 0
    return (codes != 0).flatten(0, -2).any(0)


def normalized_mse(x: Tensor, x_hat: Tensor) -> Tensor:
    """‖x − x̂‖² / ‖x − x̄‖², batch means, in fp32 whatever the autocast dtype (Gao et al.); fused
    kernels on CUDA (`mmsae.kernels.normalized_mse`)."""
    return kernels.normalized_mse(x, x_hat)


@renamed_from("n_features")
class SAE(nn.Module):
    """Base sparse autoencoder: x̂ = decode(encode(x)).

    With per-token input normalisation (`cfg.input_norm`, SAEs converted from SAELens or SAeUron) the SAE
    works on xₙ = normalize(x): `encode(x)` takes raw activations and returns the codes of xₙ, `forward(x)`
    returns x̂ in the space of x, while `decode(codes)` returns the reconstruction x̂ₙ in the normalised
    space, because undoing the normalisation needs the token's statistics:

        x_n, stats = sae.normalize(x)
        x_hat = sae.denormalize(sae.decode(sae.encode(x)), stats)   # == sae(x).x_hat

    Without it (the default) normalize and denormalize are the identity.

    Subclasses implement `_encode` (and `_forward` where the forward differs): hooks on the SAE's own input
    xₙ, which the public `encode` and `forward` normalise around, so a new variant honours `cfg.input_norm`
    without doing anything itself. The base supplies the linear decoder, what training needs of the SAE
    itself (the objective, decoder normalisation, data init, input-scale folding) and checkpoint I/O. An SAE
    is its weights and its config: training state such as dead-feature clocks belongs to the trainer.
    """

    arch: ClassVar[str] = "base"
    Config: ClassVar[type[SAEConfig]] = SAEConfig
    fused_recon: ClassVar[bool] = False
    """Its loss takes the reconstruction term from `recon_loss`, so a training forward with sparse codes may
    compute it with the decoder (`kernels.decode_with_mse`: one pass, and a backward without a gather)."""
    dead_window_run_fraction: ClassVar[float | None] = None
    """Run share after which an idle feature is dead if `cfg.dead_tokens` is unset; None: the trainer's."""
    weight_copies: WeightCopies | None = None
    """The training optimizer's 16-bit copies of the weights (`Adam.weight_copies`), which the kernels then
    read instead of casting; set by the trainer, None outside training. Not part of the SAE's state."""

    @classmethod
    def default_lr_scale(cls, total_steps: int | None = None, batch_size: int | None = None) -> float:
        """Factor on `default_lr` when the trainer picks the lr (`lr=None`) for a run of `total_steps`
        optimizer steps of `batch_size` tokens (None: not known)."""
        return 1.0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # `encode` and `forward` are the entry points that apply cfg.input_norm around the variant's hooks: a
        # variant that replaced them would silently skip the normalisation of converted SAEs.
        super().__init_subclass__(**kwargs)
        replaced = [name for name in ("encode", "forward") if name in cls.__dict__]
        if replaced:
            raise TypeError(
                f"{cls.__name__} defines {' and '.join(replaced)}: SAE variants implement the hooks _encode "
                "(and _forward where their forward differs), which the base class's encode and forward call "
                "on the normalised input (cfg.input_norm). Rename the method(s) to _encode / _forward."
            )

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d, n = cfg.d_in, cfg.n_features
        W_dec = torch.randn(n, d)
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        self.W_enc = nn.Parameter(W_dec.clone())  # W_enc = W_decᵀ at init (stored n×d)
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.init_decoder(W_dec)
        # Inference mode unless a trainer says otherwise (Lightning calls .train() when fitting): in training
        # mode BatchTopK selects across the batch and moves its threshold, so a user's SAE must not be in it.
        self.eval()

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, **kwargs: Any) -> SAE:
        return cls(cls.Config(**kwargs))

    def init_decoder(self, atoms_ND: Tensor) -> None:
        """Register the dictionary as the `W_dec` parameter; variants that compute W_dec override this."""
        self.W_dec = nn.Parameter(atoms_ND)

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def n_features(self) -> int:
        return self.cfg.n_features

    # ----------------------------------------------------------------- forward path
    def check_input(self, x: Tensor) -> None:
        if x.shape[-1] != self.cfg.d_in:
            hook = f" (hook {self.cfg.hook!r})" if self.cfg.hook else ""
            raise ValueError(
                f"Input has d={x.shape[-1]} but this {self.arch} SAE{hook} expects d_in={self.cfg.d_in}: "
                "feed activations from the hook point the SAE was trained on."
            )
        if not x.is_floating_point():
            raise TypeError(f"SAE input must be a floating-point tensor, got {x.dtype}.")

    def normalize(self, x: Tensor) -> tuple[Tensor, NormStats]:
        """The input the SAE encodes, xₙ, and the per-token statistics that `denormalize` needs.

        Computed in fp32 whatever x's dtype. A zero token stays zero (the libraries divide by zero)."""
        mode = self.cfg.input_norm
        x32 = x.float()
        if mode == "layer_norm":
            mu = x32.mean(dim=-1, keepdim=True)
            centred = x32 - mu
            sigma = centred.std(dim=-1, keepdim=True)
            return (centred / (sigma + LAYER_NORM_EPS)).to(x.dtype), NormStats(sigma, mu)
        if mode == "constant_norm_rescale":
            coeff = self.cfg.d_in**0.5 / x32.norm(dim=-1, keepdim=True).clamp_min(1e-30)
            return (x32 * coeff).to(x.dtype), NormStats(1.0 / coeff, None)
        return x, NormStats(x32.new_ones(*x.shape[:-1], 1), None)

    def denormalize(self, y: Tensor, stats: NormStats) -> Tensor:
        """Undo `normalize` on an output y (a reconstruction x̂ₙ) of the tokens `stats` came from.

        It is affine per token, so a change Δ of y becomes scale·Δ: an edit's effect on x."""
        if self.cfg.input_norm == "none":
            return y
        out = y.float() * stats.scale
        return (out if stats.shift is None else out + stats.shift).to(y.dtype)

    def pre_acts(self, x: Tensor) -> Tensor:
        """W_enc (x − b_dec) + b_enc, [B, n], of the SAE's own input (xₙ under `cfg.input_norm`)."""
        return (x - self.b_dec) @ self.W_enc.T + self.b_enc

    def encode(self, x: Tensor, *args: Any, **kwargs: Any) -> Codes:
        """The codes of raw activations x: the variant's `_encode` of xₙ = normalize(x) (of x itself unless
        `cfg.input_norm`). Further arguments go to `_encode` (a hierarchical SAE's budget k)."""
        if self.cfg.input_norm != "none":
            self.check_input(x)
            x = self.normalize(x)[0]
        return self._encode(x, *args, **kwargs)

    def decode(self, codes: Codes) -> Tensor:
        """x̂ₙ = codes·W_dec + b_dec: the reconstruction of the input the SAE encodes (x itself unless
        `cfg.input_norm`; then `denormalize` it with the tokens' statistics)."""
        if isinstance(codes, SparseCodes):
            return kernels.sparse_decode(
                codes.values, codes.indices, self.W_dec, self.b_dec, self.weight_copies
            )
        return codes @ self.W_dec + self.b_dec

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> SAEOutput:
        """x̂ of raw activations x (in x's space), with the codes and the variant's aux terms: the variant's
        `_forward` of xₙ = normalize(x), its x̂ₙ denormalised. Without `cfg.input_norm` (every training run)
        it is `_forward(x)` and nothing more. Further arguments go to `_forward`."""
        self.check_input(x)
        if self.cfg.input_norm == "none":
            return self._forward(x, *args, **kwargs)
        x_n, stats = self.normalize(x)
        out = self._forward(x_n, *args, **kwargs)
        return out._replace(x_hat=self.denormalize(out.x_hat, stats))

    # Variant hooks: they work on the SAE's own input (xₙ under `cfg.input_norm`, already checked), so they
    # call each other and `pre_acts`, never `encode`/`forward`, which would normalise a second time.
    def _encode(self, x: Tensor) -> Codes:
        """The variant's codes of its own input."""
        raise NotImplementedError(f"{type(self).__name__} must implement _encode(x), its codes of x.")

    def _forward(self, x: Tensor) -> SAEOutput:
        """(x̂ₙ, codes, aux) of the SAE's own input: decode(_encode(x)), or in a training forward with sparse
        codes and `fused_recon` the decoder fused with the reconstruction loss. Variants whose loss needs
        more of the forward (pre-activations, gates) override it."""
        codes = self._encode(x)
        if (
            self.fused_recon
            and self.training
            and torch.is_grad_enabled()
            and isinstance(codes, SparseCodes)
            and x.dim() == 2
        ):
            x_hat, mse = kernels.decode_with_mse(
                codes.values, codes.indices, self.W_dec, self.b_dec, x, self.weight_copies
            )
            return SAEOutput(x_hat, codes, {"mse": mse})
        return SAEOutput(self.decode(codes), codes, {})

    def encode_dense(self, x: Tensor) -> Tensor:
        """Codes as a dense [B, n] tensor, whatever the variant returns natively."""
        return as_dense(self.encode(x))

    # ----------------------------------------------------------------- training
    def train(self, mode: bool = True) -> SAE:
        if mode and self.cfg.input_norm != "none":
            # Its losses compare x with x̂ₙ-space terms (gated, AuxK), and mmsae scales inputs globally.
            raise ValueError(
                f"This SAE normalises every token (input_norm={self.cfg.input_norm!r}), which mmsae uses "
                "for inference only: train with input_norm='none' (the trainer's normalization='folded' "
                "scales inputs globally)."
            )
        return super().train(mode)

    def loss(
        self, x: Tensor, out: SAEOutput, step: int | Tensor = 0, dead: DeadFeatures | None = None
    ) -> LossOutput:
        """Training objective; default is normalised MSE. `step` drives warm-ups; `dead` (from the trainer's
        clocks) feeds auxiliary losses on dead features, none when None.

        It must not read the GPU on the host: the trainer may capture it in a CUDA graph (tests/test_graphs.py
        checks every registered variant on a GPU)."""
        mse = self.recon_loss(x, out)
        return LossOutput(mse, {"mse": mse.detach()})

    def recon_loss(self, x: Tensor, out: SAEOutput) -> Tensor:
        """normalized_mse(x, out.x_hat), where `out = self(x)`: the forward's own when it computed it."""
        return out.aux["mse"] if "mse" in out.aux else normalized_mse(x, out.x_hat)

    def loss_structure(self, num_dead: int) -> Hashable:
        """The host-side choices `loss` makes for `num_dead` dead features (None: it makes none).

        A trainer that replays captured steps needs one capture per distinct value: it must change rarely."""
        return None

    def init_sample_rows(self) -> int:
        """Rows of training data `init_from_data` wants; 0: the trainer's first batch is enough."""
        return 0

    def fit_to_run(self, total_steps: int) -> None:
        """Set the variant's run-length defaults in its cfg once the trainer knows the run's length (ReLU's
        `target_l0` controller); none by default."""

    def adam_restart_step(self) -> int | None:
        """The step before which the trainer restarts Adam on this SAE's weights (`restart_adam`), or None."""
        return None

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        """Data-dependent init from a sample [N, d]: b_dec at the geometric median."""
        self.b_dec.copy_(geometric_median(x.float()).to(self.b_dec.dtype))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        if self.cfg.unit_norm_decoder:
            kernels.reference.normalize_rows_(self.W_dec)

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Project out the gradient component along each unit-norm atom (it would only change the norm)."""
        if not self.cfg.unit_norm_decoder or self.W_dec.grad is None:
            return
        kernels.reference.remove_parallel_rows_(self.W_dec, self.W_dec.grad)

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """The SAE was trained on s·x; rewrite it to act on raw x with identical codes.

        W_enc(s·x − b) = (s·W_enc)(x − b/s) and x̂ = (f W_dec + b)/s.
        """
        if scale == 1.0:
            return
        if self.W_enc is not None:  # encoder-free variants (matching pursuit) have no W_enc
            self.W_enc *= scale
        self.b_dec /= scale
        self.scale_dictionary(1.0 / scale)
        self.cfg.normalization = "folded"
        self.cfg.unit_norm_decoder = False  # atoms now have norm 1/s; do not renormalise them

    @torch.no_grad()
    def scale_dictionary(self, factor: float) -> None:
        """Multiply every atom by `factor`; variants with a computed W_dec scale its parts instead."""
        self.W_dec *= factor

    # ----------------------------------------------------------------- I/O
    # Loading is `mmsae.load_sae` (mmsae.checkpoint): it builds the class a file names, so it sits above
    # every variant; saving needs only this SAE and lives below (mmsae.sae.files).
    def save(self, path: str | os.PathLike) -> Path:
        """Write `path/cfg.json` + `path/sae.safetensors`; load them with `mmsae.load_sae(path)`."""
        return save_sae(self, path)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Upload cfg.json + sae.safetensors to the Hub (`subfolder=`, `private=`, …)."""
        return push_to_hub(self, repo_id, **kwargs)

    def extra_repr(self) -> str:
        k = f", k={self.cfg.k}" if self.cfg.k is not None else ""
        return f"arch={self.arch}, d_in={self.cfg.d_in}, n_features={self.cfg.n_features}{k}"


def linear_warmup(step: int | Tensor, warmup_steps: int) -> float | Tensor:
    """Factor rising linearly from 0 at step 0 to 1 at `warmup_steps` (1 throughout when it is 0).

    `step` may be a device tensor (a CUDA-graphed training step reads it on the GPU; a Python int would be
    frozen into the graph at capture).
    """
    if warmup_steps <= 0:
        return 1.0
    if isinstance(step, Tensor):
        return (step.float() / warmup_steps).clamp(max=1.0)
    return min(1.0, step / warmup_steps)


@legacy_kwargs
def build_sae(arch: str, d_in: int, n_features: int, **kwargs: Any) -> SAE:
    """Construct a registered SAE by name, e.g. `build_sae("topk", 768, 16384, k=32)`."""
    cls = get_sae_class(arch)
    names = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = set(kwargs) - names
    if unknown:
        raise TypeError(
            f"{arch!r} SAE has no option(s) {sorted(unknown)}; "
            f"valid options: {sorted(names - {'d_in', 'n_features'})}"
        )
    return cls(cls.Config(d_in=d_in, n_features=n_features, **kwargs))


@torch.no_grad()
def geometric_median(x: Tensor, iters: int = 100, eps: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising Σ‖x_i − m‖, robust to outlier tokens."""
    m = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=-1).clamp_min(eps)
        m_new = (w[:, None] * x).sum(0) / w.sum()
        if (m_new - m).norm() <= eps * max(1.0, m.norm().item()):
            return m_new
        m = m_new
    return m


__getattr__ = module_getattr(__name__)  # old public names (mmsae.legacy_names)
