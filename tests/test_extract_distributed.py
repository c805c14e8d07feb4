"""Multi-process extraction: ranks split the shards, the store is byte-identical to one process, resume.

Real processes on CPU: a gloo process group (barriers), torchrun-style environment variables (the ranks
coordinate through the store's files) and the `--devices N` launcher (spawned processes).
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from mmsae.datasets.images import Example, ImageFolder
from mmsae.encoders import Encoder, get_encoder
from mmsae.extract import Ranks, extract, rank_device, resolve_ranks
from mmsae.extract_cli import ExtractConfig, cli_main, launch
from mmsae.store import ActivationStore, StoreError

N_IMAGES = 12
LAYOUT = {"batch_size": 2, "shard_tokens": 2 * 101}  # timm test_vit: 101 tokens/image → 6 shards of 2 images
SHARD_EXAMPLES = {s: {2 * s, 2 * s + 1} for s in range(6)}

# One rank: RANK/WORLD_SIZE come from the environment (and MASTER_PORT, when set, joins a gloo group).
# It logs every example it reads and dies at example `die_at`, like a killed process.
RANK_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    from mmsae.datasets.images import Example, ImageFolder
    from mmsae.encoders import get_encoder
    from mmsae.extract import extract

    images, out, log, die_at, timeout = sys.argv[1:]

    class Logged(ImageFolder):
        def __getitem__(self, index):
            if index == int(die_at):
                os._exit(17)
            with open(log, "a") as f:
                f.write(f"{index}\\n")
            return super().__getitem__(index)

    torch.set_num_threads(1)
    if "MASTER_PORT" in os.environ:
        torch.distributed.init_process_group("gloo")
    extract(get_encoder("timm:test_vit"), Logged(images), "norm", out, progress=False, timeout=float(timeout),
            batch_size=2, shard_tokens=202)
""")


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return get_encoder("timm:test_vit")  # seeded random init: the same weights in every process


@pytest.fixture(scope="module")
def folder(noise_folder: Path) -> ImageFolder:
    return ImageFolder(noise_folder)


@pytest.fixture(scope="module")
def reference(
    encoder: Encoder,
    folder: ImageFolder,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, bytes]:
    """The files of a single-process store of the same configuration."""
    return _tree(
        extract(encoder, folder, "norm", tmp_path_factory.mktemp("single"), progress=False, **LAYOUT).path
    )


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _start_ranks(
    folder: ImageFolder, out: Path, world_size: int, gloo: bool, die_at: dict[int, int], timeout: float = 60.0
) -> list[subprocess.Popen[str]]:
    script = out.parent / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "WORLD_SIZE": str(world_size)}
    if gloo:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
    args = [sys.executable, str(script), str(folder.root), str(out)]
    return [
        subprocess.Popen(
            [*args, str(out.parent / f"log{r}"), str(die_at.get(r, -1)), str(timeout)],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world_size)
    ]


def _read_log(path: Path) -> set[int]:
    return {int(line) for line in path.read_text().split()}


def test_ranks_of_a_process_group_split_the_shards_and_match_one_process(
    folder: ImageFolder, reference: dict[str, bytes], tmp_path: Path
) -> None:
    procs = _start_ranks(folder, tmp_path / "out", 2, gloo=True, die_at={})
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    (store,) = (tmp_path / "out").iterdir()
    assert _tree(store) == reference  # no .done/ left, store.json merged from both ranks' records
    # Rank r computed exactly the shards s % 2 == r (rank 0 also probed the first batch for the layout).
    assert _read_log(tmp_path / "log0") == set().union(*(SHARD_EXAMPLES[s] for s in (0, 2, 4)))
    assert _read_log(tmp_path / "log1") == set().union(*(SHARD_EXAMPLES[s] for s in (1, 3, 5)))


