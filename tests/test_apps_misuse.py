"""The apps under misuse: every user-controlled size bounded with a clear message, the model lock honoured,
friendly errors for bad uploads over HTTP, high-bit-depth uploads scaled, and the random-weights banner."""

from __future__ import annotations

import threading
import time

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

# The apps' fixtures (tiny models, tiny index) are shared with the handler tests.
from test_apps import bomb_png, clip, index, photos, settings, unet, unet_sae  # noqa: F401

from mmsae.apps.common import MODEL_LOCK, AppSettings, FeatureCatalog, InputError, open_app_image, user_errors
from mmsae.apps.search import SearchHandlers, build_search_app
from mmsae.apps.steer import SteerHandlers, build_steer_app
from mmsae.apps.unlearn import UnlearnAppConfig, UnlearnHandlers, build_unlearn_app
from mmsae.encoders import get_encoder
from mmsae.sae import build_sae

HUGE = "x" * 1_000_000  # a 1 MB field


@pytest.fixture(scope="module")
def search(index, settings) -> SearchHandlers:  # noqa: F811
    return SearchHandlers(index, settings)


@pytest.fixture(scope="module")
def clip_steer(index, clip, settings) -> SteerHandlers:  # noqa: F811
    return SteerHandlers(clip, index.sae, settings, FeatureCatalog.from_index(index))


@pytest.fixture(scope="module")
def diffusion_steer(unet, unet_sae, settings) -> SteerHandlers:  # noqa: F811
    return SteerHandlers(unet, unet_sae, settings)


@pytest.fixture(scope="module")
def unlearn(unet, unet_sae, settings) -> UnlearnHandlers:  # noqa: F811
    return UnlearnHandlers(unet, unet_sae, settings, cfg=UnlearnAppConfig(n_other_prompts=4))


def refused(fn, match: str, *args, within_s: float = 1.0) -> None:
    """`fn(*args)` raises InputError matching `match` quickly, with a message that echoes no huge input."""
    start = time.perf_counter()
    with pytest.raises(InputError, match=match) as info:
        fn(*args)
    assert time.perf_counter() - start < within_s
    assert len(str(info.value)) < 300


# ---------------------------------------------------------------- bounds
def test_steering_labels_are_bounded_before_any_model_work(clip_steer, photos) -> None:  # noqa: F811
    """10,000 labels were encoded in one CLIP text batch under the model lock (minutes, 9 GB)."""
    image = str(photos / "chelsea.png")
    many = ", ".join(f"label{i}" for i in range(10_000))
    refused(
        clip_steer.steer_image, r"Zero-shot labels has 108,888 characters; the limit is", image, many, 0, 1.0
    )
    too_many = ", ".join(f"l{i}" for i in range(33))
    refused(
        clip_steer.steer_image, r"Zero-shot labels has 33 entries; the limit is 32", image, too_many, 0, 1.0
    )
    refused(clip_steer.steer_image, r"is longer than 60 characters", image, f"cat, {'y' * 61}", 0, 1.0)


@pytest.mark.parametrize("strength", [float("nan"), float("inf"), "1e999"])
def test_steering_strengths_must_be_finite(clip_steer, photos, strength) -> None:  # noqa: F811
    refused(
        clip_steer.steer_image,
        r"Strength 1 must lie within -10…10",
        str(photos / "chelsea.png"),
        "cat, dog",
        0,
        strength,
    )


def test_diffusion_steering_bounds(diffusion_steer) -> None:
    steer = diffusion_steer.steer_diffusion
    refused(steer, r"The prompt has 1,000,000 characters; the limit is 500", HUGE, 0, 2, 0, 999, None, 0, 1.0)
    refused(steer, r"Seed must lie within 0…4294967295, got 10{30}\.", "a cat", 10**30, 2, 0, 999, None)
    refused(steer, r"Steps must lie within 1…100", "a cat", 0, 10**6, 0, 999, None, 0, 1.0)
    refused(steer, r"Timestep window: to must lie within 600…999", "a cat", 0, 2, 600, 500, None, 0, 1.0)
    refused(steer, r"Strength 1 must lie within", "a cat", 0, 2, 0, 999, None, 0, float("nan"))


