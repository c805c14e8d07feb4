"""Extraction: run an encoder over a data set and write its activations to an `ActivationStore`.

The store directory is named by a content hash of everything that determines its bytes (encoder id
and a weights sample, the encoder's own settings (`Encoder.store_config`), hooks, token mode, data set
fingerprint, preprocessing, dtype). Shards cover fixed ranges of examples with batches aligned to them, so
any shard can be (re)computed alone: a killed extraction resumes at the first missing shard and ends
byte-identical to an uninterrupted run. The store's format and I/O live in `mmsae.store`; this module
only orchestrates.

Several processes (one per GPU) extract disjoint shards of one store: process `rank` of `world_size`
computes the shards s with s % world_size == rank. Rank 0 creates store.json, each shard's record goes to
its own file, and rank 0 merges them when all are done, so the store is byte-identical to a single-process
run and an interrupted run resumes with any number of processes. Launch with `mmsae extract --devices N`,
with `torchrun --nproc_per_node N -m mmsae.cli extract ...`, or call `extract` in each process of a
torch.distributed job. Each process holds a lock for its rank while it extracts, so a second extraction of
the same store and rank fails at once instead of waiting on records that will never come.

Pipeline: inputs on the device (`mmsae.inputs`: DataLoader workers decode and transform images, or read
JPEG files that are decoded as a batch on the device) → forward → activations cast to the store dtype on
the device and copied asynchronously into pinned host memory (`mmsae.store.writer`) → a writer thread
waits for each copy and streams it into the current shard's temp files.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mmsae.datasets.images import ExampleDataset
from mmsae.encoders.base import Encoder, TokenMode
from mmsae.inputs import check_decode, modality_of, probe_image
from mmsae.store import (
    DEFAULT_SHARD_TOKENS,
    DONE_DIR,
    FORMAT,
    STORE_JSON,
    ActivationStore,
    check_dtype,
    config_hash,
    forward_batches,
    probe_layout,
    remove_residue,
    remove_stale_temps,
    shard_done,
    weights_fingerprint,
    write_info,
    write_shards,
)
from mmsae.store.ranks import (
    DEFAULT_WAIT_S,
    Ranks,
    await_store,
    finish,
    open_info,
    rank_device,
    rank_lock,
    resolve_ranks,
)


def preprocessing_fingerprint(encoder: Encoder) -> str:
    pixels = encoder.transform(probe_image())
    digest = hashlib.sha256(f"{tuple(pixels.shape)}".encode() + pixels.float().numpy().tobytes())
    if encoder.pair_pipeline is not None:  # the text side too (LLaVA: prompt format, image-token expansion)
        for key, value in sorted(encoder.pair_pipeline(probe_image(), "a probe prompt").items()):
            digest.update(key.encode() + f"{tuple(value.shape)}".encode() + value.float().numpy().tobytes())
    return digest.hexdigest()


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
        # Sampler settings and the like; stores of encoders without any keep their hash.
        **({"encoder_config": encoder_config} if (encoder_config := encoder.store_config()) else {}),
    }


def _store_dir(out_dir: Path, encoder: Encoder, digest: str) -> Path:
    """`out_dir` itself when it already is a store (resume into it), else out_dir/<encoder>-<hash>."""
    if (out_dir / STORE_JSON).is_file():
        return out_dir
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in encoder.id)
    return out_dir / f"{slug}-{digest[:16]}"


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
    hooks = _check_args(encoder, dataset, hooks, dtype, batch_size, shard_tokens)
    modality = modality_of(dataset, modality)
    check_decode(decode, modality)
    config = _config(encoder, dataset, hooks, tokens, dtype, modality, preprocessing, decode)
    digest = config_hash(config)
    root = _store_dir(Path(out_dir), encoder, digest)
    if _finished(root, config, digest) and not (root / DONE_DIR).exists():
        return ActivationStore(root)  # cache hit
    with rank_lock(root, ranks):
        if _finished(root, config, digest):
            # Finished before we took the lock, or killed after store.json was complete but before .done/
            # was removed: its records are merged, so .done/ and any temp file are residue.
            remove_residue(root)
            return ActivationStore(root)
        if open_info(root, config, digest) is None and ranks.rank == 0:
            _create_store(encoder, dataset, root, config, digest, (batch_size, shard_tokens, decode))
        info = await_store(root, config, digest, ranks, timeout)
        # Temp files of this rank's shards can only be a killed earlier run's: this process holds the lock.
        remove_stale_temps(root, ranks.owns, info=ranks.rank == 0)
        pending = [s for s in range(len(info["shards"])) if not shard_done(root, info, s)]
        desc = f"extract {encoder.id}" + (f" (rank 0 of {ranks.world_size})" if ranks.world_size > 1 else "")
        mine = [s for s in pending if ranks.owns(s)]
        fallback = _run(
            encoder,
            dataset,
            root,
            info,
            mine,
            tokens,
            num_workers,
            progress and ranks.rank == 0,
            desc,
            decode,
        )
        finish(root, info, pending, ranks, timeout)
    store = ActivationStore(root)
    _warn_skipped(store, dataset, fallback, device, ranks)
    return store


def _warn_skipped(
    store: ActivationStore, dataset: ExampleDataset, fallback: list[int], device: torch.device, ranks: Ranks
) -> None:
    if fallback:
        warnings.warn(
            f"decode='device': {len(fallback)} images were not complete JPEG files or failed to decode "
            f"on {device.type} and took the PIL path (first: {dataset.source(fallback[0])}).",
            stacklevel=3,
        )
    if store.skipped and ranks.rank == 0:
        first = store.skipped[0]
        warnings.warn(
            f"Skipped {len(store.skipped)} unreadable examples of {dataset.describe()} (first: "
            f"{first['source']}: {first['reason']}); see store.skipped.",
            stacklevel=3,
        )


def _check_args(
    encoder: Encoder,
    dataset: ExampleDataset,
    hooks: str | Sequence[str] | None,
    dtype: str,
    batch_size: int,
    shard_tokens: int,
) -> list[str]:
    """The hooks to extract (None: the encoder's default); a clear error for any bad argument."""
    hooks = [encoder.default_hook] if hooks is None else [hooks] if isinstance(hooks, str) else list(hooks)
    for h in hooks:
        encoder.module(h)  # unknown hook → KeyError listing the valid ones
    check_dtype(dtype)
    if len(dataset) == 0:
        raise ValueError(f"The data set {dataset.describe()} is empty: nothing to extract.")
    if batch_size < 1 or shard_tokens < 1:
        raise ValueError(f"batch_size and shard_tokens must be >= 1, got {batch_size} and {shard_tokens}.")
    return hooks


def _finished(root: Path, config: dict[str, Any], digest: str) -> bool:
    """Whether the store at `root` is complete with all its shard files (a deleted one is recomputed)."""
    info = open_info(root, config, digest)
    return (
        info is not None
        and info["complete"]
        and all(shard_done(root, info, s) for s in range(len(info["shards"])))
    )


def _create_store(
    encoder: Encoder,
    dataset: ExampleDataset,
    root: Path,
    config: dict[str, Any],
    digest: str,
    sizes: tuple[int, int, str],
) -> None:
    """Rank 0: probe the layout and write the incomplete store.json."""
    batch_size, shard_tokens, decode = sizes
    layout, hooks_info = probe_layout(
        encoder,
        dataset,
        config["hooks"],
        config["tokens"],
        config["modality"],
        batch_size,
        shard_tokens,
        decode,
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