def test_killed_rank_resumes_with_another_number_of_processes(
    folder: ImageFolder, reference: dict[str, bytes], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # torchrun-style environment, no process group: rank 1 dies in shard 3 (its writer thread may or may
    # not have committed shard 1 by then); rank 0 finishes shards 0, 2, 4, then gives up once the others
    # have made no progress for 3 s.
    rank0, rank1 = _start_ranks(folder, tmp_path / "out", 2, gloo=False, die_at={1: 6}, timeout=3.0)
    assert rank1.wait(timeout=120) == 17
    _, err = rank0.communicate(timeout=120)
    assert rank0.returncode == 1
    assert "TimeoutError" in err and "run the same extraction again" in err
    assert re.search(r"shards \[(1, )?3, 5\] of ranks \[1\] are missing", err), err
    (partial,) = (tmp_path / "out").iterdir()
    with pytest.raises(StoreError, match=r"incomplete \([34]/6 shards\)"):
        ActivationStore(partial)
    # Resume with 3 spawned processes: they compute only the missing shards.
    cfg = tmp_path / "extract.yaml"
    cfg.write_text(
        f"encoder: timm:test_vit\ndataset: folder:{folder.root}\nout_dir: {partial}\n"
        "hooks: [norm]\nbatch_size: 2\nshard_tokens: 202\ndevice: cpu\n"
    )
    assert cli_main(["--config", str(cfg), "--devices", "3"]) == 0
    assert Path(capsys.readouterr().out.splitlines()[0]) == partial
    assert _tree(partial) == reference


def test_rank_that_gave_up_resumes_in_one_process(
    encoder: Encoder, folder: ImageFolder, reference: dict[str, bytes], tmp_path: Path
) -> None:
    # Rank 0 of 2 alone: it computes its shards, then times out waiting for rank 1's.
    with pytest.raises(TimeoutError, match=r"shards \[1, 3, 5\] of ranks \[1\] are missing"):
        extract(
            encoder, folder, "norm", tmp_path, progress=False, rank=0, world_size=2, timeout=0.5, **LAYOUT
        )
    (partial,) = tmp_path.iterdir()
    assert sorted(p.name for p in (partial / ".done").iterdir()) == ["00000.json", "00002.json", "00004.json"]
    assert _tree(extract(encoder, folder, "norm", tmp_path, progress=False, **LAYOUT).path) == reference


class _Slow(ImageFolder):
    def __getitem__(self, index: int) -> Example:
        time.sleep(0.1)
        return super().__getitem__(index)


def test_rank_that_finishes_first_waits_for_the_merge(
    encoder: Encoder, folder: ImageFolder, reference: dict[str, bytes], tmp_path: Path
) -> None:
    # Rank 1 (a thread with its own encoder) is done long before the slow rank 0, which then merges the
    # records and deletes .done/: rank 1 must notice the merge, not wait for records that are gone.
    result: dict[str, ActivationStore | BaseException] = {}
    encoder1 = get_encoder("timm:test_vit")  # not in the thread: seeding the init uses the global RNG

    def rank1() -> None:
        try:
            result["store"] = extract(
                encoder1, folder, "norm", tmp_path, progress=False, rank=1, world_size=2, timeout=10, **LAYOUT
            )
        except BaseException as e:  # re-raised below
            result["store"] = e

    thread = threading.Thread(target=rank1)
    thread.start()
    try:
        store0 = extract(
            encoder,
            _Slow(folder.root),
            "norm",
            tmp_path,
            progress=False,
            rank=0,
            world_size=2,
            timeout=10,
            **LAYOUT,
        )
    finally:
        thread.join(timeout=30)
    if isinstance(result["store"], BaseException):
        raise result["store"]
    assert result["store"].path == store0.path and _tree(store0.path) == reference


def test_ranks_come_from_arguments_torch_distributed_or_the_environment(
    encoder: Encoder, folder: ImageFolder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert resolve_ranks() == Ranks(0, 1, 0, False)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_ranks() == Ranks(3, 4, 1, False) and resolve_ranks(0, 2).rank == 0
    assert rank_device("cpu", resolve_ranks()) == torch.device("cpu")
    with pytest.raises(ValueError, match="Pass both rank= and world_size="):
        resolve_ranks(rank=1)
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        resolve_ranks(2, 2)
    with pytest.raises(ValueError, match="under torchrun leave devices at 1"):
        launch(ExtractConfig(devices=2))
    with pytest.raises(ValueError, match="devices must be >= 1"):
        launch(ExtractConfig(devices=0))
    # A rank other than 0 waits for rank 0 to create the store, and says so when it never does.
    with pytest.raises(TimeoutError, match=r"rank 0 did not create .*store\.json within 0 s"):
        extract(
            encoder, folder, "norm", tmp_path, progress=False, rank=1, world_size=2, timeout=0.3, **LAYOUT
        )


@pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason="needs 2 GPUs; CPU twin: test_ranks_of_a_process_group_split_the_shards_and_match_one_process",
)
def test_two_gpus_match_one_process(folder: ImageFolder, tmp_path: Path) -> None:
    # Each rank on its own GPU (cuda:0, cuda:1): same values as one GPU, up to kernel differences.
    cfg = ExtractConfig(
        encoder="timm:test_vit",
        dataset=f"folder:{folder.root}",
        hooks=["norm"],
        batch_size=2,
        shard_tokens=202,
        dtype="float32",
        device="cuda",
    )
    one = launch(dataclasses.replace(cfg, out_dir=str(tmp_path / "one")))
    two = launch(dataclasses.replace(cfg, out_dir=str(tmp_path / "two"), devices=2))
    assert one.info["config_hash"] == two.info["config_hash"]
    torch.testing.assert_close(
        torch.cat(list(two.batches(500, shuffle=False))),
        torch.cat(list(one.batches(500, shuffle=False))),
        atol=1e-4,
        rtol=1e-4,
    )
