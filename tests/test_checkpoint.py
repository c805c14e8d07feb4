"""Checkpoints: round trip, atomicity, corrupt/foreign files, Hub upload/cache, SAELens/sparsify import."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, constants
from safetensors.torch import save_file

import mmsae
from mmsae import checkpoint, fileio
from mmsae.convert import detect_format, from_saelens, from_sparsify
from mmsae.sae import build_sae, files

D, N = 8, 32


def tiny_topk():
    sae = build_sae("topk", D, N, k=4, hook="blocks.0", extra={"run": "t"})
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return sae


def assert_same_outputs(a, b, x: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(a(x).x_hat, b(x).x_hat)
        torch.testing.assert_close(a.encode_dense(x), b.encode_dense(x))


def test_round_trip_preserves_weights_config_and_buffers(tmp_path: Path) -> None:
    sae = tiny_topk()
    mmsae.save_sae(sae, tmp_path / "sae")
    loaded = mmsae.load_sae(tmp_path / "sae")
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    for name, t in sae.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], t)
    assert_same_outputs(sae, loaded, torch.randn(5, D))
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["cfg.json", "sae.safetensors"]


def drop_cfg_field(sae_dir: Path, name: str) -> None:
    """Make a saved SAE look as if written before the cfg.json field `name` existed."""
    cfg_file = sae_dir / "cfg.json"
    cfg = json.loads(cfg_file.read_text())
    del cfg[name]
    cfg_file.write_text(json.dumps(cfg))


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_batchtopk_checkpoint_without_score_loads_with_the_ranking_it_was_trained_with(
    tmp_path: Path, arch: str
) -> None:
    """cfg.json files from before `score` existed hold θ in activation units and kept no per-token cap: they
    must load as 'activation' without a cap; those from before `token_cap` existed (a 'cosine' score) load
    without a cap; new SAEs default to 'activation' with a cap and keep what they were saved with (a
    checkpoint of the former 'projection' default loads as 'projection')."""
    sae = build_sae(arch, D, N, k=4)
    assert (sae.cfg.score, sae.cfg.token_cap) == ("activation", 1.5)
    build_sae(arch, D, N, k=4, score="projection").save(tmp_path / "projection")
    assert mmsae.load_sae(tmp_path / "projection").cfg.score == "projection"
    sae.save(tmp_path / "new")
    build_sae(arch, D, N, k=4, score="cosine").save(tmp_path / "cosine")
    drop_cfg_field(tmp_path / "cosine", "token_cap")
    cfg = mmsae.load_sae(tmp_path / "cosine").cfg
    assert (cfg.score, cfg.token_cap) == ("cosine", None)
    drop_cfg_field(tmp_path / "new", "score")
    drop_cfg_field(tmp_path / "new", "token_cap")
    cfg = mmsae.load_sae(tmp_path / "new").cfg
    assert (cfg.score, cfg.token_cap) == ("activation", None)


def test_site_round_trips_and_old_cfg_json_defaults_to_output(tmp_path: Path) -> None:
    sae = build_sae("topk", D, N, k=4, hook="up_blocks.0.attentions.1", site="update")
    mmsae.save_sae(sae, tmp_path / "update")
    assert json.loads((tmp_path / "update" / "cfg.json").read_text())["site"] == "update"
    assert mmsae.load_sae(tmp_path / "update").cfg.site == "update"
    # A cfg.json written before the field existed: the SAE read block outputs.
    drop_cfg_field(tmp_path / "update", "site")
    assert mmsae.load_sae(tmp_path / "update").cfg.site == "output"
    with pytest.raises(ValueError, match="site='updates' must be 'output'"):
        build_sae("topk", D, N, k=4, site="updates")


def test_failed_weight_write_leaves_previous_checkpoint_and_no_temp_file(tmp_path, monkeypatch) -> None:
    old = tiny_topk()
    checkpoint.save_sae(old, tmp_path)
    before = (tmp_path / "sae.safetensors").read_bytes()

    def half_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(files, "save_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_sae(tiny_topk(), tmp_path)
    assert (tmp_path / "sae.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json", "sae.safetensors"]


def test_atomic_write_bytes_failure_keeps_old_file(tmp_path, monkeypatch) -> None:
    target = tmp_path / "cfg.json"
    checkpoint.atomic_write_bytes(target, b"old")

    def broken_fsync(fd):
        raise OSError("io error")

    monkeypatch.setattr(fileio.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="io error"):
        checkpoint.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["cfg.json"]


def test_truncated_or_corrupt_weights_give_clear_error(tmp_path: Path) -> None:
    checkpoint.save_sae(tiny_topk(), tmp_path)
    weights = tmp_path / "sae.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        checkpoint.load_sae(tmp_path)
    (tmp_path / "cfg.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        checkpoint.load_sae(tmp_path)


def test_missing_weights_and_shape_mismatch(tmp_path: Path) -> None:
    checkpoint.save_sae(tiny_topk(), tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "n_features": N * 2}))
    with pytest.raises(ValueError, match="shape"):
        checkpoint.load_sae(tmp_path)
    (tmp_path / "sae.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="needs both"):
        checkpoint.load_sae(tmp_path)


def test_foreign_cfg_json_is_rejected_with_guidance(tmp_path: Path) -> None:
    (tmp_path / "cfg.json").write_text(json.dumps({"hidden": 3}))
    with pytest.raises(ValueError, match="not an mmsae checkpoint"):
        checkpoint.load_sae(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({"arch": "topk", "d_in": 4, "n_features": 8, "bogus": 1}))
    with pytest.raises(ValueError, match="bogus"):
        checkpoint.load_sae(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({"arch": "nope", "d_in": 4, "n_features": 8}))
    with pytest.raises(ValueError, match="Unknown SAE architecture 'nope'"):
        checkpoint.load_sae(tmp_path)


class LocalHub(HfApi):
    """The two HfApi calls push_to_hub makes, writing into a local folder instead of the network."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def create_repo(self, repo_id, private=False, exist_ok=False, **kwargs):
        (self.root / repo_id).mkdir(parents=True, exist_ok=exist_ok)
        return f"local://{repo_id}"

    def upload_folder(self, repo_id, folder_path, path_in_repo="", commit_message="", **kwargs):
        dest = self.root / repo_id / path_in_repo
        dest.mkdir(parents=True, exist_ok=True)
        for f in Path(folder_path).iterdir():
            (dest / f.name).write_bytes(f.read_bytes())
        self.last_message = commit_message
        return f"local://{repo_id}/commit/1"


