"""Gradio apps: handlers on tiny random-init models and a tiny index, input guards, the CLI, and each app
served on localhost and driven through gradio_client."""

from __future__ import annotations

import os
import struct
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmsae.apps.common import (
    FILE_LIFETIME_S,
    AppSettings,
    FeatureCatalog,
    InputError,
    image_dirs,
    open_app_image,
)
from mmsae.apps.search import SearchHandlers, build_search_app, overlay
from mmsae.apps.steer import SteerHandlers, build_steer_app, mask_from_editor
from mmsae.apps.unlearn import UnlearnAppConfig, UnlearnHandlers, build_unlearn_app
from mmsae.encoders import get_encoder
from mmsae.index import ConceptIndex, IndexConfig
from mmsae.sae import build_sae

CLIP_HOOK = "visual.transformer.resblocks.1"
UNET_HOOK = "up_blocks.0.attentions.1"  # Transformer2DModel output of the tiny SD UNet, d=8
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "brick", "camera")


@pytest.fixture(scope="module")
def photos(write_photos) -> Path:
    return write_photos(PHOTOS)


@pytest.fixture(scope="module")
def settings(photos) -> AppSettings:
    return AppSettings(data_dirs=[photos])


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return get_encoder("clip:tiny")


@pytest.fixture(scope="module")
def index(photos, clip) -> ConceptIndex:
    torch.manual_seed(0)
    sae = build_sae("topk", 32, 64, k=4, hook=CLIP_HOOK, encoder=clip.id)
    return ConceptIndex.build(clip, sae, photos, cfg=IndexConfig(batch_size=6))


@pytest.fixture(scope="module")
def unet():
    return get_encoder("unet:tiny")


@pytest.fixture(scope="module")
def unet_sae(unet):
    torch.manual_seed(0)
    return build_sae("topk", 8, 32, k=4, hook=UNET_HOOK, encoder=unet.id)


@pytest.fixture(scope="module")
def search(index, settings) -> SearchHandlers:
    return SearchHandlers(index, settings)


@pytest.fixture(scope="module")
def clip_steer(index, clip, settings) -> SteerHandlers:
    return SteerHandlers(clip, index.sae, settings, FeatureCatalog.from_index(index))


@pytest.fixture(scope="module")
def unlearn(unet, unet_sae, settings) -> UnlearnHandlers:
    return UnlearnHandlers(unet, unet_sae, settings, cfg=UnlearnAppConfig(n_other_prompts=4))


def live_feature(index: ConceptIndex) -> int:
    """A feature that fires on some but not all indexed images (so filters have an effect)."""
    counts = [len(index.codes.images_with(f)) for f in range(index.sae.n_features)]
    return next(f for f, c in enumerate(counts) if 0 < c < len(index))


# ---------------------------------------------------------------- common: input guards, feature catalog
def bomb_png(path: Path, width: int, height: int) -> Path:
    """A valid 1×1 PNG whose header claims width×height pixels (a decompression bomb, in 70 bytes)."""
    Image.new("RGB", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data[12:29]  # b"IHDR" + 13 bytes of header fields
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(data))
    return path


def test_load_image_guards(photos, tmp_path) -> None:
    assert open_app_image(photos / "coffee.png", [photos]).mode == "RGB"
    with pytest.raises(InputError, match="outside the app's data directories"):
        open_app_image(photos / ".." / "elsewhere.png", [photos])
    with pytest.raises(InputError, match="too many pixels"):
        open_app_image(bomb_png(tmp_path / "bomb.png", 30_000, 30_000), [tmp_path])
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="not an image file"):
        open_app_image(tmp_path / "notes.txt", [tmp_path])
    with pytest.raises(InputError, match="larger than 1 MB"):
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (800, 800, 3), np.uint8)).save(
            tmp_path / "big.png"
        )
        open_app_image(tmp_path / "big.png", [tmp_path], max_mb=1)
    with pytest.raises(InputError, match="No image given"):
        open_app_image(None, [photos])


def test_image_dirs_never_widen_to_a_common_root(tmp_path) -> None:
    a, b = tmp_path / "a", tmp_path / "a" / "sub"
    assert image_dirs([str(a / "1.png"), str(b / "2.png"), "/srv/x/3.png"]) == [Path("/srv/x"), a.resolve()]


