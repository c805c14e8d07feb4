"""Extraction: run an encoder over a data set and write its activations to an `ActivationStore`.

The store directory is named by a content hash of everything that determines its bytes (encoder id
and a weights sample, hooks, token mode, data set fingerprint, preprocessing, dtype). Shards cover fixed
ranges of examples with batches aligned to them, so any shard can be (re)computed alone: a killed
extraction resumes at the first missing shard and ends byte-identical to an uninterrupted run.

Several processes (one per GPU) extract disjoint shards of one store: process `rank` of `world_size`
computes the shards s with s % world_size == rank. Rank 0 creates store.json, each shard's record goes to
its own file, and rank 0 merges them when all are done, so the store is byte-identical to a single-process
run and an interrupted run resumes with any number of processes. Launch with `mmsae extract --devices N`,
with `torchrun --nproc_per_node N -m mmsae.cli extract ...`, or call `extract` in each process of a
torch.distributed job.

Pipeline: inputs on the device (`mmsae.inputs`: DataLoader workers decode and transform images, or read
JPEG files that are decoded as a batch on the device) → forward → activations cast to the store dtype on
the device and copied asynchronously into pinned host memory → a writer thread waits for each copy and
streams it into the current shard's temp files.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import queue
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from mmsae.datasets.images import ExampleDataset
from mmsae.encoders.base import Encoder, TokenActs, TokenMode
from mmsae.inputs import InputBatch, check_decode, input_batches, modality_of, probe_image
from mmsae.store import (
    DEFAULT_BUFFER_TOKENS,
    DONE_DIR,
    DTYPES,
    FORMAT,
    STORE_JSON,
    ActivationStore,
    ShardFile,
    StoreError,
    check_dtype,
    n_recorded,
    read_info,
    remove_stale_temps,
    resolve_hooks,
    shard_files,
    shard_record,
    shuffle_batches,
    write_info,
    write_record,
)

DEFAULT_SHARD_TOKENS = 1 << 18
DEFAULT_WAIT_S = 1800.0  # as torch.distributed's default: a rank that makes no progress this long failed
POLL_S = 0.2
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


# ------------------------------------------------------------------------------------------ fingerprints
def weights_fingerprint(encoder: Encoder, n_samples: int = 64) -> str:
    """Hash of every tensor's name, shape, dtype and a strided sample of its values.

    Two random-init encoders with the same id must not share a store; hashing all weights of a 7B model
    would take minutes, a sample takes milliseconds.
    """
    digest = hashlib.sha256()
    for name, t in [*encoder.model.named_parameters(), *encoder.model.named_buffers()]:
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // n_samples)][:n_samples].float().cpu().numpy()
        digest.update(f"{name}{tuple(t.shape)}{t.dtype}".encode() + sample.tobytes())
    return digest.hexdigest()


def preprocessing_fingerprint(encoder: Encoder) -> str:
    pixels = encoder.transform(probe_image())
    return hashlib.sha256(f"{tuple(pixels.shape)}".encode() + pixels.float().numpy().tobytes()).hexdigest()


def forward_batches(
    encoder: Encoder,
    dataset: ExampleDataset,
    index_batches: Sequence[list[int]],
    hooks: list[str],
    tokens: TokenMode,
    modality: str,
    num_workers: int = 0,
    decode: str = "pil",
) -> Iterator[tuple[InputBatch, dict[str, TokenActs]]]:
    """Run the encoder over the given batches of data set indices; activations stay on the device.

    Example ids in the returned metadata are data set indices (skipped examples leave gaps).
    """
    for batch in input_batches(encoder, dataset, index_batches, modality, num_workers, decode):
        if not batch.indices:
            yield batch, {}
            continue
        acts = encoder.activations(batch.inputs, hooks, tokens)
        # non_blocking: a blocking host→device copy would wait for this batch's forward to finish.
        index_B = torch.tensor(batch.indices).to(encoder.device, non_blocking=True)
        for ta in acts.values():  # the encoder numbers examples 0..B-1 within the batch
            ta.meta["example_id"] = index_B[ta.meta["example_id"].to(encoder.device)]
        yield batch, acts


def _per_token_meta(ta: TokenActs) -> dict[str, Tensor]:
    n = ta.acts_ND.shape[0]
    return {k: v for k, v in ta.meta.items() if v.ndim == 1 and v.shape[0] == n}


# ------------------------------------------------------------------------------------------ writing
class _ShardWriter(threading.Thread):
    """Background thread: waits for each async device→host copy and streams it into shard temp files.

    Queue items: ("append", shard, {hook: (acts, meta)}, event), ("skipped", shard, [..]),
    ("commit", shard), or None to stop. A shard's record is written only after its files are renamed
    into place; on error or stop, the uncommitted shard's temp files are deleted.
    """

    def __init__(self, root: Path, info: dict[str, Any], max_pending: int = 4):
        super().__init__(daemon=True, name="mmsae-shard-writer")
        self.root, self.info = root, info
        self.queue: queue.Queue[tuple[Any, ...] | None] = queue.Queue(maxsize=max_pending)
        self.error: BaseException | None = None
        self.files: dict[str, tuple[ShardFile, ShardFile]] = {}
        self.counts: dict[str, int] = {}
        self.skipped: list[dict[str, Any]] = []

    def put(self, item: tuple[Any, ...] | None) -> None:
        while True:  # poll so a dead writer surfaces its error instead of blocking forever
            self.raise_error()
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def raise_error(self) -> None:
        if self.error is None:
            return
        err = self.error
        if isinstance(err, OSError) and err.errno in _DISK_FULL:
            done = n_recorded(self.root, self.info)
            raise OSError(
                err.errno,
                f"Out of disk space writing the activation store {self.root} ({err}). "
                f"The partial shard was deleted; {done} finished shards are kept. Free space or "
                "choose another out_dir, then run the same extraction again to resume.",
            ) from err
        raise err

    def run(self) -> None:
        try:
            while (item := self.queue.get()) is not None:
                getattr(self, f"_{item[0]}")(*item[1:])
        except BaseException as e:
            self.error = e
            while self.queue.get() is not None:  # drain so the producer never blocks on a full queue
                pass
        finally:
            for acts_file, meta_file in self.files.values():
                acts_file.discard()
                meta_file.discard()

    def _append(self, shard: int, arrays: dict[str, tuple[Tensor, Tensor]], event: Any) -> None:
        if not self.files:
            self.files = {h: tuple(ShardFile(p) for p in shard_files(self.root, h, shard)) for h in arrays}
            self.counts = dict.fromkeys(arrays, 0)
        if event is not None:
            event.synchronize()
        for hook, (acts, meta) in arrays.items():
            acts_file, meta_file = self.files[hook]
            acts_file.write(acts.view(torch.uint8).numpy())  # raw bytes: numpy has no bfloat16
            meta_file.write(meta.numpy())
            self.counts[hook] += acts.shape[0]

    def _skipped(self, shard: int, skipped: list[dict[str, Any]]) -> None:
        self.skipped.extend(skipped)

    def _commit(self, shard: int) -> None:
        record: dict[str, Any] = {"skipped": self.skipped, "hooks": {}}
        if not self.files:  # every example of the shard was unreadable: still write empty files
            self.files = {
                h: tuple(ShardFile(p) for p in shard_files(self.root, h, shard)) for h in self.info["hooks"]
            }
            self.counts = dict.fromkeys(self.info["hooks"], 0)
        for hook, (acts_file, meta_file) in self.files.items():
            record["hooks"][hook] = {
                "n_tokens": self.counts[hook],
                "acts_crc32": acts_file.commit(),
                "meta_crc32": meta_file.commit(),
            }
        self.files, self.skipped = {}, []
        write_record(self.root, shard, record)


def _stage(
    acts: dict[str, TokenActs],
    dtype: torch.dtype,
    copy_stream: torch.cuda.Stream | None,
) -> tuple[dict[str, tuple[Tensor, Tensor]], Any]:
    """Cast on the device and start async copies into pinned host memory; returns the arrays + event.

    The copies run on `copy_stream`, so the next batch's forward overlaps them (on the compute stream a
    ViT-B/16 batch's 77 MB would stall it ~4 ms of each ~26 ms).
    """
    out, copies = {}, []
    for hook, ta in acts.items():
        meta = _per_token_meta(ta)
        acts_ND = ta.acts_ND.to(dtype)
        meta_NM = torch.stack([meta[k].to(torch.int64) for k in sorted(meta)], 1)
        if acts_ND.is_cuda:
            out[hook] = (
                torch.empty(acts_ND.shape, dtype=dtype, pin_memory=True),
                torch.empty(meta_NM.shape, dtype=torch.int64, pin_memory=True),
            )
            copies += [(out[hook][0], acts_ND), (out[hook][1], meta_NM)]
        else:
            out[hook] = (acts_ND.contiguous(), meta_NM.contiguous())
    if not copies:
        return out, None
    compute = torch.cuda.current_stream(copies[0][1].device)
    stream = compute if copy_stream is None else copy_stream
    stream.wait_stream(compute)  # the casts are done
    with torch.cuda.stream(stream):
        for host, on_device in copies:
            host.copy_(on_device, non_blocking=True)
            on_device.record_stream(stream)  # the allocator must not reuse it before the copy ends
    event = torch.cuda.Event()
    event.record(stream)
    return out, event


# ------------------------------------------------------------------------------------------ ranks
@dataclass(frozen=True)
class Ranks:
    """This process's share of the shards, and how it waits for the other processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # GPU index on this host
    distributed: bool = False  # in a torch.distributed group: barriers; else poll the store's files

    def owns(self, shard: int) -> bool:
        return shard % self.world_size == self.rank


