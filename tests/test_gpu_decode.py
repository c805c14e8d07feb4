"""Device-side JPEG decoding + preprocessing vs the PIL path, on real photos written as JPEG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from mmsae.datasets.gpu_decode import (
    MAX_LEVELS,
    MEAN_LEVELS,
    DevicePreprocess,
    decode_jpegs,
    read_jpeg,
)
from mmsae.datasets.images import ImageFolder, SkimagePhotos, open_rgb
from mmsae.encoders import Encoder, get_encoder
from mmsae.extract import extract
from mmsae.extract_cli import ExtractConfig, _parse_config
from mmsae.inputs import image_pipeline
from mmsae.store import ActivationStream

N_PHOTOS = 8


@pytest.fixture(scope="module")
def encoders() -> dict[str, Encoder]:
    torch.manual_seed(0)
    return {spec: get_encoder(spec, pretrained=False) for spec in ("timm:test_vit", "clip:tiny")}


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All scikit-image photos as quality-90 JPEG files (sizes 172×448 … 1411×1411)."""
    root = tmp_path_factory.mktemp("jpegs")
    photos = SkimagePhotos()
    for i, name in enumerate(photos.names):
        photos[i].image.save(root / f"{name}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, jpegs: Path) -> ImageFolder:
    """Half-size photo JPEGs, a PNG, and three broken .jpg files."""
    root = tmp_path_factory.mktemp("mixed")
    for path in sorted(jpegs.glob("*.jpg"))[:N_PHOTOS]:
        with Image.open(path) as im:
            im.reduce(2).save(root / path.name, quality=90)
    SkimagePhotos(["coffee"])[0].image.reduce(3).save(root / "zz_coffee.png")
    whole = (jpegs / "chelsea.jpg").read_bytes()
    (root / "bad_truncated.jpg").write_bytes(whole[: len(whole) // 2])  # no end marker: PIL path, skipped
    (root / "bad_header_only.jpg").write_bytes(whole[:600] + b"\xff\xd9")  # the decoder rejects it
    (root / "bad_not_an_image.jpg").write_bytes(b"\xff\xd8\xff" + b"hello" * 10 + b"\xff\xd9")
    return ImageFolder(root)


@pytest.mark.parametrize("spec", ["timm:test_vit", "clip:tiny"])
def test_device_preprocess_matches_pil_on_photos(
    encoders: dict[str, Encoder], jpegs: Path, spec: str
) -> None:
    encoder = encoders[spec]
    preprocess = DevicePreprocess.from_transform(image_pipeline(encoder))
    paths = sorted(jpegs.glob("*.jpg"))
    images = decode_jpegs([read_jpeg(p) for p in paths], torch.device("cpu"))
    for path, image_CHW in zip(paths, images):  # libjpeg-turbo decodes exactly as PIL does
        pil = open_rgb(path, 0)
        assert torch.equal(image_CHW, torch.from_numpy(np.array(pil)).permute(2, 0, 1)), path.name
    got_BCHW = preprocess(images)
    expected_BCHW = torch.stack([encoder.transform(open_rgb(p, 0)) for p in paths])
    assert got_BCHW.shape == expected_BCHW.shape and got_BCHW.dtype == torch.float32
    levels = (got_BCHW - expected_BCHW).abs() * torch.tensor(preprocess.std).view(3, 1, 1) * 255
    assert levels.max() <= MAX_LEVELS and levels.mean() <= MEAN_LEVELS, (levels.max(), levels.mean())
    assert levels.mean() > 0  # the float resize is not PIL's: the tolerance is what is tested


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA; CPU twin: test_device_preprocess_matches_pil_on_photos"
)
def test_nvjpeg_matches_pil_on_photos(encoders: dict[str, Encoder], jpegs: Path) -> None:
    encoder = encoders["clip:tiny"]
    preprocess = DevicePreprocess.from_transform(image_pipeline(encoder))
    paths = sorted(jpegs.glob("*.jpg"))
    images = decode_jpegs([read_jpeg(p) for p in paths], torch.device("cuda"))
    assert all(im is not None and im.is_cuda for im in images)
    got_BCHW = preprocess(images).cpu()
    expected_BCHW = torch.stack([encoder.transform(open_rgb(p, 0)) for p in paths])
    levels = (got_BCHW - expected_BCHW).abs() * torch.tensor(preprocess.std).view(3, 1, 1) * 255
    # nvJPEG's IDCT / chroma upsampling add about one level to the resize difference
    assert levels.max() <= 2 * MAX_LEVELS and levels.mean() <= 2 * MEAN_LEVELS, (levels.max(), levels.mean())


def test_extract_device_decode_skips_counts_and_is_deterministic(
    encoders: dict[str, Encoder], folder: ImageFolder, tmp_path: Path
) -> None:
    encoder = encoders["timm:test_vit"]
    kw = {
        "hooks": "blocks.1",
        "dtype": "float32",
        "batch_size": 4,
        "shard_tokens": 4 * 101,
        "progress": False,
    }
    with pytest.warns(UserWarning) as record:
        device = extract(encoder, folder, out_dir=tmp_path / "a", decode="device", **kw)
    messages = [str(w.message) for w in record]
    assert any("decode='device': 1 images" in m and "zz_coffee.png" in m for m in messages), messages
    assert sorted(Path(s["source"]).name for s in device.skipped) == [
        "bad_header_only.jpg",
        "bad_not_an_image.jpg",
        "bad_truncated.jpg",
    ]
    with pytest.warns(UserWarning, match="Skipped 3 unreadable"):
        pil = extract(encoder, folder, out_dir=tmp_path / "a", **kw)
    assert device.path != pil.path  # decoding enters the store hash
    assert device.n_tokens == pil.n_tokens == (N_PHOTOS + 1) * 101

    dev_ND, pil_ND = (torch.cat(list(s.batches(10_000, shuffle=False))) for s in (device, pil))
    rel = (dev_ND - pil_ND).norm(dim=1) / pil_ND.norm(dim=1)
    assert rel.max() < 0.05 and rel.mean() < 0.01, (rel.max(), rel.mean())
    png_rows = slice(N_PHOTOS * 101, None)  # sorted last; decoded by PIL in both stores
    torch.testing.assert_close(dev_ND[png_rows], pil_ND[png_rows], atol=1e-5, rtol=1e-5)

    with pytest.warns(UserWarning, match="decode='device'"), pytest.warns(UserWarning, match="Skipped 3"):
        again = extract(encoder, folder, out_dir=tmp_path / "b", decode="device", **kw)

    def tree(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    assert tree(again.path) == tree(device.path)
    stream = ActivationStream(encoder, folder, "blocks.1", batch_size=4, decode="device")
    torch.testing.assert_close(torch.cat(list(stream.batches(10_000, shuffle=False))), dev_ND, rtol=0, atol=0)


def test_bad_settings_are_clear_errors(
    encoders: dict[str, Encoder], folder: ImageFolder, tmp_path: Path
) -> None:
    encoder = encoders["timm:test_vit"]
    with pytest.raises(ValueError, match="decode must be one of"):
        extract(encoder, folder, None, tmp_path, decode="gpu")
    with pytest.raises(ValueError, match="does not consist of files"):
        extract(encoder, SkimagePhotos(["camera"]), None, tmp_path, decode="device", progress=False)
    with pytest.raises(ValueError, match="decodes images alone"):
        extract(get_encoder("llava:tiny"), folder, None, tmp_path, decode="device", progress=False)
    half = T.Normalize([0.5] * 3, [0.5] * 3)
    flip = T.Compose([T.Resize(32), T.RandomHorizontalFlip(), T.ToTensor(), half])
    with pytest.raises(ValueError, match="cannot reproduce the step RandomHorizontalFlip"):
        DevicePreprocess.from_transform(flip)
    with pytest.raises(ValueError, match="needs a Resize and a Normalize"):
        DevicePreprocess.from_transform(T.Compose([T.Resize(32), T.ToTensor()]))
    squash = DevicePreprocess.from_transform(T.Compose([T.Resize((24, 40)), T.ToTensor(), half]))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    squash.check_matches(T.Compose([T.Resize((24, 40)), T.ToTensor(), half]), image)
    other_mean = T.Normalize([0.4] * 3, [0.5] * 3)
    with pytest.raises(ValueError, match=r"transform by 25\.5. uint8 levels on average"):
        squash.check_matches(T.Compose([T.Resize((24, 40)), T.ToTensor(), other_mean]), image)


def test_cli_config_key(tmp_path: Path) -> None:
    cfg_file = tmp_path / "extract.yaml"
    cfg_file.write_text("extract:\n  encoder: timm:test_vit\n  dataset: skimage\n  decode: device\n")
    assert _parse_config(["--config", str(cfg_file)]).decode == "device"
    given = ["--encoder", "timm:test_vit", "--dataset", "skimage"]
    assert _parse_config([*given, "--decode", "device"]).decode == "device"
    assert ExtractConfig().decode == "pil"


def test_read_jpeg_only_takes_complete_jpeg_files(folder: ImageFolder) -> None:
    names = {p.name: read_jpeg(p) for p in folder.paths}
    assert names["zz_coffee.png"] is None and names["bad_truncated.jpg"] is None
    assert names["bad_header_only.jpg"] is not None  # well-formed ends; the decoder rejects it
    data = names["bad_not_an_image.jpg"]
    good = names[folder.paths[0].name]
    decoded = decode_jpegs([good, data, good], torch.device("cpu"))  # one bad file fails the batched call
    assert decoded[1] is None and torch.equal(decoded[0], decoded[2]) and decoded[0].shape[0] == 3


def _torchvision_preprocess(pre: DevicePreprocess, images: list[torch.Tensor]) -> torch.Tensor:
    """The preprocessing through torchvision's own tensor functions, image by image."""
    from torchvision.transforms import functional as F

    from mmsae.datasets.pixels import unit_normalize

    size = [pre.resize] if isinstance(pre.resize, int) else list(pre.resize)
    out = []
    for image_CHW in images:
        x_CHW = F.resize(image_CHW.float(), size, pre.interpolation, pre.max_size, antialias=True)
        x_CHW = x_CHW.clamp_(0, 255).round_()
        out.append(x_CHW if pre.crop is None else F.center_crop(x_CHW, pre.crop))
    return unit_normalize(torch.stack(out), pre.mean, pre.std)


@pytest.mark.parametrize(
    "pipeline",
    [
        T.Compose(
            [
                T.Resize(24, interpolation=T.InterpolationMode.BICUBIC),
                T.CenterCrop(24),
                T.ToTensor(),
                T.Normalize([0.5] * 3, [0.25] * 3),
            ]
        ),
        T.Compose(
            [
                T.Resize(20, max_size=26),
                T.CenterCrop([18, 22]),
                T.ToTensor(),
                T.Normalize([0.4] * 3, [0.2] * 3),
            ]
        ),
        T.Compose([T.Resize((24, 40)), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)]),
        T.Compose(
            [
                T.Resize(16, interpolation=T.InterpolationMode.NEAREST),
                T.CenterCrop(30),
                T.ToTensor(),
                T.Normalize([0.5] * 3, [0.5] * 3),
            ]
        ),
    ],
)
def test_device_preprocess_equals_torchvision_resize(pipeline: T.Compose) -> None:
    """The batched preprocessing gives torchvision's per-image Resize → CenterCrop, for tall, wide, square
    and already-sized images: exactly where it resizes image by image (nearest), and up to the rounding of
    a pixel that falls on a half level where the resize is two batched matmuls (≤ 1 level, ≤ 0.1 %)."""
    pre = DevicePreprocess.from_transform(pipeline)
    g = torch.Generator().manual_seed(0)
    shapes = [(37, 53), (53, 37), (24, 24), (24, 40), (20, 31), (90, 19)]
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in shapes]
    got, expected = pre(images), _torchvision_preprocess(pre, images)
    levels = (got - expected).abs() * torch.tensor(pre.std).view(3, 1, 1) * 255
    if pre.interpolation == T.InterpolationMode.NEAREST:
        assert levels.max() == 0
    else:
        assert levels.max() < 1 + 1e-4 and (levels > 0.5).float().mean() <= 1e-3, levels.max()


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_batched_resize_equals_the_per_image_aten_resize_before_rounding(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`resize_crop` (weights in closed form, padded batched matmuls, chunks by size) against ATen's
    antialiased op image by image: downscales, upscales, an image of the target size, a fixed-size resize,
    and chunks small enough that the largest image goes alone."""
    import mmsae.datasets.batched_resize as batched

    monkeypatch.setattr(batched, "PAD_ELEMENTS", 3 * 60 * 70 * 3)
    g = torch.Generator().manual_seed(1)
    shapes = [(37, 53), (53, 37), (24, 24), (90, 61), (16, 19), (25, 30), (70, 200)]
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in shapes]
    interpolation = T.InterpolationMode(mode)
    for resize, crop in ((24, [24, 24]), (30, [20, 26]), ([24, 40], None)):
        pre = DevicePreprocess(resize, interpolation, None, crop, (0.5,) * 3, (0.5,) * 3)
        got = pre._batched(images)
        assert got is not None
        expected = []
        for x_CHW in images:
            x_1CHW = pre._resize(x_CHW.unsqueeze(0).float())
            expected.append(x_1CHW if crop is None else pre._center_crop(x_1CHW))
        torch.testing.assert_close(got, torch.cat(expected), rtol=0, atol=2e-3)


def test_batched_resize_leaves_what_it_cannot_do_to_the_per_image_path() -> None:
    images = [torch.zeros(3, 30, 40, dtype=torch.uint8), torch.zeros(3, 40, 30, dtype=torch.uint8)]
    bicubic = T.InterpolationMode.BICUBIC
    assert DevicePreprocess(24, T.InterpolationMode.NEAREST, None, [24], (0.5,) * 3, (0.5,) * 3)._batched(
        images
    ) is None  # fmt: skip
    assert DevicePreprocess(24, bicubic, None, None, (0.5,) * 3, (0.5,) * 3)._batched(images) is None
    assert DevicePreprocess(20, bicubic, None, [24], (0.5,) * 3, (0.5,) * 3)._batched(images) is None
    padded = DevicePreprocess(20, bicubic, None, [24], (0.5,) * 3, (0.5,) * 3)(images)  # torchvision pads
    assert padded.shape == (2, 3, 24, 24)


def test_packed_jpegs_round_trip(folder: ImageFolder) -> None:
    """A worker packs a batch's JPEG bytes into one tensor; the main process gets every file's bytes back,
    other entries (PIL fallbacks, errors) unchanged and in order."""
    from mmsae.datasets.gpu_decode import EncodedJpeg, pack_jpegs

    items = []
    for i, path in enumerate(folder.paths):
        jpeg = read_jpeg(path)
        items.append((i, jpeg, None) if jpeg is not None else (i, None, {"index": i, "reason": "x"}))
    packed = pack_jpegs(items)
    assert packed.blob.dtype == torch.uint8 and packed.blob.ndim == 1
    back = packed.unpack()
    assert [(i, err) for i, _, err in back] == [(i, err) for i, _, err in items]
    for (_, a, _), (_, b, _) in zip(items, back):
        if isinstance(a, EncodedJpeg):
            assert torch.equal(a.data, b.data)
        else:
            assert b is a
    assert pack_jpegs([(0, None, {"reason": "x"})]).unpack() == [(0, None, {"reason": "x"})]


def test_device_decoding_runs_one_batch_ahead_in_order(
    encoders: dict[str, Encoder], folder: ImageFolder
) -> None:
    """`input_batches(decode='device')` decodes the next batch in a thread: batches still come in order,
    equal to decoding them one by one, and a decoder error reaches the caller."""
    from mmsae.inputs import DeviceDecoder, JpegFiles, decoded_ahead, input_batches, pack_jpegs

    encoder = encoders["timm:test_vit"]
    index_batches = [[0, 1, 2], [3, 4], [5, 6, 7, 8], [9, 10, 11]]
    got = list(input_batches(encoder, folder, index_batches, "image", decode="device"))
    files, decoder = JpegFiles(folder, encoder), DeviceDecoder(folder, encoder)
    want = [decoder(pack_jpegs([files[i] for i in b])) for b in index_batches]
    assert [b.indices for b in got] == [b.indices for b in want]
    for a, b in zip(got, want):
        assert (a.inputs is None) == (b.inputs is None)
        if a.inputs is not None:
            torch.testing.assert_close(a.inputs, b.inputs, rtol=0, atol=0)

    def broken(packed: object) -> object:
        raise RuntimeError("decoder failed")

    with pytest.raises(RuntimeError, match="decoder failed"):
        list(decoded_ahead(broken, [pack_jpegs([files[0]])]))  # type: ignore[arg-type]
