"""Import SAEs saved by SAELens and EleutherAI's sparsify as mmsae SAEs with identical outputs.

On-disk formats:
- SAELens: `cfg.json` (architecture, d_in, d_sae, apply_b_dec_to_input, normalize_activations, k,
  rescale_acts_by_decoder_norm, metadata) + `sae_weights.safetensors` with W_enc [d, n], W_dec [n, d],
  b_enc, b_dec, and `threshold` (jumprelu) or `b_gate`/`b_mag`/`r_mag` (gated). Pre-6.0 configs
  name the hook `hook_point` and TopK as activation_fn_str="topk" + activation_fn_kwargs.k.
  Per-token `normalize_activations` ("layer_norm", "constant_norm_rescale") become the SAE's
  `input_norm`, applied at run time; "expected_average_only_in" is a global scale, folded in.
- sparsify: one folder per hookpoint with `cfg.json` (d_in, expansion_factor, num_latents, k,
  normalize_decoder, activation, skip_connection, transcode, ...) + `sae.safetensors` with
  encoder.weight [n, d], encoder.bias, W_dec [n, d], b_dec. SAeUron (a fork) adds `input_unit_norm`,
  the same per-token normalisation as SAELens' "layer_norm".
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file
from torch import Tensor

from mmsae.checkpoint import (  # detect_format is re-exported: mmsae.convert.detect_format
    CFG_NAME,
    SAELENS_WEIGHTS,
    WEIGHTS_NAME,
    detect_format,
    read_json,
    resolve_dir,
    sparsify_hookpoints,
)
from mmsae.sae.base import SAE, build_sae

SAEURON_UNET_PREFIX = "unet."
"""SAeUron names hookpoints by the pipeline's module path (`unet.up_blocks.1.attentions.1`)."""


