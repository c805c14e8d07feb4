"""Data set → model inputs on the encoder's device, batch by batch (the input half of extraction).

decode="pil" (the default): DataLoader workers read and transform each example with the encoder's own
pipeline; for torchvision pipelines they stop before `ToTensor` and ship uint8 pixels, which become the
same float pixels on the device (`mmsae.datasets.pixels`). decode="draft": the same, but JPEG files at least
twice as large as the pipeline's first `Resize` needs are decoded at 1/2, 1/4 or 1/8 scale in the DCT
(`draft_size_of`): much faster on camera-size photos, pixels within ~1 level of decode="pil" on average.
decode="device": workers only read JPEG files, the main process decodes and preprocesses a whole batch on
the device (`mmsae.datasets.gpu_decode`).

Workers get the data set and a transform, never the encoder: a worker started by spawn (the default in a
process that torch.multiprocessing spawned, e.g. `mmsae extract --devices N`) would otherwise receive a
copy of the model, through CUDA IPC when it is on a GPU. On Linux workers are forked anyway, as
DataLoader does by default, so they start at once whatever the parent's start method.

Models that read an image and a prompt together (LLaVA: its processor expands the image token by the
prompt) have a `pair_pipeline` instead: workers run it on each (image, prompt) example and collate the
results into one batch of model inputs (input_ids, attention_mask, pixel_values).
"""

from __future__ import annotations

import copy
import gc
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import Compose

from mmsae.datasets.gpu_decode import (
    DevicePreprocess,
    EncodedJpeg,
    PackedJpegs,
    decode_jpegs,
    image_files,
    pack_jpegs,
    read_jpeg,
)
from mmsae.datasets.images import ExampleDataset, UnreadableExample
from mmsae.datasets.pixels import PixelHandoff, draft_size_of, split_pipeline
from mmsae.encoders.base import Encoder, PairPipeline

DECODERS = ("pil", "draft", "device")


@dataclass
class InputBatch:
    indices: list[int]  # data set indices of the readable examples, in order
    # stacked pixels, texts for prompt/caption encoders, or a pair pipeline's batch (LLaVA processor outputs)
    inputs: Tensor | list[str] | dict[str, Tensor] | None
    skipped: list[dict[str, Any]] = field(default_factory=list)
    fallback: list[int] = field(default_factory=list)  # decode="device": indices decoded by PIL instead


def probe_image() -> Image.Image:
    """A fixed non-square test pattern: its transformed pixels fingerprint the preprocessing."""
    y, x = np.mgrid[0:97, 0:131]
    return Image.fromarray(np.stack([x * 2, y * 2, (x * y) % 256], -1).astype(np.uint8))


class EncoderInputs(Dataset):
    """Data set items → model inputs (in DataLoader workers); unreadable items marked.

    `transform` maps an image to pixels; None passes texts through; `pair` maps (image, prompt) to inputs.
    `who` names the model in errors."""

    def __init__(
        self,
        dataset: ExampleDataset,
        transform: Callable[[Any], Tensor] | None,
        pair: PairPipeline | None = None,
        who: str = "this model",
    ):
        self.dataset, self.transform, self.pair, self.who = dataset, transform, pair, who

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Tensor | str | None, dict[str, Any] | None]:
        try:
            example = self.dataset[index]
        except UnreadableExample as e:
            return index, None, {"index": e.index, "source": e.source, "reason": e.reason}
        if self.pair is not None:
            return index, self.pair(example.image, self._prompt(example)), None
        if self.transform is None:
            return index, example.text, None
        return index, self.transform(example.image), None

    def _prompt(self, example: Any) -> str:
        if example.image is None or example.text is None:
            raise ValueError(
                f"{self.who} reads an image with a prompt, but example {example.index} of "
                f"{self.dataset.describe()} ({self.dataset.source(example.index)}) has "
                f"{'no image' if example.image is None else 'no prompt'}. Pair images with prompts: "
                "ImagePrompts(images, 'Describe the image.') or the data set spec "
                "'<image spec>+prompt:Describe the image.' (e.g. 'skimage+prompt:Describe the image.')."
            )
        return example.text


@dataclass(frozen=True)
class CollatePairs:
    """Batches a pair pipeline's examples (picklable: it runs in loader workers)."""

    pair: PairPipeline

    def __call__(self, items: list[tuple[int, Any, dict[str, Any] | None]]) -> InputBatch:
        ok = [(i, x) for i, x, err in items if err is None]
        skipped = [err for _, _, err in items if err is not None]
        if not ok:
            return InputBatch([], None, skipped)
        return InputBatch([i for i, _ in ok], self.pair.collate([x for _, x in ok]), skipped)


def collate_inputs(items: list[tuple[int, Any, dict[str, Any] | None]]) -> InputBatch:
    ok = [(i, x) for i, x, err in items if err is None]
    skipped = [err for _, _, err in items if err is not None]
    if not ok:
        return InputBatch([], None, skipped)
    xs = [x for _, x in ok]
    inputs = torch.stack(xs) if isinstance(xs[0], Tensor) else xs
    return InputBatch([i for i, _ in ok], inputs, skipped)


