"""Headless Debian chromium driven by selenium: shared by the apps' browser test and `make screenshots`."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mmsae.fileio import atomic_write_bytes

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
WAIT_S = 60
WINDOW = (1280, 900)


def missing_browser() -> list[str]:
    """The browser files that are not installed (`make browser` installs them)."""
    return [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]


@contextmanager
def chromium(wait_s: float = WAIT_S) -> Iterator[Any]:
    """A selenium Chrome driver on headless chromium with a fresh profile, quit on exit."""
    missing = missing_browser()
    if missing:
        raise FileNotFoundError(
            f"The browser is not installed ({', '.join(missing)}): run `make browser` or "
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
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.wait_s = wait_s
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver: Any, css: str, count: int = 1, text: str | None = None) -> list[Any]:
    """The elements matching `css`, once at least `count` of them are displayed (with `text`: of those
    that contain it)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def shown(d):
        found = [e for e in d.find_elements(By.CSS_SELECTOR, css) if e.is_displayed()]
        if text is not None:
            found = [e for e in found if text in e.text]
        return found if len(found) >= count else False

    wait_s = getattr(driver, "wait_s", WAIT_S)
    want = f" containing {text!r}" if text is not None else ""
    return WebDriverWait(driver, wait_s).until(shown, message=f"{css}{want} did not render within {wait_s} s")


def screenshot(driver: Any, folder: Path, name: str, full_page: bool = False, max_height: int = 2000) -> Path:
    """Save the window (or, with `full_page`, the whole page up to `max_height` px) as folder/name.png."""
    if full_page:
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(WINDOW[0], min(int(height) + 20, max_height))
        driver.execute_script("window.scrollTo(0, 0)")
    path = folder / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, driver.get_screenshot_as_png())
    if full_page:
        driver.set_window_size(*WINDOW)
    return path


__all__ = ["CHROMEDRIVER", "CHROMIUM", "chromium", "missing_browser", "screenshot", "wait_for"]