def test_llava_steering_bounds(photos, settings) -> None:  # noqa: F811
    llava = get_encoder("llava:tiny")
    h = SteerHandlers(llava, build_sae("topk", 16, 32, k=4, hook=llava.default_hook), settings)
    image = str(photos / "coffee.png")
    refused(h.steer_llava, r"Max new tokens must lie within 1…128", image, "Describe.", 10**6, 0, 1.0)
    refused(h.steer_llava, r"The prompt has 1,000,000 characters", image, HUGE, 8, 0, 1.0)


def test_unlearning_bounds(unlearn) -> None:
    refused(
        unlearn.generate,
        r"Multiplier must lie within -100…100, got nan",
        "cat",
        "a cat",
        90.0,
        float("nan"),
        0,
    )
    refused(unlearn.generate, r"Seed must lie within 0…", "cat", "a cat", 90.0, -5.0, 10**30)
    refused(unlearn.generate, r"The prompt has 1,000,000 characters", "cat", HUGE, 90.0, -5.0, 0)
    refused(unlearn.select, r"The concept has 1,000,000 characters; the limit is 60", HUGE, 90.0)
    refused(unlearn.select, r"Percentile must lie within 0…100", "cat", float("nan"))


def test_search_bounds(search) -> None:
    refused(search.search, r"Results must lie within 1…64, got 1000000", "a cat", None, 10**6, "off", "")
    refused(search.search, r"Results must lie within 1…64, got -2", "a cat", None, -2, "off", "")
    refused(search.search, r"The text query has 1,000,000 characters", HUGE, None, 4, "off", "")
    refused(
        search.search, r"feature list has 17 entries; the limit is 16", "a cat", None, 4, "with", "1," * 17
    )
    refused(search.search, r"The feature list has 1,000,000 characters", "a cat", None, 4, "with", HUGE)
    refused(search.image_features, r"Features must lie within 1…64", 0, 10**6)
    refused(search.feature_images, r"Results must lie within 1…64", "0", 10**9)


# ---------------------------------------------------------------- messages
def test_user_errors_keep_quotes_and_never_echo_a_huge_input(index) -> None:  # noqa: F811
    """str(e).strip("'\\"") cut quotes off messages; a 1 MB input came back whole."""

    def quoted() -> None:
        raise InputError("'cat' matches no feature: try 'dog'")

    def missing_key() -> None:
        raise KeyError('no encoder "clip:x"')

    for fn, message in (
        (quoted, "'cat' matches no feature: try 'dog'"),
        (missing_key, 'no encoder "clip:x"'),
    ):
        with pytest.raises(gr.Error) as info:
            user_errors(fn)()
        assert info.value.message == message
    catalog = FeatureCatalog.from_index(index)
    for bad in (HUGE, "9" * 1_000_000, "1e999"):
        with pytest.raises(gr.Error) as info:
            user_errors(catalog.parse)(bad)
        assert len(info.value.message) < 200
    with pytest.raises(gr.Error) as info:
        user_errors(catalog.resolve)(HUGE)
    assert len(info.value.message) < 200


# ---------------------------------------------------------------- the model lock
def blocks_on_the_model_lock(fn) -> bool:
    """Whether `fn()` waits while the model lock is held, then completes once it is released."""
    done = threading.Event()
    worker = threading.Thread(target=lambda: (fn(), done.set()), daemon=True)
    with MODEL_LOCK:
        worker.start()
        waited = not done.wait(0.5)
    return waited and done.wait(60)


def test_model_forwards_outside_handlers_take_the_lock(index, clip, settings) -> None:  # noqa: F811
    """A forward while another request's steering edit hooks the model would be steered too."""
    catalog = FeatureCatalog.from_index(index)
    assert blocks_on_the_model_lock(lambda: catalog.find("a photo of something new", k=3))
    fresh = SteerHandlers(clip, index.sae, settings)  # max activations not yet measured
    assert blocks_on_the_model_lock(fresh.max_acts)