def test_result_images_expire(monkeypatch) -> None:
    """A server that runs for weeks must not fill its disk with result images: files older than
    FILE_LIFETIME_S go as new ones are written (at most once per tenth of it)."""
    from mmsae.apps import common

    first = Path(common.image_file(Image.new("RGB", (4, 4), "red")))
    old = time.time() - FILE_LIFETIME_S - 1
    os.utime(first, (old, old))
    monkeypatch.setattr(common, "_next_prune", 0.0)
    second = Path(common.image_file(Image.new("RGB", (4, 4), "blue")))
    assert second.is_file() and not first.exists()
    os.utime(second, (old, old))  # within a tenth of the lifetime of the last prune: no scan yet
    common.image_file(Image.new("RGB", (4, 4), "green"))
    assert second.is_file()
    assert Path(common.image_file(Image.new("RGB", (4, 4), "blue"))) == second  # handed out again:
    monkeypatch.setattr(common, "_next_prune", 0.0)
    common.image_file(Image.new("RGB", (4, 4), "green"))
    assert second.is_file()  # it lives another lifetime from then


def test_feature_catalog(index) -> None:
    catalog = FeatureCatalog.from_index(index)
    named = next(i for i, n in enumerate(catalog.names) if n)
    assert catalog.find("7") == [7] and catalog.parse("#7 cat") == 7 and catalog.parse(7.0) == 7
    assert named in catalog.find(catalog.names[named])
    assert len(catalog.find("a photo of something new", k=3)) == 3  # semantic fallback through the index
    assert catalog.resolve("3, 5,") == [3, 5]
    with pytest.raises(InputError, match="does not exist"):
        catalog.parse(64)
    with pytest.raises(InputError, match="not a feature"):
        catalog.parse("cat")


# ---------------------------------------------------------------- search handlers
def test_search_text_and_image(search, index, photos) -> None:
    gallery, ids, status = search.search("a photo of a cat", None, 4, "off", "")
    text = index.embedder.encode_text(["a photo of a cat"])[0].detach().numpy()
    assert ids == np.argsort(-(index.embeddings_NE @ text))[:4].tolist()
    assert len(gallery) == 4 and max(Image.open(gallery[0][0]).size) <= 256 and "4 images" in status
    gallery, ids, _ = search.search("", str(photos / "rocket.png"), 3, "off", "")
    assert index.paths[ids[0]].endswith("rocket.png") and gallery[0][1].endswith("1.000")


def test_search_concept_filter(search, index) -> None:
    f = live_feature(index)
    on = set(index.codes.images_with(f).tolist())
    _, with_ids, status = search.search("a dog", None, 10, "with", str(f))
    _, without_ids, _ = search.search("a dog", None, 10, "without", f"#{f}")
    assert set(with_ids) == on and set(without_ids) == set(range(len(index))) - on
    assert f"with #{f}" in status


def test_search_bad_input(search) -> None:
    with pytest.raises(InputError, match="text query or upload"):
        search.search("  ", None, 4, "off", "")
    with pytest.raises(InputError, match="needs features"):
        search.search("a cat", None, 4, "with", "")
    with pytest.raises(InputError, match="outside"):
        search.search("", "/etc/hostname", 4, "off", "")
    with pytest.raises(InputError, match="not in the index"):
        search.image_features(99)


def test_image_features_and_feature_images(search, index) -> None:
    picture, table, heatmaps, feature_ids = search.image_features(1, k=5)
    assert table and len(table) <= 5 and [row[0] for row in table][: len(heatmaps)] == feature_ids
    assert sum(row[3] for row in table) <= 1 + 1e-3 and len(heatmaps) == min(len(table), 6)
    assert max(picture.size) == 384 and max(heatmaps[0][0].size) == 192  # thumbnails, not originals
    _, ids, title = search.feature_images(str(feature_ids[0]), 10)
    assert 1 in ids and title.startswith(f"Feature #{feature_ids[0]}")
    assert [h.id for h in index.images_of(feature_ids[0], 10)] == ids


def test_overlay_marks_where_the_feature_fires() -> None:
    base = Image.new("RGB", (64, 32), (128, 128, 128))
    heat_HW = np.zeros((2, 4), np.float32)
    heat_HW[0, 0] = 3.0  # only the top-left patch fires
    out = np.asarray(overlay(base, heat_HW), np.float32)
    assert out.shape == (32, 64, 3) and out[2, 2].sum() > out[-2, -2].sum() + 100  # hot = bright (inferno)


