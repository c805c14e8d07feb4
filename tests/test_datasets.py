"""Data sets: folders, caption files, prompts, scikit-image photos, random crops, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmsae.datasets.images import (
    ImageCaptions,
    ImageFolder,
    PromptList,
    RandomCrops,
    SkimagePhotos,
    UnreadableExample,
    load_dataset,
)


def _write_images(folder: Path, n: int, size: tuple[int, int] = (40, 30)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"img_{i:02d}.png"
        Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_image_folder_sorted_recursive_and_filters_extensions(tmp_path: Path) -> None:
    _write_images(tmp_path / "b", 2)
    _write_images(tmp_path / "a", 1)
    (tmp_path / "notes.txt").write_text("not an image")
    ds = ImageFolder(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in ds.paths] == [
        "a/img_00.png",
        "b/img_00.png",
        "b/img_01.png",
    ]
    ex = ds[1]
    assert ex.index == 1 and ex.image is not None and ex.image.mode == "RGB" and ex.image.size == (40, 30)
    with pytest.raises(IndexError):
        ds[3]


def test_image_folder_empty_or_missing_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "readme.md").write_text("x")
    with pytest.raises(ValueError, match="No images found"):
        ImageFolder(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "nope")


def test_corrupt_and_truncated_images_raise_unreadable(tmp_path: Path) -> None:
    paths = _write_images(tmp_path, 2)
    paths[0].write_bytes(b"definitely not a png")
    paths[1].write_bytes(paths[1].read_bytes()[:60])  # truncated mid-stream
    ds = ImageFolder(tmp_path)
    for i, path in enumerate(paths):
        with pytest.raises(UnreadableExample) as info:
            ds[i]
        assert info.value.index == i and info.value.source == str(path)


def test_fingerprint_is_a_content_hash(tmp_path: Path) -> None:
    paths = _write_images(tmp_path, 3)
    before = ImageFolder(tmp_path).fingerprint()
    assert ImageFolder(tmp_path).fingerprint() == before  # stable
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(paths[1])  # same name, new pixels
    assert ImageFolder(tmp_path).fingerprint() != before


def test_image_captions_csv_and_jsonl(tmp_path: Path) -> None:
    paths = _write_images(tmp_path / "imgs", 2)
    (tmp_path / "pairs.csv").write_text(
        'image,caption\nimgs/img_00.png,a cat\nimgs/img_01.png,"a dog, running"\n'
    )
    rows = [{"image": f"imgs/{p.name}", "caption": f"caption {i}"} for i, p in enumerate(paths)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    csv_ds, jsonl_ds = ImageCaptions(tmp_path / "pairs.csv"), ImageCaptions(tmp_path / "pairs.jsonl")
    assert [csv_ds[i].text for i in range(2)] == ["a cat", "a dog, running"]
    assert jsonl_ds[1].text == "caption 1" and jsonl_ds[1].image is not None
    assert csv_ds.fingerprint() != jsonl_ds.fingerprint()  # captions are part of the content


def test_image_captions_bad_input(tmp_path: Path) -> None:
    (tmp_path / "bad.csv").write_text("path,text\nx.png,a cat\n")
    with pytest.raises(ValueError, match="lacks 'image'/'caption'"):
        ImageCaptions(tmp_path / "bad.csv")
    (tmp_path / "bad.jsonl").write_text('{"image": "x.png", "caption": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 is not valid JSON"):
        ImageCaptions(tmp_path / "bad.jsonl")
    (tmp_path / "empty.csv").write_text("image,caption\n")
    with pytest.raises(ValueError, match="has no rows"):
        ImageCaptions(tmp_path / "empty.csv")
    # A missing image is a per-item problem (skipped during extraction), not a construction error.
    (tmp_path / "missing.csv").write_text("image,caption\nnope.png,gone\n")
    with pytest.raises(UnreadableExample, match=r"nope\.png"):
        ImageCaptions(tmp_path / "missing.csv")[0]


def test_prompt_lists(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("# comment\na red car\n\n  a blue house  \n")
    ds = PromptList(tmp_path / "p.txt")
    assert ds.kind == "prompt" and len(ds) == 2 and ds[1].text == "a blue house" and ds[1].image is None
    assert PromptList(["a red car", "a blue house"]).fingerprint() == ds.fingerprint()
    assert len(PromptList.bundled("demo")) >= 30
    assert len(load_dataset("prompts:demo")) == len(PromptList.bundled("demo"))
    with pytest.raises(ValueError, match="empty"):
        PromptList([])
    with pytest.raises(FileNotFoundError, match="bundled lists: demo"):
        PromptList(tmp_path / "missing.txt")


def test_skimage_photos_and_random_crops() -> None:
    photos = SkimagePhotos(["camera", "astronaut"])
    cam = photos[0].image
    assert cam is not None and cam.mode == "RGB" and cam.size == (512, 512)  # gray → RGB
    crops = RandomCrops(photos, n=6, scale=(0.1, 0.5), seed=3)
    a, b = crops[4].image, RandomCrops(photos, n=6, scale=(0.1, 0.5), seed=3)[4].image
    assert a is not None and b is not None
    assert np.array_equal(np.asarray(a), np.asarray(b))  # deterministic per index
    sizes = {crops[i].image.size for i in range(6)}
    assert len(sizes) > 1 and all(w <= 512 and h <= 512 for w, h in sizes)
    assert all(w * h <= 0.5 * 512 * 512 * 1.05 for w, h in sizes)
    assert crops.fingerprint() != RandomCrops(photos, n=6, scale=(0.1, 0.5), seed=4).fingerprint()
    with pytest.raises(ValueError, match="Unknown scikit-image photos"):
        SkimagePhotos(["not_a_photo"])
    with pytest.raises(ValueError, match="needs an image data set"):
        RandomCrops(PromptList(["x"]), n=2)


def test_load_dataset_specs(tmp_path: Path) -> None:
    _write_images(tmp_path, 2)
    assert len(load_dataset(f"folder:{tmp_path}")) == 2
    assert len(load_dataset("skimage-crops:7")) == 7
    with pytest.raises(ValueError, match="Unknown data set spec"):
        load_dataset("imagenet")


def _gradient(dtype: type, top: float) -> np.ndarray:
    """A 32×64 horizontal ramp from 0 to `top` in `dtype`."""
    return np.tile(np.linspace(0, top, 64), (32, 1)).astype(dtype)


@pytest.mark.parametrize(
    ("array", "name"),
    [
        (_gradient(np.uint16, 65535), "ramp16.png"),  # PNG 16-bit grayscale: mode I;16
        (_gradient(np.float32, 1.0), "ramp_float.tif"),  # float TIFF in [0, 1]: mode F
        (_gradient(np.float32, 4000.0), "ramp_wide.tif"),  # float TIFF in [0, 65535]
    ],
)
def test_high_bit_depth_images_are_scaled_not_clipped(tmp_path: Path, array: np.ndarray, name: str) -> None:
    """A 16-bit PNG used to extract as almost white and a float TIFF as black (convert("RGB") clips)."""
    from mmsae.datasets.images import open_image
    from mmsae.encoders.base import rgb

    path = tmp_path / "imgs" / name
    path.parent.mkdir()
    Image.fromarray(array).save(path)
    assert Image.open(path).mode in ("I;16", "F")
    top = 65535.0 if array.max() > 1 else 1.0
    expected = np.rint(np.tile(np.linspace(0, array.max() / top * 255, 64), (32, 1)))
    for image in (ImageFolder(path.parent)[0].image, open_image(path), rgb(Image.open(path))):
        assert image is not None and image.mode == "RGB"
        got = np.asarray(image)
        assert (got[..., 0] == got[..., 2]).all()  # gray stays gray
        np.testing.assert_allclose(got[..., 0], expected, atol=1)


def test_open_image_min_max_for_values_outside_standard_ranges() -> None:
    from mmsae.datasets.images import to_rgb

    image = Image.fromarray(np.array([[-2.0, 0.0, 6.0]], np.float32))
    assert np.asarray(to_rgb(image))[0, :, 0].tolist() == [0, 64, 255]


def test_open_image_refuses_clearly(tmp_path: Path) -> None:
    from mmsae.datasets.images import ImageReadError, open_image, to_rgb

    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ImageReadError, match=r"notes\.png: not an image file"):
        open_image(tmp_path / "notes.png")
    with pytest.raises(ImageReadError, match=r"gone\.png: no such file"):
        open_image(tmp_path / "gone.png")
    Image.new("L", (300, 200)).save(tmp_path / "big.png")
    with pytest.raises(
        ImageReadError, match=r"big\.png: too many pixels: 300×200 = 60,000, more than .*Downscale"
    ):
        open_image(tmp_path / "big.png", max_pixels=50_000)
    with pytest.raises(ImageReadError, match="NaN or infinite"):
        to_rgb(Image.fromarray(np.array([[0.0, np.nan]], np.float32)))