def resolve_ranks(rank: int | None = None, world_size: int | None = None) -> Ranks:
    """Explicit values, else the torch.distributed group, else torchrun's RANK/WORLD_SIZE/LOCAL_RANK."""
    if (rank is None) != (world_size is None):
        raise ValueError(
            "Pass both rank= and world_size=, or neither (then they come from torch.distributed "
            "or torchrun's RANK/WORLD_SIZE environment variables)."
        )
    dist = torch.distributed
    group = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if group else int(os.environ.get("RANK", 0))
        world_size = dist.get_world_size() if group else int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world_size:
        raise ValueError(f"Need 0 <= rank < world_size, got rank={rank}, world_size={world_size}.")
    in_group = group and (rank, world_size) == (dist.get_rank(), dist.get_world_size())
    return Ranks(rank, world_size, int(os.environ.get("LOCAL_RANK", rank)), in_group)


def rank_device(device: str | torch.device, ranks: Ranks) -> torch.device:
    """`device`, except that each process of a multi-process CUDA run gets its own GPU, cuda:LOCAL_RANK."""
    device = torch.device(device)
    if device.type != "cuda" or ranks.world_size == 1:
        return device
    if ranks.local_rank >= torch.cuda.device_count():
        raise ValueError(
            f"Rank {ranks.rank} needs cuda:{ranks.local_rank} but {torch.cuda.device_count()} "
            "GPUs are visible: start at most one process per GPU."
        )
    return torch.device("cuda", ranks.local_rank)