# ---------------------------------------------------------------- steering handlers
def test_clip_steering(clip_steer, index, photos) -> None:
    max_acts = clip_steer.max_acts()  # measured lazily over the data-directory photos
    assert max_acts.shape == (64,) and (max_acts > 0).any()
    f = int(max_acts.argmax())
    before, after, summary = clip_steer.steer_image(
        str(photos / "chelsea.png"), "cat, dog, car", f, 10.0, None, 0, "", 0
    )
    assert set(before) == {"cat", "dog", "car"} and sum(before.values()) == pytest.approx(1, abs=1e-4)
    assert before != after and "Cosine" in summary
    updates = clip_steer.find_features(str(f))
    assert len(updates) == 3 and updates[0]["choices"][0][1] == str(f)
    with pytest.raises(InputError, match="at least one feature"):
        clip_steer.steer_image(str(photos / "chelsea.png"), "cat, dog", None, 1.0, "", 1.0, None, 1.0)
    with pytest.raises(InputError, match=r"Strength 1 must lie within -10…10, got 12\.0"):
        clip_steer.steer_image(str(photos / "chelsea.png"), "cat, dog", f, 12.0, None, 0, None, 0)
    with pytest.raises(InputError, match="two comma-separated labels"):
        clip_steer.steer_image(str(photos / "chelsea.png"), "cat", f, 1.0, None, 0, None, 0)


def test_llava_steering(photos, settings) -> None:
    llava = get_encoder("llava:tiny")
    sae = build_sae("topk", 16, 32, k=4, hook=llava.default_hook, encoder=llava.id)
    h = SteerHandlers(llava, sae, settings)
    f = int(h.max_acts().argmax())
    before, after = h.steer_llava(str(photos / "coffee.png"), "Describe.", 6, f, 10.0, None, 0, None, 0)
    assert isinstance(before, str) and isinstance(after, str) and before != after


def test_diffusion_steering(unet, unet_sae, settings) -> None:
    h = SteerHandlers(unet, unet_sae, settings)
    f = int(h.max_acts().argmax())  # over the bundled demo prompts
    before, after = h.steer_diffusion("a red cat", 1, 2, 0, 999, None, f, 10.0, None, 0, None, 0)
    assert before.size == after.size and not np.array_equal(np.asarray(before), np.asarray(after))
    layer = np.zeros((64, 64, 4), np.uint8)
    layer[:32, :, 3] = 255  # paint the top half
    mask = mask_from_editor({"background": None, "layers": [layer], "composite": None})
    assert mask.shape == (64, 64) and mask.sum() == 32 * 64
    assert mask_from_editor({"background": None, "layers": [np.zeros((8, 8, 4), np.uint8)]}) is None
    _, masked = h.steer_diffusion("a red cat", 1, 2, 0, 999, {"layers": [layer]}, f, 10.0, None, 0, None, 0)
    pixels = [np.asarray(im, np.float32) for im in (before, after, masked)]
    # the mask restricts the edit: the result is neither the bare sample nor the everywhere-steered one
    assert not np.array_equal(pixels[2], pixels[0]) and not np.array_equal(pixels[2], pixels[1])
    with pytest.raises(ValueError, match="contains none"):
        h.steer_diffusion("a red cat", 1, 2, 600, 900, None, f, 10.0, None, 0, None, 0)  # steps: 501, 1


# ---------------------------------------------------------------- unlearning handlers
def test_unlearn_select_and_generate(unlearn) -> None:
    rows, summary = unlearn.select("Cat", 90.0)
    assert rows and all(r[0].isdigit() for r in rows) and "feature(s)" in summary
    assert unlearn.selection("cat", 90.0) is unlearn.selection(" CAT ", 90.0)  # cached, not re-selected
    before, after, rows2, _ = unlearn.generate("cat", "a cat on a sofa", 90.0, -30.0, 3)
    assert rows2 == rows and before.size == after.size
    assert not np.array_equal(np.asarray(before), np.asarray(after))
    with pytest.raises(InputError, match="negative"):
        unlearn.generate("cat", "a cat", 90.0, 2.0, 0)
    with pytest.raises(InputError, match="Type a concept"):
        unlearn.select(" ", 90.0)
    with pytest.raises(InputError, match="strictly between"):
        unlearn.select("cat", 100.0)


def test_unlearn_needs_a_diffusion_encoder(clip, index, settings) -> None:
    with pytest.raises(ValueError, match="diffusion encoder"):
        UnlearnHandlers(clip, index.sae, settings)