# ---------------------------------------------------------------- images
def test_high_bit_depth_uploads_are_scaled(tmp_path) -> None:
    ramp = np.tile(np.linspace(0, 65535, 64), (16, 1)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    Image.fromarray((ramp / 65535).astype(np.float32)).save(tmp_path / "ramp.tif")
    expected = np.rint(np.linspace(0, 255, 64))
    for name in ("ramp16.png", "ramp.tif"):
        got = np.asarray(open_app_image(tmp_path / name, [tmp_path]))[0, :, 1]
        np.testing.assert_allclose(got, expected, atol=1)
    got = np.asarray(open_app_image(ramp, [tmp_path]))[0, :, 1]  # an array keeps its 16-bit values
    np.testing.assert_allclose(got, expected, atol=1)


@pytest.fixture(scope="module")
def served_search(index, clip, settings):  # noqa: F811
    """The search and steer apps in one process on 127.0.0.1; yields their URLs."""
    demos = [
        build_search_app(index, settings),
        build_steer_app(clip, index.sae, settings, FeatureCatalog.from_index(index)),
    ]
    urls = [demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)[1] for demo in demos]
    yield urls
    for demo in demos:
        demo.close()


def test_bad_uploads_get_the_reason_over_http(served_search, tmp_path) -> None:
    """gr.Image opened uploads before the handler: the client saw only 'The upstream Gradio app has
    raised an exception'."""
    from gradio_client import Client, handle_file

    (tmp_path / "notes.png").write_text("not an image at all")
    bomb = bomb_png(tmp_path / "bomb.png", 30_000, 30_000)
    search, steer = (Client(url, verbose=False) for url in served_search)
    cases = (
        (tmp_path / "notes.png", "notes.png: not an image file"),
        (bomb, "bomb.png: too many pixels: .*more than the limit"),
    )
    for path, message in cases:
        with pytest.raises(Exception, match=message):
            search.predict("", handle_file(str(path)), 3, "off", "", api_name="/search")
        with pytest.raises(Exception, match=message):
            steer.predict(handle_file(str(path)), "cat, dog", "0", 1.0, None, 0, None, 0, api_name="/steer")


# ---------------------------------------------------------------- what the pages say
def markdown_of(demo: gr.Blocks) -> str:
    return "\n".join(
        str(c["props"].get("value", ""))
        for c in demo.get_config_file()["components"]
        if c["type"] == "markdown"
    )


def test_random_weights_banner_and_a_readable_subtitle(index, clip, unet, unet_sae, photos) -> None:  # noqa: F811
    real, random = AppSettings(data_dirs=[photos]), AppSettings(data_dirs=[photos], random_weights=True)
    for build in (
        lambda s: build_search_app(index, s),
        lambda s: build_steer_app(clip, index.sae, s),
        lambda s: build_unlearn_app(unet, unet_sae, s),
    ):
        assert "Random weights" in markdown_of(build(random))
        assert "Random weights" not in markdown_of(build(real))
    subtitle = markdown_of(build_search_app(index, real))
    assert "ConceptIndex(" not in subtitle and "6 images, 64 SAE features on `clip:tiny`" in subtitle


def test_cli_passes_random_init_to_the_apps(index, tmp_path) -> None:  # noqa: F811
    from mmsae.apps.cli import build_app, build_parser
    from mmsae.checkpoint import save_sae

    save_sae(index.sae, tmp_path / "sae")
    index_dir = index.save(tmp_path / "index")
    for flags, expected in (([], False), (["--random-init"], True)):
        args = build_parser().parse_args(
            ["search", "--sae", str(tmp_path / "sae"), "--index", str(index_dir), *flags]
        )
        torch.manual_seed(0)
        _, app_settings = build_app(args)
        assert app_settings.random_weights is expected
