"""The "latent" → "feature" rename keeps old code and old files working (mmsae.legacy_names).

This file spells the old names on purpose; the rename script leaves it alone.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import mmsae
from mmsae.analysis import FeatureStats
from mmsae.checkpoint import load_sae
from mmsae.datasets.synthetic import SyntheticActivations
from mmsae.intervene import Set, UnlearnSelection
from mmsae.intervene.unlearn import ConceptFeatures
from mmsae.sae import SAEConfig, TopKConfig, build_sae
from mmsae.trainer.module import SAEModule, SAESpec
from mmsae.trainer.state import check_resume

ROOT = Path(__file__).resolve().parents[1]


def test_a_cfg_json_with_n_latents_loads_without_a_warning_and_saving_writes_n_features(
    tmp_path: Path,
) -> None:
    sae = build_sae("topk", d_in=8, n_features=16, k=2)
    path = sae.save(tmp_path / "sae")
    cfg = json.loads((path / "cfg.json").read_text())
    assert "n_features" in cfg and "n_latents" not in cfg
    cfg["n_latents"] = cfg.pop("n_features")
    (path / "cfg.json").write_text(json.dumps(cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_sae(path)
    assert loaded.cfg.n_features == 16
    torch.testing.assert_close(loaded.W_dec, sae.W_dec)


def test_old_keyword_arguments_warn_and_work() -> None:
    with pytest.deprecated_call(match="'n_latents' is deprecated, use 'n_features'"):
        sae = build_sae("topk", d_in=8, n_latents=16, k=2)
    assert sae.cfg.n_features == 16
    with pytest.deprecated_call(match="TopKConfig: 'n_latents'"):
        assert TopKConfig(d_in=8, n_latents=16, k=2).n_features == 16
    with pytest.deprecated_call(match="SAEConfig"):
        assert SAEConfig(d_in=8, n_latents=16).n_features == 16
    with pytest.deprecated_call(match="SAESpec"):
        assert SAESpec(n_latents=64, k=4).n_features == 64
    with pytest.deprecated_call(match="Set"):
        assert Set(latent=3, value=1.0).feature == 3
    with pytest.raises(TypeError, match=r"both 'n_latents' .* and 'n_features'"):
        build_sae("topk", d_in=8, n_latents=16, n_features=16, k=2)


def test_train_with_n_latents_warns_and_trains() -> None:
    x_ND = torch.randn(256, 8)
    with pytest.deprecated_call(match="train: 'n_latents'"):
        sae = mmsae.train(x_ND, n_latents=32, k=2, tokens=128, batch_size=64, warmup_steps=1, devices=1)
    assert sae.cfg.n_features == 32


def test_old_attribute_and_function_names_warn_and_resolve() -> None:
    sae = build_sae("topk", d_in=8, n_features=16, k=2)
    with pytest.deprecated_call(match="'n_latents' is deprecated"):
        assert sae.n_latents == 16
    with pytest.deprecated_call():
        assert sae.cfg.n_latents == 16
    with pytest.deprecated_call(match="latent_heatmaps"):
        from mmsae.analysis import latent_heatmaps
    assert latent_heatmaps is mmsae.analysis.feature_heatmaps
    with pytest.deprecated_call(match="DeadLatents"):
        assert mmsae.sae.DeadLatents is mmsae.sae.DeadFeatures
    from mmsae.intervene import intervention, unlearn

    with pytest.deprecated_call(match="latent_columns"):
        assert intervention.latent_columns is intervention.feature_columns
    with pytest.deprecated_call(match="latent_sums"):
        assert unlearn.latent_sums is unlearn.feature_sums
    with pytest.raises(AttributeError, match="no attribute 'latent_nonsense'"):
        _ = intervention.latent_nonsense


def test_synthetic_n_features_is_n_directions_with_a_warning() -> None:
    with pytest.deprecated_call(match="'n_features' is deprecated, use 'n_directions'"):
        old = SyntheticActivations(d=16, n_features=32, mean_active=2.0)
    new = SyntheticActivations(d=16, n_directions=32, mean_active=2.0)
    assert old.n_directions == 32 and torch.equal(old.sample(64), new.sample(64))
    with pytest.raises(TypeError, match="unexpected keyword"):
        SyntheticActivations(d=16, n_featurez=32)


def test_stats_and_unlearning_files_of_earlier_versions_load(tmp_path: Path) -> None:
    stats = FeatureStats(16, 8)
    stats.save(tmp_path / "stats.safetensors")
    with safe_open(str(tmp_path / "stats.safetensors"), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta["n_latents"] = meta.pop("n_features")
    save_file(tensors, tmp_path / "old.safetensors", metadata=meta)
    assert FeatureStats.load(tmp_path / "old.safetensors").n_features == 16

    selection = UnlearnSelection(
        "blocks.1", "enc", 32, 99.0, {"cat": ConceptFeatures({0: [1]}, {0: [1.0]}, {0: [0.5]})}
    )
    old = json.loads(selection.save(tmp_path / "sel.json").read_text())
    old["n_latents"] = old.pop("n_features")
    old["concepts"]["cat"]["latents"] = old["concepts"]["cat"].pop("features")
    (tmp_path / "old.json").write_text(json.dumps(old))
    loaded = UnlearnSelection.load(tmp_path / "old.json")
    assert loaded.n_features == 32 and loaded.concepts["cat"].features == {0: [1]}


def test_a_run_configuration_with_n_latents_resumes() -> None:
    """A Lightning checkpoint of an earlier version names each SAE's size n_latents in its run configuration;
    SAEModule.on_load_checkpoint renames it before comparing, so the same run resumes."""
    from mmsae.legacy_names import upgrade_run_config

    now = SAEModule([SAESpec(n_features=16, k=2)], d_in=8).run_config()
    saved = json.loads(json.dumps(now).replace('"n_features"', '"n_latents"'))
    with pytest.raises(ValueError, match="another configuration"):
        check_resume(saved, now, None)
    check_resume(upgrade_run_config(saved), now, None)  # no error


def test_a_fit_config_with_n_latents_warns_and_parses(capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from mmsae import cli

    argv = ["fit", "--config", str(ROOT / "configs" / "synthetic_topk.yaml"), "--print_config"]
    with pytest.deprecated_call(match="'n_latents' is deprecated"):
        assert cli.main([*argv, "--model.saes", "[{arch: topk, n_latents: 512, k: 8}]"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["model"]["saes"][0]["n_features"] == 512


PUBLIC_MODULES = [
    "mmsae",
    "mmsae.sae",
    "mmsae.analysis",
    "mmsae.intervene",
    "mmsae.index",
    "mmsae.store",
    "mmsae.trainer",
    "mmsae.zoo",
    "mmsae.encoders",
    "mmsae.datasets",
    "mmsae.kernels",
]
DIFFUSION_LATENT = {"latent_channels"}  # diffusers' VAE latent image, not an SAE feature


def _public_names(module: str) -> list[tuple[str, object]]:
    mod = importlib.import_module(module)
    names = getattr(mod, "__all__", None) or [n for n in vars(mod) if not n.startswith("_")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [(n, getattr(mod, n)) for n in names if hasattr(mod, n)]


def test_the_public_api_says_feature_not_latent() -> None:
    """Names exported by mmsae and its packages, their parameters and dataclass fields: no 'latent' but the
    deprecated aliases (resolved through __getattr__, so not listed here) and diffusion latents."""
    found = []
    for module in PUBLIC_MODULES:
        for name, obj in _public_names(module):
            if "latent" in name.lower():
                found.append(f"{module}.{name}")
            targets = [obj]
            if inspect.isclass(obj):
                targets = [obj.__init__] + [
                    m for n, m in vars(obj).items() if callable(m) and not n.startswith("_")
                ]
            for fn in targets:
                try:
                    params = inspect.signature(fn).parameters
                except (TypeError, ValueError):
                    continue
                found += [
                    f"{module}.{name}({p})"
                    for p in params
                    if "latent" in p.lower() and p not in DIFFUSION_LATENT
                ]
    assert not found, found


def test_no_latent_left_in_the_sources() -> None:
    """No identifier of the mmsae package says latent, but a peer format's key."""
    allowed = {"num_latents"}  # sparsify's cfg.json key (read by mmsae.convert)
    for path in sorted((ROOT / "mmsae").rglob("*.py")):
        if path.name == "legacy_names.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            name = getattr(node, "id", None) or getattr(node, "attr", None) or getattr(node, "arg", None)
            if isinstance(node, ast.FunctionDef | ast.ClassDef):
                name = node.name
            assert not (name and "latent" in name.lower() and name not in allowed), f"{path}: {name}"
