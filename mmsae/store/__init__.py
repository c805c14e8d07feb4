"""The activation store: immutable sharded activations on disk, read back as shuffled token batches.

- `format`: directory layout, store.json, per-shard records, content hashing (see its docstring),
- `writer`: the background shard writer (checksums, atomic shards),
- `reader`: `ActivationStore`, the read side of a finished extraction,
- `shuffle`: hook selection, the shuffle buffer and prefetching shared by every source,
- `stream`: `ActivationStream`, the same batches straight from an encoder, without a disk cache,
- `ranks`: how the processes of one extraction share a store (shard ownership, locks, the merge).

`mmsae.extract` orchestrates an extraction (processes, resuming) on top of these.
"""

from mmsae.store.format import (
    DEFAULT_BUFFER_TOKENS,
    DEFAULT_SHARD_TOKENS,
    DONE_DIR,
    DTYPES,
    FORMAT,
    STORE_JSON,
    StoreError,
    check_dtype,
    config_hash,
    hook_dir,
    n_recorded,
    read_info,
    record_file,
    remove_residue,
    remove_stale_temps,
    shard_done,
    shard_files,
    shard_record,
    weights_fingerprint,
    write_info,
    write_record,
)
from mmsae.store.reader import ActivationStore, resolve_store_dir
from mmsae.store.shuffle import prefetch, resolve_hooks, shuffle_batches
from mmsae.store.stream import ActivationStream, forward_batches, probe_layout
from mmsae.store.writer import ShardFile, ShardWriter, write_shards

__all__ = [
    "DEFAULT_BUFFER_TOKENS",
    "DEFAULT_SHARD_TOKENS",
    "DONE_DIR",
    "DTYPES",
    "FORMAT",
    "STORE_JSON",
    "ActivationStore",
    "ActivationStream",
    "ShardFile",
    "ShardWriter",
    "StoreError",
    "check_dtype",
    "config_hash",
    "forward_batches",
    "hook_dir",
    "n_recorded",
    "prefetch",
    "probe_layout",
    "read_info",
    "record_file",
    "remove_residue",
    "remove_stale_temps",
    "resolve_hooks",
    "resolve_store_dir",
    "shard_done",
    "shard_files",
    "shard_record",
    "shuffle_batches",
    "weights_fingerprint",
    "write_info",
    "write_record",
    "write_shards",
]
