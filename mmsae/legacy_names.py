"""Names of earlier versions that keep working: an SAE's dictionary unit was a "latent" before it was a
"feature" (`n_latents` → `n_features`, `latent_heatmaps` → `feature_heatmaps`, ...).

Code written for the old names still runs, with a DeprecationWarning that names the new one (Python shows it
once per calling line); files written by earlier versions (cfg.json, stats, index meta.json, unlearning
selections, Lightning checkpoints) load without one. This module is the only place that spells the old
names, so that renaming code can leave it alone: the modules that keep an old name ask for it here by their
new name (`renamed_from("n_features")`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

RENAMED: dict[str, str] = {"n_latents": "n_features", "latents": "features", "latent": "feature"}
"""Old → new keyword, field, attribute and file-key names."""

RENAMED_ATTRIBUTES: dict[str, dict[str, str]] = {
    "mmsae.sae": {"DeadLatents": "DeadFeatures"},
    "mmsae.sae.base": {"DeadLatents": "DeadFeatures"},
    "mmsae.analysis": {"latent_heatmaps": "feature_heatmaps"},
    "mmsae.analysis.heatmap": {"latent_heatmaps": "feature_heatmaps"},
    "mmsae.intervene.intervention": {"latent_columns": "feature_columns", "code_latents": "code_features"},
    "mmsae.intervene.unlearn": {"latent_sums": "feature_sums"},
    "mmsae.trainer.state": {"DeadLatentClock": "DeadFeatureClock"},
    "mmsae.kernels.triton_sparse": {"LatentSort": "FeatureSort", "sort_by_latent": "sort_by_feature"},
}
"""Module → {old public name: new name}: the old name resolves, with a warning, through the module's
`__getattr__ = module_getattr(__name__)`."""

OLD_NAME: dict[str, str] = {new: old for old, new in RENAMED.items()}
F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T", bound=type)


def warn_renamed(old: str, new: str, where: str, stacklevel: int = 3) -> None:
    warnings.warn(
        f"{where}: {old!r} is deprecated, use {new!r} (mmsae says 'feature' for an SAE's dictionary unit); "
        "the old name stops working in a later release.",
        DeprecationWarning,
        stacklevel=stacklevel,
    )


def legacy_keys(mapping: dict[str, Any]) -> dict[str, Any]:
    """`mapping` (a file's JSON object or metadata) with the old keys under their new names; a key given
    under both names keeps the new one. No warning: files of earlier versions are valid input."""
    out = {RENAMED.get(key, key): value for key, value in mapping.items() if key not in RENAMED}
    for key, value in mapping.items():
        if key in RENAMED:
            out.setdefault(RENAMED[key], value)
    return out


def _rename_kwargs(kwargs: dict[str, Any], accepted: set[str], where: str) -> dict[str, Any]:
    for old in [k for k in kwargs if k in RENAMED and k not in accepted and RENAMED[k] in accepted]:
        new = RENAMED[old]
        if new in kwargs:
            raise TypeError(f"{where} got both {old!r} (its old name) and {new!r}: pass only {new!r}.")
        warn_renamed(old, new, where, stacklevel=4)
        kwargs[new] = kwargs.pop(old)
    return kwargs


def legacy_kwargs(fn: F) -> F:
    """Decorator: `fn` also accepts its renamed keyword arguments under their old names (with a warning)."""
    accepted = set(inspect.signature(fn).parameters)
    where = fn.__qualname__.removesuffix(".__init__")

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **_rename_kwargs(kwargs, accepted, where))

    return wrapper  # type: ignore[return-value]


class LegacyKwargsMeta(type):
    """Metaclass for dataclasses (and their subclasses, whose generated `__init__` a decorator on the base
    would not reach): constructing one accepts the old names of its fields, with a warning."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if kwargs:
            accepted = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
            accepted |= set(inspect.signature(cls.__init__).parameters)
            kwargs = _rename_kwargs(kwargs, accepted, cls.__name__)
        return super().__call__(*args, **kwargs)


def renamed_from(*new_names: str) -> Callable[[T], T]:
    """Class decorator: a read-only property under the old name of each of `new_names`, which warns and
    returns the new attribute."""

    def deco(cls: T) -> T:
        for new in new_names:
            old = OLD_NAME[new]

            def getter(self: Any, new: str = new, old: str = old) -> Any:
                warn_renamed(old, new, type(self).__name__)
                return getattr(self, new)

            setattr(cls, old, property(getter, doc=f"Deprecated name of `{new}`."))
        return cls

    return deco


def module_getattr(module: str) -> Callable[[str], Any]:
    """A module `__getattr__` that resolves the old public names of `module` with a warning."""
    renamed = RENAMED_ATTRIBUTES.get(module, {})

    def __getattr__(name: str) -> Any:
        if name in renamed:
            warn_renamed(name, renamed[name], module)
            return getattr(sys.modules[module], renamed[name])
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__


def upgrade_run_config(config: dict[str, Any]) -> dict[str, Any]:
    """A Lightning checkpoint's run configuration (`mmsae_run`, `hyper_parameters`) with each SAE spec's old
    keys renamed, so that a run of an earlier version resumes."""
    out = dict(config)
    if isinstance(out.get("saes"), list):
        out["saes"] = [legacy_keys(s) if isinstance(s, dict) else s for s in out["saes"]]
    return out


__all__ = [
    "RENAMED",
    "RENAMED_ATTRIBUTES",
    "LegacyKwargsMeta",
    "legacy_keys",
    "legacy_kwargs",
    "module_getattr",
    "renamed_from",
    "upgrade_run_config",
    "warn_renamed",
]