def _load_weights(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the checkpoint folder is incomplete.")
    try:
        return {k: v.float() for k, v in load_file(path).items()}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(f"{path} is corrupt or truncated ({e}); re-download the SAE.") from e


def _require(state: dict[str, Tensor], names: list[str], source: Path, what: str) -> None:
    missing = [n for n in names if n not in state]
    if missing:
        raise ValueError(f"{source} lacks tensors {missing} needed for a {what} SAE (has {sorted(state)}).")


def _fill(sae: SAE, weights: dict[str, Tensor], device: str | torch.device) -> SAE:
    params = dict(sae.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            if params[name].shape != value.shape:
                raise ValueError(
                    f"Converted tensor {name!r} has shape {tuple(value.shape)}, "
                    f"the mmsae {sae.arch!r} SAE expects {tuple(params[name].shape)}."
                )
            params[name].copy_(value)
    return sae.to(device).eval()  # handed to users for inference: BatchTopK-style variants act per token


def _hook(given: str | None, recorded: str | None, source: Path) -> tuple[str, dict[str, str]]:
    """The hook an Intervention splices the SAE into: `given` (an mmsae encoder's module path) or the one
    the checkpoint records; the recorded name stays in the provenance when they differ."""
    if given is None and not recorded:
        raise ValueError(
            f"{source} records no hook point: pass hook='<module path>' (the encoder module whose output "
            "the SAE was trained on, e.g. 'visual.transformer.resblocks.10')."
        )
    hook = given if given is not None else str(recorded)
    return hook, ({"source_hook": recorded} if recorded and recorded != hook else {})


def _unit_norm(W_dec_ND: Tensor) -> bool:
    return bool(torch.allclose(W_dec_ND.norm(dim=-1), torch.ones(W_dec_ND.shape[0]), atol=1e-4))


# ---------------------------------------------------------------------------------------------- SAELens
SAELENS_ARCHS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated"}
SAELENS_NORMS = {
    "none": "none",
    "expected_average_only_in": "none",  # a global input scale: folded into the weights
    "layer_norm": "layer_norm",
    "constant_norm_rescale": "constant_norm_rescale",
}
"""SAELens normalize_activations → mmsae `input_norm` (per-token, applied by the SAE at run time)."""


def _saelens_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Bring a pre-6.0 SAELens config to the 6.x field names (as SAELens' own loader does)."""
    cfg = dict(cfg)
    cfg.setdefault("hook_name", cfg.get("hook_point"))
    cfg.setdefault("apply_b_dec_to_input", True)
    if cfg.get("normalize_activations") in (None, False):
        cfg["normalize_activations"] = "none"
    elif cfg["normalize_activations"] is True:
        cfg["normalize_activations"] = "expected_average_only_in"
    if "architecture" not in cfg:
        topk_k = (cfg.get("activation_fn_kwargs") or {}).get("k")
        is_topk = cfg.get("activation_fn_str") == "topk" and topk_k is not None
        cfg["architecture"] = "topk" if is_topk else "standard"
        if is_topk:
            cfg["k"] = topk_k
    return cfg


def _saelens_weights(cfg: dict[str, Any], path: Path, arch: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """mmsae weights (and options) computing what the SAELens SAE in `path` computes."""
    source = path / SAELENS_WEIGHTS
    state = _load_weights(source)
    scaling = state.pop("scaling_factor", None)
    if scaling is not None and not torch.allclose(scaling, torch.ones_like(scaling)):
        raise ValueError(f"{source} has a finetuning scaling_factor ≠ 1, which mmsae does not support.")
    enc_bias = "b_gate" if arch == "gated" else "b_enc"
    _require(state, ["W_enc", "W_dec", "b_dec", enc_bias], source, f"SAELens {arch}")
    W_enc_ND, W_dec_ND, b_dec_D = state["W_enc"].T.contiguous(), state["W_dec"], state["b_dec"]
    b_enc_N = state[enc_bias]
    # SAELens encodes (x − a·b_dec) with a = apply_b_dec_to_input; mmsae always subtracts b_dec,
    # so without it the encoder sees an extra +W_enc b_dec, folded into the encoder bias.
    shift_N = torch.zeros_like(b_enc_N) if cfg["apply_b_dec_to_input"] else W_enc_ND @ b_dec_D
    weights = {"W_enc": W_enc_ND, "W_dec": W_dec_ND, "b_dec": b_dec_D, "b_enc": b_enc_N + shift_N}
    options: dict[str, Any] = {}
    if arch == "topk":
        options["k"] = int(cfg["k"])
        if cfg.get("rescale_acts_by_decoder_norm", False):
            # topk(z ⊙ ‖W_dec‖) then decode with atoms / ‖W_dec‖: fold the norms into the encoder.
            norms_N = W_dec_ND.norm(dim=-1).clamp_min(1e-8)
            weights.update(
                W_enc=W_enc_ND * norms_N[:, None],
                b_enc=weights["b_enc"] * norms_N,
                W_dec=W_dec_ND / norms_N[:, None],
            )
    elif arch == "jumprelu":
        theta_N = state["threshold"] if "threshold" in state else state["log_threshold"].exp()
        # SAELens computes relu(z)·1[z > θ]; with θ > 0 that is mmsae's z·1[z > θ].
        weights["threshold"] = theta_N.clamp_min(1e-6)
    elif arch == "gated":
        _require(state, ["b_mag", "r_mag"], source, "SAELens gated")
        weights.update(r_mag=state["r_mag"], b_mag=state["b_mag"] + state["r_mag"].exp() * shift_N)
    return weights, options


def from_saelens(
    path_or_repo: str | os.PathLike,
    device: str | torch.device = "cpu",
    norm_scaling_factor: float | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
    hook: str | None = None,
    encoder: str | None = None,
) -> SAE:
    """Load a SAELens SAE folder (local, or a Hub repo + subfolder) as an equivalent mmsae SAE.

    `hook`: the module path an Intervention splices it into; default: the cfg's `hook_name` (a
    TransformerLens name for language-model SAEs: pass the matching module path of your encoder).
    `encoder`: the mmsae encoder id it pairs with (default: the cfg's `model_name`).

    `norm_scaling_factor`: for SAEs trained with normalize_activations="expected_average_only_in"
    SAELens keeps the input scale outside the checkpoint (in its release table); pass it here and it
    is folded into the weights, so the mmsae SAE acts on raw activations.
    """
    path = resolve_dir(path_or_repo, revision, subfolder)
    cfg = _saelens_config(read_json(path / CFG_NAME))
    arch = cfg["architecture"]
    if arch not in SAELENS_ARCHS:
        raise ValueError(
            f"SAELens architecture {arch!r} has no mmsae equivalent; supported: {sorted(SAELENS_ARCHS)}."
        )
    norm = cfg["normalize_activations"]
    if norm == "covariance_whitening":
        # Global and affine, so foldable, but its mean and whitening matrix are not in the SAE folder:
        # SAELens folds them into the weights when training ends (and saves "none"), so a folder that
        # still says covariance_whitening is a mid-training checkpoint whose statistics are in the
        # trainer's activation-scaler file.
        raise ValueError(
            f"{path / CFG_NAME}: normalize_activations='covariance_whitening' needs whitening statistics "
            "that the SAE folder does not hold: fold them in with SAELens (sae.fold_activation_whitening"
            "(mean, matrix, inverse_matrix) from the run's activation scaler), save, and convert that."
        )
    if norm not in SAELENS_NORMS:
        raise ValueError(
            f"{path / CFG_NAME}: SAELens normalize_activations={norm!r} is unknown; supported: "
            f"{sorted(SAELENS_NORMS)}."
        )
    if norm == "expected_average_only_in" and norm_scaling_factor is None:
        raise ValueError(
            "This SAELens SAE was trained on rescaled inputs (normalize_activations="
            "'expected_average_only_in'): pass norm_scaling_factor= (from its release table)."
        )

    weights, options = _saelens_weights(cfg, path, arch)
    n_features, d_in = weights["W_dec"].shape
    meta = cfg.get("metadata") or {}
    hook, provenance = _hook(hook, meta.get("hook_name") or cfg.get("hook_name"), path / CFG_NAME)
    sae = build_sae(
        SAELENS_ARCHS[arch],
        d_in,
        n_features,
        unit_norm_decoder=_unit_norm(weights["W_dec"]),
        input_norm=SAELENS_NORMS[norm],
        hook=hook,
        encoder=encoder or meta.get("model_name") or cfg.get("model_name"),
        extra={"converted_from": "saelens", "source": str(path_or_repo), "saelens_architecture": arch}
        | provenance,
        **options,
    )
    _fill(sae, weights, device)
    if norm_scaling_factor is not None and norm == "expected_average_only_in":
        sae.fold_input_scale(norm_scaling_factor)
    return sae


# ---------------------------------------------------------------------------------------------- sparsify
def from_sparsify(
    path_or_repo: str | os.PathLike,
    hookpoint: str | None = None,
    device: str | torch.device = "cpu",
    revision: str | None = None,
    hook: str | None = None,
    site: Literal["output", "update"] = "output",
) -> SAE:
    """Load one sparsify SAE (or one of SAeUron's, a sparsify fork): a hookpoint folder, or a run folder /
    Hub repo plus `hookpoint`.

    `hook`: the module path an Intervention splices it into; default: the hookpoint (the folder's name),
    less the `unet.` prefix of SAeUron's pipeline-level names, which mmsae's UNet encoder leaves out.
    `site`: "update" for an SAE trained on a block's output − input (SAeUron's `output_or_diff="diff"`,
    which its cfg.json does not record); the default reads the module's output.
    """
    path = resolve_dir(path_or_repo, revision, hookpoint)
    if not (path / CFG_NAME).is_file():
        hooks = sparsify_hookpoints(path)
        if hooks:
            raise ValueError(f"{path} holds several sparsify SAEs; pick one with hookpoint=, one of {hooks}.")
        raise FileNotFoundError(f"No {CFG_NAME} in {path}: not a sparsify SAE folder.")
    cfg = read_json(path / CFG_NAME)
    if "d_in" not in cfg:
        raise ValueError(f"{path / CFG_NAME} has no 'd_in': not a sparsify SparseCoder config.")
    unsupported = {key: cfg[key] for key in ("skip_connection", "transcode") if cfg.get(key)}
    if cfg.get("activation", "topk") != "topk":
        unsupported["activation"] = cfg["activation"]
    if unsupported:
        raise ValueError(
            f"{path / CFG_NAME}: options {unsupported} have no mmsae equivalent; only TopK SAEs convert."
        )
    d_in = int(cfg["d_in"])
    n = int(cfg.get("num_latents") or d_in * cfg["expansion_factor"])

    source = path / WEIGHTS_NAME
    state = _load_weights(source)
    _require(state, ["encoder.weight", "encoder.bias", "W_dec", "b_dec"], source, "sparsify")
    # sparsify: relu(encoder(x − b_dec)) then top-k; relu and top-k commute, as in mmsae's TopK.
    weights = {
        "W_enc": state["encoder.weight"],
        "b_enc": state["encoder.bias"],
        "W_dec": state["W_dec"],
        "b_dec": state["b_dec"],
    }
    recorded = hookpoint or path.name
    if hook is None and recorded.startswith(SAEURON_UNET_PREFIX):
        hook = recorded.removeprefix(SAEURON_UNET_PREFIX)
    hook, provenance = _hook(hook, recorded, path)
    # SAeUron's batch_topk / sample_topk are training-time selections: its loader turns them off.
    sae = build_sae(
        "topk",
        d_in,
        n,
        k=int(cfg["k"]),
        unit_norm_decoder=bool(cfg.get("normalize_decoder", True)),
        # SAeUron's input_unit_norm: (x − μ)/(σ + 1e-5) per token, x̂ₙ·σ + μ on the way out.
        input_norm="layer_norm" if cfg.get("input_unit_norm") else "none",
        hook=hook,
        site=site,
        extra={"converted_from": "sparsify", "source": str(path_or_repo)} | provenance,
    )
    return _fill(sae, weights, device)


__all__ = ["SAELENS_ARCHS", "detect_format", "from_saelens", "from_sparsify", "sparsify_hookpoints"]