# ---------------------------------------------------------------- CLI
def test_cli_builds_each_app(index, unet_sae, photos, tmp_path, capsys) -> None:
    import gradio as gr

    from mmsae.apps.cli import build_app, build_parser, cli_main
    from mmsae.checkpoint import save_sae

    index_dir = index.save(tmp_path / "index")
    save_sae(index.sae, tmp_path / "clip_sae")
    sae_dir = str(tmp_path / "clip_sae")
    args = build_parser().parse_args(["search", "--sae", sae_dir, "--index", str(index_dir)])
    assert args.host == "127.0.0.1"
    demo, settings = build_app(args)
    assert isinstance(demo, gr.Blocks) and settings.host == "127.0.0.1" and settings.data_dirs == []
    args = build_parser().parse_args(
        [
            "steer",
            "--sae",
            str(tmp_path / "clip_sae"),
            "--index",
            str(index_dir),
            "--host",
            "0.0.0.0",
            "--data-dir",
            str(photos),
        ]
    )
    demo, settings = build_app(args)
    assert settings.host == "0.0.0.0" and settings.data_dirs == [photos.resolve()]
    assert demo.delete_cache == (FILE_LIFETIME_S // 10, FILE_LIFETIME_S)  # Gradio's copies expire
    assert cli_main(["search", "--sae", str(tmp_path / "clip_sae")]) == 2
    assert "--index" in capsys.readouterr().err
    assert cli_main(["steer", "--sae", str(tmp_path / "clip_sae"), "--data-dir", str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err


# ---------------------------------------------------------------- on localhost, driven by gradio_client
@pytest.fixture(scope="module")
def served(index, clip, unet, unet_sae, settings):
    """The three apps on 127.0.0.1 (one server each); yields their URLs."""
    demos = {
        "search": build_search_app(index, settings),
        "steer": build_steer_app(clip, index.sae, settings, FeatureCatalog.from_index(index)),
        "unlearn": build_unlearn_app(unet, unet_sae, settings, cfg=UnlearnAppConfig(n_other_prompts=4)),
    }
    urls = {
        name: demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)[1]
        for name, demo in demos.items()
    }
    yield urls
    for demo in demos.values():
        demo.close()


def test_client_search(served, index, photos) -> None:
    from gradio_client import Client, handle_file

    system_tmp = Path(os.environ.get("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir()))  # see conftest
    before = set(system_tmp.iterdir())
    client = Client(served["search"], verbose=False)
    assert served["search"].startswith("http://127.0.0.1:")
    # gr.State outputs stay on the server: the API returns the gallery and the status line
    gallery, status = client.predict("a photo of a cat", None, 3, "off", "", api_name="/search")
    assert len(gallery) == 3 and Path(gallery[0]["image"]).is_file() and "3 images" in status
    gallery, _ = client.predict("", handle_file(str(photos / "brick.png")), 2, "off", "", api_name="/search")
    assert gallery[0]["caption"].startswith(f"{index.paths.index(str(photos / 'brick.png'))}:")
    _, table, heatmaps = client.predict(0, api_name="/image_features")
    assert table["data"] and len(heatmaps) == min(len(table["data"]), 6)
    top, title = client.predict(str(table["data"][0][0]), 4, api_name="/feature_images")
    assert top and title.startswith("Feature #")
    with pytest.raises(Exception, match="text query or upload"):
        client.predict("", None, 3, "off", "", api_name="/search")
    # gradio_client leaves a folder per downloaded file in the temporary folder: not the system's
    assert {p for p in set(system_tmp.iterdir()) - before if not p.name.startswith("pytest-")} == set()


def test_client_steer_and_unlearn(served, photos) -> None:
    from gradio_client import Client, handle_file

    steer = Client(served["steer"], verbose=False)
    before, after, summary = steer.predict(
        handle_file(str(photos / "chelsea.png")), "cat, dog", "0", 8.0, None, 0, None, 0, api_name="/steer"
    )
    assert {c["label"] for c in before["confidences"]} == {"cat", "dog"} and "Cosine" in summary
    unlearn = Client(served["unlearn"], verbose=False)
    rows, summary = unlearn.predict("cat", 90.0, api_name="/select")
    assert rows["data"] and "feature(s)" in summary
    before, after, _, _ = unlearn.predict("cat", "a cat", 90.0, -30.0, 0, api_name="/generate")
    assert Path(before).is_file() and Path(after).is_file()