class JpegFiles(Dataset):
    """decode="device", in loader workers: a JPEG file's bytes; other files go through the PIL path here."""

    def __init__(self, dataset: ExampleDataset, encoder: Encoder):
        self.files, self.pil = image_files(dataset), EncoderInputs(dataset, encoder.image_pipeline)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[int, EncodedJpeg | Tensor | None, dict[str, Any] | None]:
        jpeg = read_jpeg(self.files[index])
        return self.pil[index] if jpeg is None else (index, jpeg, None)


def image_pipeline(encoder: Encoder) -> Compose:
    """The torchvision pipeline behind `encoder.transform`; `DeviceDecoder` checks numerically that it is
    the one in use."""
    if not isinstance(encoder.image_pipeline, Compose):
        raise ValueError(
            f"decode='device' replays the torchvision pipeline of the encoder's transform, and "
            f"{encoder.id} ({type(encoder).__name__}) has none. Use decode='pil'."
        )
    return encoder.image_pipeline


class DeviceDecoder:
    """decode="device", in the main process: a batch of `JpegFiles` items → pixels on the encoder's device.

    JPEGs the device decoder rejects take the PIL path (which re-reads the file and reports it if PIL
    cannot read it either); their indices, and those of non-JPEG files, end up in `InputBatch.fallback`.
    """

    def __init__(self, dataset: ExampleDataset, encoder: Encoder):
        self.pil, self.device = EncoderInputs(dataset, encoder.image_pipeline), encoder.device
        self.preprocess = DevicePreprocess.from_transform(image_pipeline(encoder))
        probe = probe_image()
        self.preprocess.check_matches(encoder.transform, probe)
        self.shape = tuple(encoder.transform(probe).shape)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def __call__(self, packed: PackedJpegs) -> InputBatch:
        """Decode and preprocess one batch; on CUDA on a stream of its own, waited for before returning, so
        that it can run in a thread while the model runs the previous batch (`decoded_ahead`)."""
        if self.stream is None:
            return self._decode(packed.unpack())
        with torch.cuda.stream(self.stream):
            batch = self._decode(packed.unpack())
        self.stream.synchronize()
        return batch

    def _decode(self, items: list[tuple[int, Any, dict[str, Any] | None]]) -> InputBatch:
        jpeg_at = [p for p, (_, x, _) in enumerate(items) if isinstance(x, EncodedJpeg)]
        decoded = dict(zip(jpeg_at, decode_jpegs([items[p][1] for p in jpeg_at], self.device)))
        items = [
            self.pil[item[0]] if p in decoded and decoded[p] is None else item for p, item in enumerate(items)
        ]
        ok = [p for p, (_, _, err) in enumerate(items) if err is None]
        batch = InputBatch([items[p][0] for p in ok], None, [err for _, _, err in items if err is not None])
        if not ok:
            return batch
        on_device = [r for r, p in enumerate(ok) if decoded.get(p) is not None]
        on_host = [r for r, p in enumerate(ok) if decoded.get(p) is None]
        if len(on_device) == len(ok):  # the usual case: no copy into place
            batch.inputs, batch.fallback = self.preprocess([decoded[p] for p in ok]), []
            return batch
        pixels_BCHW = torch.empty(len(ok), *self.shape, device=self.device)
        if on_device:
            pixels_BCHW[on_device] = self.preprocess([decoded[ok[r]] for r in on_device])
        if on_host:
            pixels_BCHW[on_host] = torch.stack([items[ok[r]][1] for r in on_host]).to(self.device)
        batch.inputs, batch.fallback = pixels_BCHW, [batch.indices[r] for r in on_host]
        return batch


def decoded_ahead(decoder: DeviceDecoder, packed: Iterable[PackedJpegs]) -> Iterator[InputBatch]:
    """`map(decoder, packed)`, one batch ahead in a thread: nvJPEG and the resizes of the next batch overlap
    the model's forward of this one (on CUDA, on the decoder's stream)."""
    with ThreadPoolExecutor(1, thread_name_prefix="mmsae-decode") as pool:
        pending: Future[InputBatch] | None = None
        for item in packed:
            ahead = pool.submit(decoder, item)
            if pending is not None:
                yield _on_current_stream(pending.result())
            pending = ahead
        if pending is not None:
            yield _on_current_stream(pending.result())


def _on_current_stream(batch: InputBatch) -> InputBatch:
    """Pixels made on the decoder's stream are read on the consumer's: tell the allocator, so their memory
    is not reused by the next decode before the consumer's kernels are done with it."""
    if isinstance(batch.inputs, Tensor) and batch.inputs.is_cuda:
        batch.inputs.record_stream(torch.cuda.current_stream(batch.inputs.device))
    return batch


def with_draft(dataset: ExampleDataset, encoder: Encoder) -> ExampleDataset:
    """A shallow copy of `dataset` whose image files decode at the least size the encoder's pipeline needs."""
    size = draft_size_of(encoder.image_pipeline)
    if size is None:
        raise ValueError(
            f"decode='draft' needs the encoder's pipeline to start with a torchvision Resize, and "
            f"{encoder.id} has {encoder.image_pipeline}. Use decode='pil'."
        )
    drafted = copy.copy(dataset)
    drafted.draft_size = size
    return drafted