def _poll(check: Callable[[], tuple[bool, int]], timeout: float, failure: Callable[[], str]) -> None:
    """Wait until `check` says finished; its progress count rising restarts the timeout."""
    deadline, seen = time.monotonic() + timeout, -1
    while True:
        finished, progress = check()
        if finished:
            return
        if progress > seen:
            deadline, seen = time.monotonic() + timeout, progress
        elif time.monotonic() > deadline:
            raise TimeoutError(failure())
        time.sleep(POLL_S)


def _await_store(
    root: Path,
    config: dict[str, Any],
    digest: str,
    ranks: Ranks,
    timeout: float,
) -> dict[str, Any]:
    """store.json once rank 0 has created (or checked) it."""
    if ranks.distributed:
        torch.distributed.barrier()
    elif ranks.rank != 0:
        _poll(
            lambda: ((root / STORE_JSON).is_file(), 0),
            timeout,
            lambda: (
                f"Rank {ranks.rank}: rank 0 did not create {root / STORE_JSON} within {timeout:.0f} s. "
                "Start rank 0 with the same configuration and out_dir, and check its log."
            ),
        )
    info = _open_store(root, config, digest)
    if info is None:  # only when the ranks were given different out_dirs
        raise StoreError(
            f"Rank {ranks.rank}: {root / STORE_JSON} does not exist after rank 0 created the "
            "store: give every rank the same out_dir."
        )
    return info


def _finish(root: Path, info: dict[str, Any], pending: list[int], ranks: Ranks, timeout: float) -> None:
    """Once the `pending` shards are done, rank 0 merges their records into store.json; all wait for it."""
    if ranks.distributed:
        torch.distributed.barrier()
        if ranks.rank == 0:
            _finalize(root, info)
        torch.distributed.barrier()
    elif ranks.rank == 0:
        _await_shards(root, info, pending, ranks, timeout)
        _finalize(root, info)
    else:
        _await_merge(root, pending, ranks, timeout)


def _await_shards(root: Path, info: dict[str, Any], pending: list[int], ranks: Ranks, timeout: float) -> None:
    """Rank 0 without a process group: poll until every pending shard has a record and its files."""
    waiting = set(pending)

    def check() -> tuple[bool, int]:
        waiting.difference_update([s for s in sorted(waiting) if _shard_done(root, info, s)])
        return not waiting, len(pending) - len(waiting)

    def failure() -> str:
        owners = sorted({s % ranks.world_size for s in waiting})
        return (
            f"Rank 0: no shard of {root} was finished for {timeout:.0f} s; shards {sorted(waiting)[:8]} "
            f"of ranks {owners} are missing. That process probably failed: check its log, then run the "
            "same extraction again (with any number of processes) to resume."
        )

    _poll(check, timeout, failure)