def test_push_to_hub_uploads_a_loadable_folder(tmp_path: Path) -> None:
    sae = tiny_topk()
    api = LocalHub(tmp_path)
    url = sae.push_to_hub("me/tiny-sae", subfolder="blocks.0", api=api)
    assert url == "local://me/tiny-sae/commit/1" and api.last_message == "Upload SAE with mmsae"
    assert_same_outputs(sae, mmsae.load_sae(tmp_path / "me/tiny-sae/blocks.0"), torch.randn(3, D))


def test_load_repo_id_from_offline_hf_cache(tmp_path, monkeypatch) -> None:
    sae = tiny_topk()
    commit = "a" * 40
    repo = tmp_path / "hub" / "models--owner--name"
    checkpoint.save_sae(sae, repo / "snapshots" / commit / "layer3")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)  # "owner/name" must not exist as a local path
    assert_same_outputs(sae, mmsae.load_sae("owner/name", subfolder="layer3"), torch.randn(3, D))
    with pytest.raises(FileNotFoundError, match="Offline"):
        mmsae.load_sae("owner/missing")


# ------------------------------------------------------------------------------------ SAELens
def saelens_reference(kind: str, cfg: dict, w: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens' inference formulas, written out: (feature acts [B, n], reconstruction [B, d])."""
    sae_in = x - w["b_dec"] * cfg.get("apply_b_dec_to_input", True)
    if kind == "gated":
        gate = (sae_in @ w["W_enc"] + w["b_gate"] > 0).float()
        acts = gate * (sae_in @ (w["W_enc"] * w["r_mag"].exp()) + w["b_mag"]).relu()
        return acts, acts @ w["W_dec"] + w["b_dec"]
    pre = sae_in @ w["W_enc"] + w["b_enc"]
    if kind == "standard":
        acts = pre.relu()
    elif kind == "jumprelu":
        acts = pre.relu() * (pre > w["threshold"])
    else:  # topk
        norms = w["W_dec"].norm(dim=-1)
        if cfg.get("rescale_acts_by_decoder_norm"):
            pre = pre * norms
        vals, idx = pre.topk(cfg["k"], dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        if cfg.get("rescale_acts_by_decoder_norm"):
            return acts, (acts / norms) @ w["W_dec"] + w["b_dec"]
    return acts, acts @ w["W_dec"] + w["b_dec"]


def write_saelens(path: Path, kind: str, cfg_extra: dict) -> tuple[dict, dict]:
    w = {"W_enc": torch.randn(D, N) / D**0.5, "W_dec": torch.randn(N, D) * 0.5, "b_dec": torch.randn(D) * 0.1}
    if kind == "gated":
        w.update(b_gate=torch.randn(N) * 0.1, b_mag=torch.randn(N) * 0.1, r_mag=torch.randn(N) * 0.1)
    else:
        w["b_enc"] = torch.randn(N) * 0.1
    if kind == "jumprelu":
        w["threshold"] = torch.rand(N) * 0.3
    cfg = {
        "architecture": kind,
        "d_in": D,
        "d_sae": N,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"model_name": "gpt2", "hook_name": "blocks.3.hook_resid_post"},
        **cfg_extra,
    }
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in w.items()}, path / "sae_weights.safetensors")
    (path / "cfg.json").write_text(json.dumps(cfg))
    return cfg, w