def modality_of(dataset: ExampleDataset, modality: str | None) -> str:
    modality = modality or ("text" if dataset.kind == "prompt" else "image")
    if modality not in ("image", "text"):
        raise ValueError(f"modality must be 'image' or 'text', got {modality!r}.")
    if modality == "image" and dataset.kind != "image":
        raise ValueError(f"{dataset.describe()} has no images; use an image data set or modality='text'.")
    return modality


def check_decode(decode: str, modality: str) -> None:
    if decode not in DECODERS:
        raise ValueError(f"decode must be one of {DECODERS}, got {decode!r}.")
    if decode != "pil" and modality != "image":
        raise ValueError(f"decode={decode!r} decodes images; this extraction reads texts: use decode='pil'.")


def _loader(
    dataset: Dataset,
    index_batches: Sequence[list[int]],
    num_workers: int,
    collate: Callable[..., Any],
    pin_memory: bool = False,
) -> Iterator[Any]:
    """The batches of a DataLoader over `dataset`; with workers, forked ones (see the module docstring)."""
    fork = num_workers > 0 and sys.platform == "linux"
    loader = DataLoader(
        dataset,
        batch_sampler=index_batches,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        multiprocessing_context="fork" if fork else None,
    )
    if not fork:
        yield from loader
        return
    # A forked worker inherits the parent's objects, its uncollected garbage included. A reference cycle that
    # still holds a CUDA tensor (a finished training run in the same process leaves some), collected in a
    # worker, frees the tensor there, where CUDA cannot run: the allocator's stream bookkeeping aborts the
    # worker (cudaErrorInitializationError) and the extraction with it. So collect in the parent first, and
    # freeze what is left, so that the workers' collections never visit the parent's objects (unless the
    # application froze objects itself: unfreezing would undo its freeze).
    gc.collect()
    ours = gc.get_freeze_count() == 0
    if ours:
        gc.freeze()
    try:
        batches = iter(loader)  # forks the workers
    finally:
        if ours:
            gc.unfreeze()
    yield from batches


def input_batches(
    encoder: Encoder,
    dataset: ExampleDataset,
    index_batches: Sequence[list[int]],
    modality: str,
    num_workers: int = 0,
    decode: str = "pil",
) -> Iterator[InputBatch]:
    """The examples of each batch of data set indices as model inputs: pixels on the encoder's device
    (float32, as `encoder.transform` gives them), or texts."""
    check_decode(decode, modality)
    if encoder.pair_pipeline is not None:
        if decode != "pil":
            raise ValueError(
                f"decode={decode!r} decodes images alone; {encoder.id} reads each image with its prompt "
                "through its processor: use decode='pil'."
            )
        pair = encoder.pair_pipeline
        yield from _pair_batches(encoder, pair, dataset, index_batches, modality, num_workers)
        return
    if decode == "device":
        decoder = DeviceDecoder(dataset, encoder)
        yield from decoded_ahead(
            decoder, _loader(JpegFiles(dataset, encoder), index_batches, num_workers, pack_jpegs)
        )
        return
    if modality == "text":
        yield from _loader(EncoderInputs(dataset, None), index_batches, num_workers, collate_inputs)
        return
    if decode == "draft":
        dataset = with_draft(dataset, encoder)
    handoff: PixelHandoff | None = split_pipeline(encoder.image_pipeline, probe_image())
    transform = encoder.image_pipeline if handoff is None else handoff.host
    cuda = encoder.device.type == "cuda"
    for batch in _loader(EncoderInputs(dataset, transform), index_batches, num_workers, collate_inputs, cuda):
        if batch.inputs is not None:
            pixels_BCHW = batch.inputs.to(encoder.device, non_blocking=True)
            batch.inputs = pixels_BCHW if handoff is None else handoff.finish(pixels_BCHW)
        yield batch


def _pair_batches(
    encoder: Encoder,
    pair: PairPipeline,
    dataset: ExampleDataset,
    index_batches: Sequence[list[int]],
    modality: str,
    num_workers: int,
) -> Iterator[InputBatch]:
    """(image, prompt) examples through the encoder's pair pipeline, batched, on the encoder's device."""
    if modality != "image":
        raise ValueError(
            f"{encoder.id} reads an image with a prompt, and {dataset.describe()} gives texts only; "
            "use an (image, prompt) data set: ImagePrompts(images, prompts) or the spec "
            "'<image spec>+prompt:TEXT' (e.g. 'skimage+prompt:Describe the image.')."
        )
    cuda = encoder.device.type == "cuda"
    items = EncoderInputs(dataset, None, pair, who=encoder.id)
    for batch in _loader(items, index_batches, num_workers, CollatePairs(pair), cuda):
        if isinstance(batch.inputs, dict):
            batch.inputs = {k: v.to(encoder.device, non_blocking=True) for k, v in batch.inputs.items()}
        yield batch
