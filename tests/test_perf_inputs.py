"""Fast image input: JPEG draft decoding (bounded pixel change), and one torch thread per loader worker."""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from mmsae.datasets.images import ImageFolder, open_image
from mmsae.datasets.pixels import HostPixels, draft_size_of
from mmsae.encoders import get_encoder
from mmsae.inputs import _loader, check_decode, input_batches

# Real photos with edges, texture and smooth areas; hubble_deep_field is 1000 × 872.
PHOTOS = ("astronaut", "coffee", "rocket", "hubble_deep_field")


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import skimage.data

    folder = tmp_path_factory.mktemp("jpegs")
    for name in PHOTOS:
        arr = np.asarray(getattr(skimage.data, name)())[..., :3]
        Image.fromarray(arr).save(folder / f"{name}.jpg", quality=90)
    Image.fromarray(np.asarray(skimage.data.astronaut())).save(folder / "astronaut_png.png")
    return folder


def _pipeline(size: int) -> T.Compose:
    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)])


@pytest.mark.parametrize("size", [56, 84, 112])
def test_draft_changes_pixels_by_at_most_the_documented_bound(jpegs: Path, size: int) -> None:
    """With draft_size_of's 2× margin, the resized pixels stay within 1 level on average (measured:
    0.2–0.7) and 40 at worst (measured: ≤ 35, on the rocket's sharp edges) of a full decode."""
    pipeline = _pipeline(size)
    host, draft = HostPixels(pipeline), draft_size_of(pipeline)
    assert draft == 2 * size
    reduced = 0
    for name in PHOTOS:
        path = jpegs / f"{name}.jpg"
        small, full = open_image(path, draft_size=draft), open_image(path)
        assert min(small.size) >= draft  # never smaller than asked
        reduced += small.size != full.size
        diff_CHW = (host(small).int() - host(full).int()).abs()
        assert diff_CHW.float().mean() <= 1.0 and diff_CHW.max() <= 40, (name, size)
    assert reduced >= 2  # the draft did decode photos at a reduced scale


def test_draft_sizes(jpegs: Path) -> None:
    path = jpegs / "hubble_deep_field.jpg"  # 1000 × 872
    assert open_image(path, draft_size=200).size == (250, 218)  # 1/4: the shorter side stays ≥ 200
    assert open_image(path, draft_size=219).size == (500, 436)  # 1/4 would give 218 < 219
    assert open_image(path, draft_size=(120, 400)).size == (500, 436)  # each axis at least as asked
    assert open_image(path, draft_size=1000).size == (1000, 872)
    png = jpegs / "astronaut_png.png"  # other formats decode in full
    assert open_image(png, draft_size=64).tobytes() == open_image(png).tobytes()


def test_draft_size_of_reads_the_first_resize() -> None:
    assert draft_size_of(_pipeline(84)) == 168
    assert draft_size_of(T.Compose([T.Resize((100, 60)), T.ToTensor()])) == (120, 200)  # (h, w) → (w, h)
    assert draft_size_of(T.Compose([T.CenterCrop(50), T.Resize(20)])) is None  # crop needs full pixels
    assert draft_size_of(T.Compose([T.Resize(20, max_size=30)])) is None
    assert draft_size_of(lambda image: image) is None
    timm_vit = get_encoder("timm:test_vit", pretrained=False)
    assert draft_size_of(timm_vit.image_pipeline) == 2 * 168  # after timm's RGB step


@pytest.mark.parametrize("num_workers", [0, 2])
def test_draft_input_batches_are_close_to_pil(jpegs: Path, num_workers: int) -> None:
    encoder = get_encoder("timm:test_vit", pretrained=False)  # Resize(168), CenterCrop(160)
    folder = ImageFolder(jpegs)
    batches = [[0, 1, 2], [3, 4]]
    draft = list(input_batches(encoder, folder, batches, "image", num_workers, decode="draft"))
    pil = list(input_batches(encoder, folder, batches, "image", num_workers, decode="pil"))
    assert folder.draft_size is None  # the caller's data set is left as it was
    for d, p in zip(draft, pil):
        assert d.indices == p.indices
        levels = (d.inputs - p.inputs).abs() * 0.5 * 255  # timm test_vit normalises with std 0.5
        assert levels.mean() <= 1.0 and levels.max() <= 40.5