@pytest.mark.parametrize(
    "kind, extra",
    [
        ("standard", {}),
        ("standard", {"apply_b_dec_to_input": False}),
        ("topk", {"k": 5}),
        ("topk", {"k": 5, "rescale_acts_by_decoder_norm": True}),
        ("jumprelu", {}),
        ("gated", {"apply_b_dec_to_input": False}),
    ],
)
def test_from_saelens_matches_saelens_formulas(tmp_path: Path, kind: str, extra: dict) -> None:
    cfg, w = write_saelens(tmp_path, kind, extra)
    sae = from_saelens(tmp_path)
    x = torch.randn(16, D)
    acts, recon = saelens_reference(kind, cfg, w, x)
    with torch.no_grad():
        out = sae(x)
    torch.testing.assert_close(out.x_hat, recon, rtol=1e-4, atol=1e-5)
    if not cfg.get("rescale_acts_by_decoder_norm"):  # with rescaling only the products match
        torch.testing.assert_close(sae.encode_dense(x), acts, rtol=1e-4, atol=1e-5)
    assert sae.cfg.hook == "blocks.3.hook_resid_post" and sae.cfg.extra["converted_from"] == "saelens"
    assert (acts != 0).any()


def test_from_saelens_pre_6_config_and_norm_scaling(tmp_path: Path) -> None:
    _, w = write_saelens(tmp_path, "topk", {})
    legacy = {
        "d_in": D,
        "d_sae": N,
        "hook_point": "blocks.1.hook_resid_pre",
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 3},
        "normalize_activations": True,
    }
    (tmp_path / "cfg.json").write_text(json.dumps(legacy))
    with pytest.raises(ValueError, match="norm_scaling_factor"):
        from_saelens(tmp_path)
    scale = 2.5
    sae = from_saelens(tmp_path, norm_scaling_factor=scale)
    x = torch.randn(16, D)
    _, recon_scaled = saelens_reference("topk", {"k": 3}, w, x * scale)
    with torch.no_grad():
        torch.testing.assert_close(sae(x).x_hat, recon_scaled / scale, rtol=1e-4, atol=1e-5)
    assert sae.cfg.k == 3 and sae.cfg.hook == "blocks.1.hook_resid_pre"


