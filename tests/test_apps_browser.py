"""End to end: each app served on localhost, opened in headless Debian chromium, used once, screenshotted.

The apps run on the tiny random-init models of test_apps.py and the screenshots go to a temporary
folder, so running the tests never rewrites tracked files. The README's screenshots come from real
weights instead: `make screenshots` (tests/screenshots.py) drives the same apps on the zoo's MobileNetV2.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from headless import chromium, missing_browser, screenshot, wait_for

# The apps' fixtures (tiny models, tiny index, the three servers) are shared with the handler tests.
from test_apps import clip, index, photos, served, settings, unet, unet_sae  # noqa: F401

TRACKED = Path(__file__).resolve().parent.parent / "docs" / "screenshots"


@pytest.fixture(scope="module")
def browser() -> Iterator:
    missing = missing_browser()
    if missing:
        pytest.fail(
            f"Browser test needs {', '.join(missing)}: run `make test` (which installs them) or "
            "`apt-get install chromium chromium-driver`."
        )
    with chromium() as driver:
        yield driver


@pytest.mark.browser
def test_apps_in_chromium(browser, served, photos, tmp_path) -> None:  # noqa: F811
    tracked = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in TRACKED.glob("*.png")}
    # Concept search: a text query fills the gallery with thumbnails.
    browser.get(served["search"])
    wait_for(browser, "#search-text textarea")[0].send_keys("a photo of a cat")
    for elem in ("#search-image", "#search-gallery", "#search-features", "#search-heatmaps"):
        wait_for(browser, elem)
    wait_for(browser, "#search-go")[0].click()
    wait_for(browser, "#search-gallery img", count=3)
    assert "images for 'a photo of a cat'" in wait_for(browser, "#search-status")[0].text
    shots = [screenshot(browser, tmp_path, "search")]

    # Image steering: upload a photo, steer feature 0, both label panels filled.
    browser.get(served["steer"])
    wait_for(browser, "#steer-image")
    upload = browser.find_element("css selector", "#steer-image input[type=file]")
    upload.send_keys(str(photos / "chelsea.png"))
    wait_for(browser, "#steer-image img")
    wait_for(browser, "#steer-run")[0].click()
    for side in ("#steer-before", "#steer-after"):
        wait_for(browser, f"{side} .output-class")  # gr.Label's headline: the top label
    assert wait_for(browser, "#steer-feature-0")
    shots.append(screenshot(browser, tmp_path, "steer"))

    # Concept unlearning: generate the pair for the default concept and prompt.
    browser.get(served["unlearn"])
    wait_for(browser, "#unlearn-concept textarea")
    wait_for(browser, "#unlearn-generate")[0].click()
    wait_for(browser, "#unlearn-before img")
    wait_for(browser, "#unlearn-after img")
    assert "feature" in wait_for(browser, "#unlearn-summary")[0].text
    shots.append(screenshot(browser, tmp_path, "unlearn"))

    for path in shots:
        assert path.stat().st_size > 10_000  # a real rendering, not a blank page
    # the test suite leaves the tracked screenshots alone
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in TRACKED.glob("*.png")} == tracked
