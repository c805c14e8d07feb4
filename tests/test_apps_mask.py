"""The diffusion steering app's mask editor under bad uploads: every image it receives (background, layers,
composite; API file uploads and the browser's blob uploads) is opened by the project's image path, bounded
in bytes and pixels, and refused with a message naming the field, never Gradio's generic error."""

from __future__ import annotations

import time
import uuid

import gradio as gr
import httpx
import numpy as np
import pytest
import torch
from PIL import Image

# The apps' fixtures (tiny models) are shared with the handler tests.
from test_apps import bomb_png, photos, settings, unet, unet_sae  # noqa: F401

from mmsae.apps.common import AppSettings
from mmsae.apps.editor import PendingEdits
from mmsae.apps.steer import build_steer_app

GENERIC = "upstream Gradio app has raised an exception"


def editor_of(demo: gr.Blocks) -> gr.ImageEditor:
    return next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "steer-mask")


def preprocess(editor: gr.ImageEditor, payload: dict) -> dict:
    """What Gradio does with an event's editor input: validate it into EditorData, then preprocess."""
    return editor.preprocess(editor.data_model.from_json(payload))


def painted(path, size: int = 64) -> str:
    layer = np.zeros((size, size, 4), np.uint8)
    layer[: size // 2, :, 3] = 255  # the top half painted
    Image.fromarray(layer).save(path)
    return str(path)


def bad_files(tmp_path) -> list[tuple[str, str]]:
    """(file, the reason the message must give): a non-image, a truncated PNG, a 100k × 100k header."""
    (tmp_path / "notes.png").write_text("not an image at all")
    ok = tmp_path / "ok.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 4), np.uint8)).save(ok)
    (tmp_path / "cut.png").write_bytes(ok.read_bytes()[: ok.stat().st_size // 2])
    bomb = bomb_png(tmp_path / "bomb.png", 100_000, 100_000)
    return [
        (str(tmp_path / "notes.png"), "notes.png: not an image file"),
        (str(tmp_path / "cut.png"), "cut.png: cannot be decoded"),
        (str(bomb), "bomb.png: too many pixels"),
    ]


@pytest.fixture(scope="module")
def diffusion_app(unet, unet_sae, settings):  # noqa: F811
    """The diffusion steering app on 127.0.0.1 with the apps' launch settings; yields (demo, url)."""
    demo = build_steer_app(unet, unet_sae, settings, max_acts=torch.ones(unet_sae.cfg.n_features))
    kwargs = {**settings.launch_kwargs(), "server_name": "127.0.0.1"}
    _, url, _ = demo.queue().launch(prevent_thread_lock=True, quiet=True, **kwargs)
    yield demo, url
    demo.close()


def steer(client, mask) -> tuple[str, str]:
    return client.predict("a red cat", 1, 1, 0, 999, mask, "0", 5.0, None, 0, None, 0, api_name="/steer")


def test_bad_mask_uploads_get_the_reason_over_http(diffusion_app, tmp_path) -> None:
    """gr.ImageEditor opened every upload with PIL before the handler: the client saw only Gradio's
    generic error."""
    from gradio_client import Client, handle_file

    client = Client(diffusion_app[1], verbose=False)
    good = handle_file(painted(tmp_path / "mask.png"))
    before, after = steer(client, {"background": None, "layers": [good], "composite": None})
    assert before.endswith(".png") and after.endswith(".png")
    for path, reason in bad_files(tmp_path):
        for field, mask in (
            ("The mask's background", {"background": handle_file(path), "layers": [], "composite": None}),
            (
                "The mask's layer 2",
                {"background": None, "layers": [good, handle_file(path)], "composite": None},
            ),
            ("The mask's composite", {"background": None, "layers": [], "composite": handle_file(path)}),
        ):
            with pytest.raises(Exception, match=f"{field}: {reason}") as info:
                steer(client, mask)
            assert GENERIC not in str(info.value) and "Traceback" not in str(info.value)


def upload_blob(url: str, component_id: int, edit_id: str, kind: str, data: bytes, index: int | None = None):
    """What the browser's image editor does after every stroke: POST each image of the edit as a blob."""
    form = {
        "component_id": str(component_id),
        "session_hash": "blob-test",
        "fn_name": "accept_blobs",
        "id": edit_id,
        "type": kind,
        "index": "null" if index is None else str(index),
    }
    files = {"file": (f"{kind}.png", data, "image/png")}
    return httpx.post(f"{url.rstrip('/')}/gradio_api/component_server", data=form, files=files, timeout=30)


def test_browser_blob_uploads_are_opened_and_bounded(diffusion_app, tmp_path) -> None:
    """The browser sends the editor's images as blobs and then only an id: Gradio opened those with PIL
    (generic error) and grew its blob list to any layer index a request named."""
    from gradio_client import Client

    demo, url = diffusion_app
    client = Client(url, verbose=False)
    editor_id = editor_of(demo)._id
    good = open(painted(tmp_path / "mask.png"), "rb").read()  # noqa: SIM115
    edit = uuid.uuid4().hex
    assert upload_blob(url, editor_id, edit, "layer", good, index=0).status_code == 200
    before, _ = steer(client, {"id": edit, "background": None, "layers": [], "composite": None})
    assert before.endswith(".png")
    for path, reason in bad_files(tmp_path):
        edit = uuid.uuid4().hex
        upload_blob(url, editor_id, edit, "layer", good, index=0)
        upload_blob(url, editor_id, edit, "layer", open(path, "rb").read(), index=1)  # noqa: SIM115
        reason = reason.split(": ", 1)[1]  # a blob has no file name
        with pytest.raises(Exception, match=f"The mask's layer 2: {reason}") as info:
            steer(client, {"id": edit, "background": None, "layers": [], "composite": None})
        assert GENERIC not in str(info.value)
    start = time.perf_counter()
    response = upload_blob(url, editor_id, uuid.uuid4().hex, "layer", good, index=10**9)
    assert response.status_code == 400 and "layer" in response.json()["detail"]
    assert time.perf_counter() - start < 5
    as_json = {"component_id": editor_id, "session_hash": "x", "fn_name": "accept_blobs", "data": {}}
    response = httpx.post(f"{url.rstrip('/')}/gradio_api/component_server", json=as_json, timeout=30)
    assert response.status_code == 400 and "multipart" in response.json()["detail"]
    with pytest.raises(Exception, match="The mask's upload has expired"):
        steer(client, {"id": "never-uploaded", "background": None, "layers": [], "composite": None})


def test_mask_editor_scales_16_bit_images_and_bounds_layers(unet, unet_sae, photos, tmp_path) -> None:  # noqa: F811
    """Gradio converted a 16-bit upload with PIL's convert('RGBA'), clipping every value above 255."""
    # uploads reach preprocess from Gradio's upload folder; here from a data directory
    app_settings = AppSettings(data_dirs=[photos, tmp_path])
    demo = build_steer_app(unet, unet_sae, app_settings, max_acts=torch.ones(unet_sae.cfg.n_features))
    editor = editor_of(demo)
    ramp = np.tile(np.linspace(0, 65535, 64), (16, 1)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    ramp_file = {"path": str(tmp_path / "ramp16.png"), "orig_name": "ramp16.png"}
    value = preprocess(editor, {"background": ramp_file, "layers": [ramp_file], "composite": None})
    expected = np.rint(np.linspace(0, 255, 64))
    for image in (value["background"], value["layers"][0]):
        assert image.dtype == np.uint8 and image.shape == (16, 64, 4)
        np.testing.assert_allclose(image[0, :, 1], expected, atol=1)
        assert (image[..., 3] == 255).all()  # no alpha in the file: opaque
    mask = {"path": painted(tmp_path / "mask.png"), "orig_name": "mask.png"}
    value = preprocess(editor, {"background": None, "layers": [mask], "composite": None})
    assert value["layers"][0][..., 3].sum() == 32 * 64 * 255  # the painted half keeps its alpha
    with pytest.raises(gr.Error, match="at most 8 layers"):
        preprocess(editor, {"background": None, "layers": [mask] * 9, "composite": None})
    other = {"path": painted(tmp_path / "small.png", 32), "orig_name": "small.png"}
    with pytest.raises(gr.Error, match="The mask's layer 2 is 32×32 but layer 1 is 64×64"):
        preprocess(editor, {"background": None, "layers": [mask, other], "composite": None})


def test_pending_blob_uploads_are_bounded_in_bytes() -> None:
    """Every stroke uploads a new edit; only the one an event names is ever read, so the rest piled up."""
    pending = PendingEdits(max_bytes=1000)
    for i in range(100):
        pending.put(f"edit{i}", "layer", 0, b"x" * 300)
        pending.put(f"edit{i}", "composite", None, b"x" * 300)
    assert pending.pop("edit0") is None  # the oldest were dropped
    newest = pending.pop("edit99")
    assert newest is not None and newest.layers == {0: b"x" * 300} and newest.nbytes == 600
    pending.put("huge", "background", None, b"x" * 5000)  # the newest edit is kept even alone over the bound
    assert pending.pop("huge").nbytes == 5000 and pending.pop("edit98") is None