def test_from_saelens_rejects_what_it_cannot_represent(tmp_path: Path) -> None:
    write_saelens(tmp_path / "cw", "standard", {"normalize_activations": "covariance_whitening"})
    with pytest.raises(ValueError, match="covariance_whitening"):
        from_saelens(tmp_path / "cw")
    write_saelens(tmp_path / "tc", "transcoder", {})
    with pytest.raises(ValueError, match="no mmsae equivalent"):
        from_saelens(tmp_path / "tc")


# ------------------------------------------------------------------------------------ sparsify
def write_sparsify(path: Path, **cfg_extra) -> dict:
    w = {
        "encoder.weight": torch.randn(N, D) / D**0.5,
        "encoder.bias": torch.randn(N) * 0.1,
        "W_dec": torch.nn.functional.normalize(torch.randn(N, D), dim=-1),
        "b_dec": torch.randn(D) * 0.1,
    }
    cfg = {
        "activation": "topk",
        "expansion_factor": N // D,
        "normalize_decoder": True,
        "num_latents": 0,
        "k": 4,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": D,
        **cfg_extra,
    }
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.bfloat16) for k, v in w.items()}, path / "sae.safetensors")
    (path / "cfg.json").write_text(json.dumps(cfg))
    return {k: v.to(torch.bfloat16).float() for k, v in w.items()}