def _await_merge(root: Path, pending: list[int], ranks: Ranks, timeout: float) -> None:
    """Other ranks without a process group: poll until store.json is complete with the pending shards.

    They cannot watch .done/ like rank 0: rank 0 deletes it when it merges. New records there count as
    progress for the timeout.
    """

    def check() -> tuple[bool, int]:
        info = read_info(root)
        if info["complete"] and all(_shard_done(root, info, s) for s in pending):
            return True, 0
        return False, len(list((root / DONE_DIR).glob("*.json")))

    _poll(
        check,
        timeout,
        lambda: (
            f"Rank {ranks.rank}: {root} was not finished for {timeout:.0f} s without "
            "progress; check the other processes' logs, then run the same extraction "
            "again (with any number of processes) to resume."
        ),
    )


def _finalize(root: Path, info: dict[str, Any]) -> None:
    """Rank 0, once every shard is done: merge the shard records into store.json and drop .done/."""
    remove_stale_temps(root)  # of killed earlier runs; no process is writing any more
    records = [shard_record(root, info, s) for s in range(len(info["shards"]))]
    write_info(root, {**info, "shards": records, "complete": True})
    shutil.rmtree(root / DONE_DIR, ignore_errors=True)


# ------------------------------------------------------------------------------------------ extract
def _config(
    encoder: Encoder,
    dataset: ExampleDataset,
    hooks: list[str],
    tokens: TokenMode,
    dtype: str,
    modality: str,
    preprocessing: dict[str, Any] | None,
    decode: str,
) -> dict[str, Any]:
    sites = {h: encoder.site(h) for h in hooks}
    # Only block updates are named (read back by ActivationStore.site), so output stores keep their hash.
    updates = {"sites": sites} if "update" in sites.values() else {}
    # decode="device" gives slightly different pixels, hence another store; the default adds no key, so
    # stores made before the option existed keep their hash.
    decoding = {} if decode == "pil" else {"decode": decode}
    return {
        **updates,
        **decoding,
        "encoder": encoder.id,
        "weights": weights_fingerprint(encoder),
        "hooks": hooks,
        "tokens": tokens,
        "dataset_fingerprint": dataset.fingerprint(),
        "n_examples": len(dataset),
        "modality": modality,
        "preprocessing": preprocessing_fingerprint(encoder) if modality == "image" else None,
        "preprocessing_extra": preprocessing or {},
        "dtype": dtype,
    }


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _store_dir(out_dir: Path, encoder: Encoder, digest: str) -> Path:
    """`out_dir` itself when it already is a store (resume into it), else out_dir/<encoder>-<hash>."""
    if (out_dir / STORE_JSON).is_file():
        return out_dir
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in encoder.id)
    return out_dir / f"{slug}-{digest[:16]}"


