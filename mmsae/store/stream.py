"""The store's streaming twin: encoder → token batches without touching disk (`ActivationStream`).

`forward_batches` runs an encoder over batches of data set indices (extraction uses it too) and
`probe_layout` reads the widths and tokens per example off the first readable batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmsae.datasets.images import ExampleDataset
from mmsae.encoders.base import Encoder, TokenActs, TokenMode
from mmsae.inputs import InputBatch, check_decode, input_batches, modality_of
from mmsae.store.format import DEFAULT_BUFFER_TOKENS, DEFAULT_SHARD_TOKENS, per_token_meta
from mmsae.store.shuffle import resolve_hooks, shuffle_batches


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


def probe_layout(
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
            "meta_columns": sorted(per_token_meta(ta)),
            "extra": {k: v.tolist() for k, v in ta.meta.items() if k not in per_token_meta(ta)},
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
            layout_probe = probe_layout(
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