def test_from_sparsify_matches_sparsify_formula(tmp_path: Path) -> None:
    w = write_sparsify(tmp_path / "run" / "layers.6")
    write_sparsify(tmp_path / "run" / "layers.7")
    with pytest.raises(ValueError, match=r"hookpoint=.*layers\.6"):
        from_sparsify(tmp_path / "run")
    sae = from_sparsify(tmp_path / "run", hookpoint="layers.6")
    x = torch.randn(16, D)
    # sparsify: top-k of relu(encoder(x − b_dec)), decode = Σ acts · W_dec[idx] + b_dec
    pre = torch.relu((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
    vals, idx = pre.topk(4, dim=-1)
    recon = torch.zeros(16, N).scatter(-1, idx, vals) @ w["W_dec"] + w["b_dec"]
    with torch.no_grad():
        torch.testing.assert_close(sae(x).x_hat, recon, rtol=1e-4, atol=1e-5)
    assert sae.cfg.n_features == N and sae.cfg.k == 4 and sae.cfg.hook == "layers.6"


def test_from_sparsify_rejects_unsupported_options(tmp_path: Path) -> None:
    write_sparsify(tmp_path, skip_connection=True)
    with pytest.raises(ValueError, match="skip_connection"):
        from_sparsify(tmp_path)


def test_load_sae_recognises_peer_folders(tmp_path: Path) -> None:
    write_saelens(tmp_path / "lens", "standard", {})
    write_sparsify(tmp_path / "sp" / "layers.0")
    checkpoint.save_sae(tiny_topk(), tmp_path / "ours")
    assert detect_format(tmp_path / "lens") == "saelens"
    assert detect_format(tmp_path / "sp") == detect_format(tmp_path / "sp" / "layers.0") == "sparsify"
    assert detect_format(tmp_path / "ours") == "mmsae"
    with pytest.raises(ValueError, match="from_saelens"):
        mmsae.load_sae(tmp_path / "lens")
    with pytest.raises(ValueError, match="from_sparsify"):
        mmsae.load_sae(tmp_path / "sp" / "layers.0")
    with pytest.raises(ValueError, match="from_sparsify"):
        mmsae.load_sae(tmp_path / "sp")


FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka", "jumprelu"])
def test_built_and_loaded_saes_are_in_eval_mode(tmp_path: Path, arch: str) -> None:
    built = build_sae(arch, D, N, k=4) if arch != "jumprelu" else build_sae(arch, D, N)
    assert not built.training
    built.save(tmp_path)
    assert not checkpoint.load_sae(tmp_path).training


def test_loaded_batchtopk_codes_of_a_token_do_not_depend_on_the_batch() -> None:
    """In training mode BatchTopK ranks the whole batch and moves θ; a loaded SAE must use θ instead."""
    sae = checkpoint.load_sae(FIXTURES / "legacy_batchtopk_sae")
    theta = sae.threshold.clone()
    torch.manual_seed(0)
    token = torch.randn(1, D)
    with torch.no_grad():
        alone = sae.encode(token)
        for others in (torch.randn(31, D), 10 * torch.randn(7, D), torch.zeros(3, D)):
            in_batch = sae.encode(torch.cat([token, others]))[:1]
            torch.testing.assert_close(in_batch, alone)  # GEMM rounding may differ with the batch size
            assert torch.equal(in_batch != 0, alone != 0)
    assert torch.equal(sae.threshold, theta)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_published_weights_hold_only_the_saes_own_tensors_and_old_files_load(
    tmp_path: Path, arch: str
) -> None:
    """The fixtures were written when the dead-feature clock (`tokens_since_fired`) was an SAE buffer."""
    from safetensors import safe_open

    old_dir = FIXTURES / f"legacy_{arch}_sae"
    with safe_open(str(old_dir / "sae.safetensors"), "pt") as f:
        old = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    assert "tokens_since_fired" in old
    sae = checkpoint.load_sae(old_dir)
    for name, t in sae.state_dict().items():
        assert torch.equal(t, old[name]), name
    sae.save(tmp_path)
    with safe_open(str(tmp_path / "sae.safetensors"), "pt") as f:
        own = {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"threshold"} if arch == "batchtopk" else set())
        assert set(f.keys()) == own


def test_unknown_tensors_in_weights_are_an_error(tmp_path: Path) -> None:
    sae = tiny_topk()
    sae.save(tmp_path)
    save_file({**sae.state_dict(), "surprise": torch.zeros(3)}, str(tmp_path / "sae.safetensors"))
    with pytest.raises(ValueError, match=r"sae.safetensors holds tensors \['surprise'\] unknown"):
        checkpoint.load_sae(tmp_path)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ({"k": "eight"}, r"cfg.json: field 'k' is 'eight' \(str\), but must be int \| None"),
        ({"n_features": 32.5}, r"cfg.json: field 'n_features' is 32.5 \(float\), but must be int"),
        ({"unit_norm_decoder": "yes"}, r"field 'unit_norm_decoder' is 'yes' \(str\), but must be bool"),
        ({"site": "input"}, r"field 'site' is 'input' \(str\), but must be one of 'output', 'update'"),
        ({"d_in": None}, r"cfg.json lacks the field\(s\) \['d_in'\]"),
        ({"k": 64}, r"cfg.json: k=64 must be in 1..n_features=32"),
    ],
)
def test_bad_cfg_json_names_the_file_and_field(tmp_path: Path, edit: dict, match: str) -> None:
    tiny_topk().save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg.update(edit)
    cfg = {k: v for k, v in cfg.items() if v is not None or k != "d_in"}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        checkpoint.load_sae(tmp_path)


def test_saved_sae_files_honour_the_umask(tmp_path: Path) -> None:
    """A shared group directory can read what save_sae writes (mkstemp alone makes 0600 files)."""
    old = os.umask(0o022)
    try:
        path = mmsae.save_sae(build_sae("topk", d_in=8, n_features=16, k=2), tmp_path / "sae")
    finally:
        os.umask(old)
    for name in ("cfg.json", "sae.safetensors"):
        assert (path / name).stat().st_mode & 0o777 == 0o644, name