def _layout(
    encoder: Encoder,
    dataset: ExampleDataset,
    hooks: list[str],
    tokens: TokenMode,
    modality: str,
    batch_size: int,
    shard_tokens: int,
    decode: str = "pil",
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Probe the first readable batch for widths and tokens per example; fix the shard layout from it."""
    n = len(dataset)
    for start in range(0, n, batch_size):
        probe = [list(range(start, min(start + batch_size, n)))]
        batch, acts = next(forward_batches(encoder, dataset, probe, hooks, tokens, modality, decode=decode))
        if batch.indices:
            break
    else:
        raise ValueError(
            f"None of the {n} examples of {dataset.describe()} could be read (first: "
            f"{batch.skipped[0]['reason']}). Check the files."
        )
    hooks_info = {
        h: {
            "d": int(ta.acts_ND.shape[1]),
            "meta_columns": sorted(_per_token_meta(ta)),
            "extra": {k: v.tolist() for k, v in ta.meta.items() if k not in _per_token_meta(ta)},
        }
        for h, ta in acts.items()
    }
    tokens_per_example = max(ta.acts_ND.shape[0] for ta in acts.values()) / len(batch.indices)
    batches_per_shard = max(1, int(shard_tokens // (batch_size * tokens_per_example)))
    examples_per_shard = batches_per_shard * batch_size
    layout = {
        "batch_size": batch_size,
        "examples_per_shard": examples_per_shard,
        "tokens_per_example": tokens_per_example,
    }
    return layout, hooks_info


def _open_store(root: Path, config: dict[str, Any], digest: str) -> dict[str, Any] | None:
    """The existing store's info (checked against this config), or None for a new store."""
    if not (root / STORE_JSON).is_file():
        return None
    info = read_info(root)
    if info["config_hash"] != digest:
        changed = sorted(k for k in config if info["config"].get(k) != config[k])
        raise StoreError(
            f"The activation store {root} was made with a different configuration (config hash "
            f"{info['config_hash'][:16]} != {digest[:16]}; differs in: {', '.join(changed)}). "
            "Use another out_dir (stores are named by their config hash) or delete that store."
        )
    return info


def extract(
    encoder: Encoder,
    dataset: ExampleDataset,
    hooks: str | Sequence[str] | None,
    out_dir: str | Path,
    tokens: TokenMode = "all",
    dtype: str = "float16",
    batch_size: int = 64,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    num_workers: int = 0,
    modality: str | None = None,
    preprocessing: dict[str, Any] | None = None,
    progress: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
    timeout: float = DEFAULT_WAIT_S,
    decode: str = "pil",
) -> ActivationStore:
    """Extract `hooks` activations of `encoder` over `dataset` into a sharded store under `out_dir`.

    Resumes an interrupted extraction of the same configuration; returns at once if it is complete.
    `hooks=None` uses `encoder.default_hook`; `modality` ("image"/"text") defaults from the data set;
    `preprocessing` holds extra settings that change the activations (e.g. sampler settings) and
    enters the store hash. Unreadable examples are skipped, counted and listed in `store.skipped`.
    `decode="device"` (image files only) decodes JPEGs batch-wise on the encoder's device (nvJPEG on CUDA)
    and preprocesses them there: pixels within a few uint8 levels of the PIL path (see
    `mmsae.datasets.gpu_decode`), so the store gets its own hash. Other files take the PIL path; a
    warning counts them. `decode="draft"` is the PIL path with large JPEGs decoded at 1/2–1/8 scale
    (`mmsae.inputs`): pixels within ~1 level on average, its own hash too.

    Several processes: call this in each with the same arguments. `rank`/`world_size` default to the
    torch.distributed group, else to torchrun's RANK/WORLD_SIZE; the process extracts the shards
    s % world_size == rank, on cuda:LOCAL_RANK if the encoder is on CUDA (it is moved there). Outside a
    torch.distributed group the processes coordinate through the store's files and fail after `timeout`
    seconds in which the others made no progress. Every process returns the finished store.
    """
    ranks = resolve_ranks(rank, world_size)
    if (device := rank_device(encoder.device, ranks)) != encoder.device:
        encoder.to(device)
    if device.type == "cuda" and ranks.world_size > 1:
        torch.cuda.set_device(device)  # pinned memory and CUDA events must not land on GPU 0
    hooks = [encoder.default_hook] if hooks is None else [hooks] if isinstance(hooks, str) else list(hooks)
    for h in hooks:
        encoder.module(h)  # unknown hook → KeyError listing the valid ones
    check_dtype(dtype)
    if len(dataset) == 0:
        raise ValueError(f"The data set {dataset.describe()} is empty: nothing to extract.")
    if batch_size < 1 or shard_tokens < 1:
        raise ValueError(f"batch_size and shard_tokens must be >= 1, got {batch_size} and {shard_tokens}.")
    modality = modality_of(dataset, modality)
    check_decode(decode, modality)
    config = _config(encoder, dataset, hooks, tokens, dtype, modality, preprocessing, decode)
    digest = config_hash(config)
    root = _store_dir(Path(out_dir), encoder, digest)
    info = _open_store(root, config, digest)
    if (
        info is not None
        and info["complete"]
        and all(_shard_done(root, info, s) for s in range(len(info["shards"])))
    ):
        return ActivationStore(root)  # cache hit
    if info is None and ranks.rank == 0:
        layout, hooks_info = _layout(
            encoder, dataset, hooks, tokens, modality, batch_size, shard_tokens, decode
        )
        n_shards = -(-len(dataset) // layout["examples_per_shard"])
        root.mkdir(parents=True, exist_ok=True)
        write_info(
            root,
            {
                "format": FORMAT,
                "config": config,
                "config_hash": digest,
                "dataset": dataset.describe(),
                "layout": layout,
                "hooks": hooks_info,
                "shards": [None] * n_shards,
                "complete": False,
            },
        )
    info = _await_store(root, config, digest, ranks, timeout)
    pending = [s for s in range(len(info["shards"])) if not _shard_done(root, info, s)]
    desc = f"extract {encoder.id}" + (f" (rank 0 of {ranks.world_size})" if ranks.world_size > 1 else "")
    fallback = _run(
        encoder,
        dataset,
        root,
        info,
        [s for s in pending if ranks.owns(s)],
        tokens,
        num_workers,
        progress and ranks.rank == 0,
        desc,
        decode,
    )
    if fallback:
        first = dataset.source(fallback[0])
        warnings.warn(
            f"decode='device': {len(fallback)} images were not complete JPEG files or failed to "
            f"decode on {device.type} and took the PIL path (first: {first}).",
            stacklevel=2,
        )
    _finish(root, info, pending, ranks, timeout)
    store = ActivationStore(root)
    if store.skipped and ranks.rank == 0:
        first = store.skipped[0]
        warnings.warn(
            f"Skipped {len(store.skipped)} unreadable examples of {dataset.describe()} (first: "
            f"{first['source']}: {first['reason']}); see store.skipped.",
            stacklevel=2,
        )
    return store


def _shard_done(root: Path, info: dict[str, Any], shard: int) -> bool:
    """Recorded and its files present with the recorded sizes (a deleted shard is recomputed)."""
    rec = shard_record(root, info, shard)
    if rec is None:
        return False
    itemsize = DTYPES[info["config"]["dtype"]].itemsize
    for hook, h in info["hooks"].items():
        n = rec["hooks"][hook]["n_tokens"]
        acts, meta = shard_files(root, hook, shard)
        sizes = (n * h["d"] * itemsize, n * len(h["meta_columns"]) * 8)
        if not (acts.is_file() and meta.is_file() and (acts.stat().st_size, meta.stat().st_size) == sizes):
            return False
    return True


def _run(
    encoder: Encoder,
    dataset: ExampleDataset,
    root: Path,
    info: dict[str, Any],
    shards: list[int],
    tokens: TokenMode,
    num_workers: int,
    progress: bool,
    desc: str,
    decode: str,
) -> list[int]:
    """Compute and record `shards`; returns the indices that decode="device" left to PIL."""
    layout, n = info["layout"], len(dataset)
    bs, per_shard = layout["batch_size"], layout["examples_per_shard"]
    plan: list[tuple[int, bool]] = []  # (shard, last batch of the shard) for each batch
    index_batches: list[list[int]] = []
    for s in shards:
        stop = min((s + 1) * per_shard, n)
        starts = range(s * per_shard, stop, bs)
        for b in starts:
            index_batches.append(list(range(b, min(b + bs, stop))))
            plan.append((s, b == starts[-1]))
    if not plan:
        return []
    bar = tqdm(total=sum(map(len, index_batches)), unit="ex", desc=desc, disable=not progress)
    batches = forward_batches(
        encoder,
        dataset,
        index_batches,
        list(info["hooks"]),
        tokens,
        info["config"]["modality"],
        num_workers,
        decode,
    )
    try:
        return write_shards(root, info, plan, batches, bar)
    finally:
        bar.close()


def write_shards(
    root: Path,
    info: dict[str, Any],
    plan: Sequence[tuple[int, bool]],
    batches: Iterable[tuple[InputBatch, dict[str, TokenActs]]],
    bar: tqdm | None = None,
) -> list[int]:
    """Stream forward results into shard files: batch i goes to shard plan[i][0] and commits it if plan[i][1].

    Casts and device→host copies are asynchronous; a background thread writes. Of the store's `info`, only
    "hooks", "shards" (for the disk-full message) and config "dtype" are read. Returns the indices that
    decode="device" left to PIL. benchmarks/bench_extract.py times the store's own cost with it, on
    batches of device-resident pixels.
    """
    dtype = DTYPES[info["config"]["dtype"]]
    writer = _ShardWriter(root, info)
    writer.start()
    fallback: list[int] = []
    copy_stream: torch.cuda.Stream | None = None
    try:
        for (shard, last), (batch, acts) in zip(plan, batches):
            if batch.indices:
                device = next(iter(acts.values())).acts_ND.device
                if device.type == "cuda" and copy_stream is None:
                    copy_stream = torch.cuda.Stream(device)
                writer.put(("append", shard, *_stage(acts, dtype, copy_stream)))
            if batch.skipped:
                writer.put(("skipped", shard, batch.skipped))
            if last:
                writer.put(("commit", shard))
            fallback += batch.fallback
            if bar is not None:
                bar.update(len(batch.indices) + len(batch.skipped))
    finally:
        writer.queue.put(None)  # the writer drains this even after an error
        writer.join()
    writer.raise_error()
    return fallback


# ------------------------------------------------------------------------------------------ streaming
class ActivationStream:
    """Encoder → token batches without touching disk, with the same `.batches` interface as the store.

    For users who do not want a cache: every epoch re-runs the encoder (on its device; batches stay
    there). `batch_size` in the constructor is images per forward; in `.batches` it is tokens per batch.
    """

    def __init__(
        self,
        encoder: Encoder,
        dataset: ExampleDataset,
        hooks: str | Sequence[str] | None = None,
        tokens: TokenMode = "all",
        batch_size: int = 64,
        num_workers: int = 0,
        modality: str | None = None,
        decode: str = "pil",
    ):
        if len(dataset) == 0:
            raise ValueError(f"The data set {dataset.describe()} is empty: nothing to stream.")
        self.encoder, self.dataset, self.tokens = encoder, dataset, tokens
        self.hooks = (
            [encoder.default_hook] if hooks is None else [hooks] if isinstance(hooks, str) else list(hooks)
        )
        for h in self.hooks:
            encoder.module(h)
        self.images_per_forward, self.num_workers = batch_size, num_workers
        self.modality = modality_of(dataset, modality)
        check_decode(decode, self.modality)
        self.decode = decode
        self._dims: dict[str, int] | None = None

    def dim(self, hook: str | None = None) -> int:
        if self._dims is None:  # one probe forward, cached
            layout_probe = _layout(
                self.encoder,
                self.dataset,
                self.hooks,
                self.tokens,
                self.modality,
                self.images_per_forward,
                DEFAULT_SHARD_TOKENS,
                self.decode,
            )[1]
            self._dims = {h: v["d"] for h, v in layout_probe.items()}
        (key,), _ = resolve_hooks(self.hooks, hook, None)
        return self._dims[key]

    @property
    def d_in(self) -> int:
        dims = {self.dim(h) for h in self.hooks}
        if len(dims) > 1:
            raise ValueError(f"Hooks {self.hooks} have different widths {dims}: use stream.dim(hook).")
        return dims.pop()

    def batches(
        self,
        batch_size: int,
        hook: str | None = None,
        shuffle: bool = True,
        seed: int = 0,
        buffer_tokens: int = DEFAULT_BUFFER_TOKENS,
        hooks: list[str] | None = None,
        drop_last: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> Iterator[Tensor | dict[str, Tensor]]:
        """One epoch over the data set (example order shuffled with `seed`), through a shuffle buffer."""
        keys, as_dict = resolve_hooks(self.hooks, hook, hooks)
        n = len(self.dataset)
        order = np.random.default_rng(seed).permutation(n).tolist() if shuffle else list(range(n))
        index_batches = [order[i : i + self.images_per_forward] for i in range(0, n, self.images_per_forward)]
        forwards = forward_batches(
            self.encoder,
            self.dataset,
            index_batches,
            keys,
            self.tokens,
            self.modality,
            self.num_workers,
            self.decode,
        )
        chunks = ({h: acts[h].acts_ND for h in keys} for _, acts in forwards if acts)
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        for batch in shuffle_batches(chunks, batch_size, buffer_tokens, generator, drop_last):
            out = {h: t.to(dtype) for h, t in batch.items()}
            yield out if as_dict else out[keys[0]]


# ------------------------------------------------------------------------------------------ CLI
@dataclass
class ExtractConfig:
    """`mmsae extract` options; a YAML/JSON config file sets them (top level or under `extract:`)."""

    encoder: str = "timm:test_vit"  # get_encoder spec
    dataset: str = "skimage"  # mmsae.datasets.images.load_dataset spec
    out_dir: str = "runs/activations"
    hooks: list[str] = field(default_factory=list)  # empty: the encoder's default hook
    tokens: str = "all"  # all | cls | patch | pooled | mean | <int index>
    dtype: str = "float16"
    batch_size: int = 64
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    num_workers: int = 0
    decode: str = "pil"  # pil (in loader workers) | draft (pil, big JPEGs at reduced scale) | device
    device: str = "auto"  # auto = cuda when available
    devices: int = 1  # processes on disjoint shards, one per GPU (on CPU: CPU processes)
    model_dtype: str = ""  # e.g. bfloat16; empty keeps the model's dtype
    pretrained: bool = True


def _parse_config(argv: list[str]) -> ExtractConfig:
    import argparse
    import dataclasses

    import yaml

    parser = argparse.ArgumentParser(prog="mmsae extract", description="Extract activations into a store.")
    parser.add_argument("--config", type=Path, help="YAML or JSON file with ExtractConfig fields")
    for f in dataclasses.fields(ExtractConfig):
        if f.type == "bool":
            parser.add_argument(f"--{f.name}", type=lambda v: v.lower() in ("1", "true", "yes"), default=None)
        elif f.name == "hooks":
            parser.add_argument("--hooks", nargs="+", default=None)
        else:
            parser.add_argument(f"--{f.name}", type=int if f.type == "int" else str, default=None)
    args = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    if (path := args.pop("config")) is not None:
        if not path.is_file():
            raise FileNotFoundError(f"Config file {path} does not exist.")
        loaded = yaml.safe_load(path.read_text()) or {}
        values = loaded.get("extract", loaded)
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(ExtractConfig)})
        if unknown:
            raise ValueError(
                f"Unknown keys {unknown} in {path}; valid: "
                f"{[f.name for f in dataclasses.fields(ExtractConfig)]}."
            )
    values.update({k: v for k, v in args.items() if v is not None})
    return ExtractConfig(**values)


def run_config(
    cfg: ExtractConfig,
    rank: int | None = None,
    world_size: int | None = None,
) -> ActivationStore:
    """Build the encoder and data set a config names and extract (this process's share, see `extract`)."""
    from mmsae.datasets.images import load_dataset
    from mmsae.encoders import get_encoder

    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    # Build each rank's model on its own GPU: loading all of them on cuda:0 first could run it out of memory.
    device = rank_device(device, resolve_ranks(rank, world_size))
    model_dtype = getattr(torch, cfg.model_dtype) if cfg.model_dtype else None
    encoder = get_encoder(cfg.encoder, pretrained=cfg.pretrained, device=device, dtype=model_dtype)
    tokens: TokenMode = int(cfg.tokens) if cfg.tokens.lstrip("-").isdigit() else cfg.tokens
    return extract(
        encoder,
        load_dataset(cfg.dataset),
        cfg.hooks or None,
        cfg.out_dir,
        tokens=tokens,
        dtype=cfg.dtype,
        batch_size=cfg.batch_size,
        shard_tokens=cfg.shard_tokens,
        num_workers=cfg.num_workers,
        rank=rank,
        world_size=world_size,
        decode=cfg.decode,
    )


def launch(cfg: ExtractConfig) -> ActivationStore:
    """Run `cfg` in `cfg.devices` spawned processes, rank i on cuda:i (CPU processes without CUDA).

    The processes coordinate through the store's files (no ports, no process group). If one fails, the
    others are stopped and the exception is raised here; running the same config again resumes.
    """
    if cfg.devices < 1:
        raise ValueError(f"devices must be >= 1, got {cfg.devices}.")
    if cfg.devices == 1:
        return run_config(cfg)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ValueError(
            "devices > 1 spawns its own processes; under torchrun leave devices at 1 "
            "(--nproc_per_node sets the number of processes)."
        )
    uses_cuda = torch.cuda.is_available() and cfg.device in ("auto", "cuda")
    if uses_cuda and cfg.devices > torch.cuda.device_count():
        raise ValueError(f"devices={cfg.devices} but {torch.cuda.device_count()} GPUs are visible.")
    paths = torch.multiprocessing.get_context("spawn").SimpleQueue()
    torch.multiprocessing.start_processes(
        _launched_rank, args=(cfg, paths), nprocs=cfg.devices, start_method="spawn"
    )
    return ActivationStore(paths.get())


def _launched_rank(rank: int, cfg: ExtractConfig, paths: Any) -> None:
    if not torch.cuda.is_available():  # share the cores instead of oversubscribing them N times
        torch.set_num_threads(max(1, torch.get_num_threads() // cfg.devices))
    store = run_config(cfg, rank, cfg.devices)
    if rank == 0:
        paths.put(str(store.path))


def cli_main(argv: list[str]) -> int:
    """`mmsae extract --config cfg.yaml [--devices N] [--field value ...]`: prints the store path.

    Returns 1 on bad input or when a process of a multi-process run failed. Alternative launcher for
    several hosts or an existing torchrun setup: `torchrun --nproc_per_node N -m mmsae.cli extract ...`.
    """
    import sys

    from torch.multiprocessing.spawn import ProcessException

    try:
        store = launch(_parse_config(argv))
    except (ValueError, KeyError, FileNotFoundError, StoreError, ProcessException) as e:
        print(f"mmsae extract: error: {e}", file=sys.stderr)
        return 1
    if resolve_ranks().rank == 0:  # under torchrun every process gets here
        print(store.path)
        print(store)
    return 0
