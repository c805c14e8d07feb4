"""End to end: each app served on localhost, opened in headless Debian chromium, used once, screenshotted.

The screenshots go to a temporary folder, so running the tests never rewrites tracked files. `make
screenshots` runs this same test with MMSAE_SCREENSHOTS_DIR=docs/screenshots to regenerate the README's
screenshots, so they show what the test saw.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# The apps' fixtures (tiny models, tiny index, the three servers) are shared with the handler tests.
from test_apps import clip, index, photos, served, settings, unet, unet_sae  # noqa: F401

from mmsae.fileio import atomic_write_bytes

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SCREENSHOTS_ENV = "MMSAE_SCREENSHOTS_DIR"
TRACKED = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
WAIT_S = 60


@pytest.fixture(scope="module")
def browser() -> Iterator:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        pytest.fail(
            f"Browser test needs {', '.join(missing)}: run `make test` (which installs them) or "
            "`apt-get install chromium chromium-driver`."
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="mmsae-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,900",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver, css: str, count: int = 1):
    """The elements matching `css`, once at least `count` of them are displayed."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def shown(d):
        found = [e for e in d.find_elements(By.CSS_SELECTOR, css) if e.is_displayed()]
        return found if len(found) >= count else False

    return WebDriverWait(driver, WAIT_S).until(shown, message=f"{css} did not render within {WAIT_S} s")


@pytest.fixture
def screenshots_dir(tmp_path) -> Path:
    """Where screenshots go: a temporary folder, or $MMSAE_SCREENSHOTS_DIR (`make screenshots`)."""
    return Path(os.environ[SCREENSHOTS_ENV]) if os.environ.get(SCREENSHOTS_ENV) else tmp_path


def screenshot(driver, folder: Path, name: str) -> Path:
    path = folder / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, driver.get_screenshot_as_png())
    return path


@pytest.mark.browser
def test_apps_in_chromium(browser, served, photos, screenshots_dir) -> None:  # noqa: F811
    tracked = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in TRACKED.glob("*.png")}
    # Concept search: a text query fills the gallery with thumbnails.
    browser.get(served["search"])
    wait_for(browser, "#search-text textarea")[0].send_keys("a photo of a cat")
    for elem in ("#search-image", "#search-gallery", "#search-features", "#search-heatmaps"):
        wait_for(browser, elem)
    wait_for(browser, "#search-go")[0].click()
    wait_for(browser, "#search-gallery img", count=3)
    assert "images for 'a photo of a cat'" in wait_for(browser, "#search-status")[0].text
    shots = [screenshot(browser, screenshots_dir, "search")]

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
    shots.append(screenshot(browser, screenshots_dir, "steer"))

    # Concept unlearning: generate the pair for the default concept and prompt.
    browser.get(served["unlearn"])
    wait_for(browser, "#unlearn-concept textarea")
    wait_for(browser, "#unlearn-generate")[0].click()
    wait_for(browser, "#unlearn-before img")
    wait_for(browser, "#unlearn-after img")
    assert "feature" in wait_for(browser, "#unlearn-summary")[0].text
    shots.append(screenshot(browser, screenshots_dir, "unlearn"))

    for path in shots:
        assert path.stat().st_size > 10_000  # a real rendering, not a blank page
    if not os.environ.get(SCREENSHOTS_ENV):  # the test suite leaves the tracked screenshots alone
        assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in TRACKED.glob("*.png")} == tracked
