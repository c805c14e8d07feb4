"""The unlearning app on an image classifier (tiny random-init timm ViT): class selection on the app's
images, before/after predictions by class name, input guards, and the app's layout. The real effect on
the zoo's MobileNetV2 is checked in test_effects.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmsae.apps.common import AppSettings, InputError
from mmsae.apps.steer import top_classes
from mmsae.apps.unlearn import build_unlearn_app
from mmsae.apps.unlearn_classifier import ClassifierUnlearnHandlers, named_top_classes
from mmsae.encoders import get_encoder
from mmsae.sae import build_sae

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "brick", "camera")
HOOK = "blocks.1"


@pytest.fixture(scope="module")
def photos(write_photos) -> Path:
    return write_photos(PHOTOS)


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return get_encoder("timm:test_vit")


@pytest.fixture(scope="module")
def handlers(vit, photos) -> ClassifierUnlearnHandlers:
    torch.manual_seed(0)
    sae = build_sae("topk", 64, 128, k=8, hook=HOOK, encoder=vit.id)
    return ClassifierUnlearnHandlers(vit, sae, AppSettings(data_dirs=[photos]))


def a_class_of_some_images(h: ClassifierUnlearnHandlers) -> str:
    """A class the classifier gives to some of the app's images but not all (selection needs both)."""
    _, probs_NK = h.image_probs()
    tops = probs_NK.argmax(-1)
    assert len(set(tops.tolist())) > 1, "the tiny classifier gives every photo one class"
    return h.classifier.class_names[int(tops[0])]


def test_unlearn_a_class_by_name(handlers, photos) -> None:
    name = a_class_of_some_images(handlers)
    rows, summary = handlers.describe(name.upper(), 90.0)  # class names match case-insensitively
    assert rows and all(r[0].isdigit() for r in rows) and f"feature(s) of {name!r}" in summary
    before, after, table, summary = handlers.predict(name, str(photos / "chelsea.png"), 90.0, -5.0)
    assert set(before) <= set(handlers.classifier.class_names) and len(before) == 5
    assert set(after) <= set(handlers.classifier.class_names)
    assert table == rows and f"p({name}) on this image" in summary and "keep their top-1" in summary
    assert before != after  # the blocked features are spliced into the forward


def test_unlearn_bad_input(handlers, photos) -> None:
    name = a_class_of_some_images(handlers)
    chelsea = str(photos / "chelsea.png")
    with pytest.raises(InputError, match="not a class"):
        handlers.describe("no such class at all", 90.0)
    with pytest.raises(InputError, match="Type a class"):
        handlers.describe("  ", 90.0)
    unused = next(c for c in handlers.classifier.class_names if c not in a_class_names(handlers))
    with pytest.raises(InputError, match="calls 0 of the app's 6 images"):
        handlers.describe(unused, 90.0)
    with pytest.raises(InputError, match="strictly between 0 and 100"):
        handlers.describe(name, 100.0)
    with pytest.raises(InputError, match="must be negative"):
        handlers.predict(name, chelsea, 90.0, 2.0)
    with pytest.raises(InputError, match="outside the app's data directories"):
        handlers.predict(name, "/etc/hostname", 90.0, -5.0)


def a_class_names(h: ClassifierUnlearnHandlers) -> set[str]:
    _, probs_NK = h.image_probs()
    return {h.classifier.class_names[i] for i in probs_NK.argmax(-1).tolist()}


def test_unlearn_needs_images(vit, handlers) -> None:
    bare = ClassifierUnlearnHandlers(vit, handlers.sae, AppSettings())
    with pytest.raises(InputError, match="--data-dir"):
        bare.describe("tench", 90.0)


def test_app_layout_follows_the_encoder(vit, handlers, photos) -> None:
    demo = build_unlearn_app(vit, handlers.sae, AppSettings(data_dirs=[photos]))
    ids = {c.get("props", {}).get("elem_id") for c in demo.get_config_file()["components"]}
    assert {"unlearn-concept", "unlearn-image", "unlearn-before", "unlearn-after"} <= ids
    assert "unlearn-prompt" not in ids  # the diffusion layout's prompt box


def test_class_labels_by_name() -> None:
    logits = torch.tensor([0.0, 3.0, 1.0])
    assert list(top_classes(logits, k=2, names=["a", "b", "c"])) == ["b", "c"]
    assert list(top_classes(logits, k=2)) == ["class 1", "class 2"]  # a head without class names
    assert list(named_top_classes(logits.softmax(-1), ["a", "b", "c"], k=1)) == ["b"]