def test_draft_decoding_refuses_texts_and_unknown_pipelines(jpegs: Path) -> None:
    with pytest.raises(ValueError, match="decode='draft' decodes images"):
        check_decode("draft", "text")
    encoder = get_encoder("timm:test_vit", pretrained=False)
    encoder.image_pipeline = T.Compose([T.CenterCrop(100), T.Resize(50), T.ToTensor()])
    with pytest.raises(ValueError, match="start with a torchvision Resize"):
        next(input_batches(encoder, ImageFolder(jpegs), [[0]], "image", decode="draft"))


class _Threads(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> int:
        return torch.get_num_threads()


def test_loader_workers_run_one_torch_thread() -> None:
    """N workers × all cores of intra-op threads would oversubscribe the CPU; each worker keeps one."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        loader = _loader(_Threads(), [[0, 1], [2, 3]], num_workers=2, collate=list)
        assert [n for batch in loader for n in batch] == [1, 1, 1, 1]
    finally:
        torch.set_num_threads(before)


class _Finalized:
    """Appends the pid of the process that finalizes it: a CUDA tensor's stand-in (the parent frees it)."""

    def __init__(self, record: Path):
        self.record, self.cycle = record, self

    def __del__(self) -> None:
        with self.record.open("a") as f:
            f.write(f"{os.getpid()}\n")


class _Collects(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> int:
        gc.collect()  # a worker's own allocations trigger collections sooner or later
        return index


@pytest.mark.skipif(sys.platform != "linux", reason="workers are forked on Linux only; elsewhere they spawn")
def test_forked_workers_never_collect_the_parents_garbage(tmp_path: Path) -> None:
    """Garbage left in the parent (a cycle holding a CUDA tensor, after a training run) must not be freed in
    a forked worker, where CUDA cannot run: a worker that collected it aborted the extraction."""
    record = tmp_path / "finalized_in"
    gc.disable()  # keep the cycle uncollected until the loader starts, as a busy parent may
    try:
        _Finalized(record)
        batches = list(_loader(_Collects(), [[0], [1]], num_workers=2, collate=list))
    finally:
        gc.enable()
    assert batches == [[0], [1]]
    assert record.read_text().split() == [str(os.getpid())]  # once, by the parent


@pytest.mark.skipif(sys.platform != "linux", reason="workers are forked on Linux only; elsewhere they spawn")
def test_the_loader_leaves_an_applications_frozen_objects_frozen() -> None:
    gc.freeze()  # an application that froze its objects before forking workers of its own
    try:
        frozen = gc.get_freeze_count()
        assert list(_loader(_Collects(), [[0], [1]], num_workers=2, collate=list)) == [[0], [1]]
        assert gc.get_freeze_count() > frozen // 2 > 0  # some frozen objects may die meanwhile; not all
    finally:
        gc.unfreeze()


def test_extract_with_draft_decoding_makes_its_own_store(jpegs: Path, tmp_path: Path) -> None:
    from mmsae.extract import extract

    encoder = get_encoder("timm:test_vit", pretrained=False)
    folder = ImageFolder(jpegs)
    pil = extract(encoder, folder, "blocks.5", tmp_path, tokens="cls", batch_size=4, progress=False)
    draft = extract(
        encoder, folder, "blocks.5", tmp_path, tokens="cls", batch_size=4, progress=False, decode="draft"
    )
    assert draft.path != pil.path and draft.n_tokens == pil.n_tokens == len(folder)
