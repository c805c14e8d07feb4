"""`make screenshots`: the README's app screenshots, from real weights and real photos.

Builds `make demo`'s SAE and concept index on the offline zoo's ImageNet MobileNetV2 over its real photos
(`mmsae demo --encoder timm:mobilenetv2_100`; reused when already built), serves the three apps on it as
`mmsae app ... --sae DIR --index DIR` would, drives each in headless chromium and saves
docs/screenshots/{search,steer,unlearn}.png:

- search: the text query "espresso" → the photos where the features named espresso fire;
- steer: the cat photo (chelsea) with the feature named "espresso" at 10 × its maximum activation → the
  classifier's top classes before and after;
- unlearn: the class "Egyptian cat" unlearned → the cat photo's top classes before and after, and how
  many of the other photos keep their top-1 class.

Each step checks that the page shows what its screenshot is meant to show, else it stops with a message.

    python tests/screenshots.py [--out docs/screenshots] [--work runs/screenshots] [--rebuild]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from headless import chromium, screenshot, wait_for

ENCODER = "timm:mobilenetv2_100"
HOOK = "global_pool"
QUERY = "espresso"  # searched, and steered toward
PHOTO = "chelsea"  # the cat photo that is steered and unlearned
UNLEARN = "Egyptian cat"
STRENGTH = 10  # × the feature's maximum activation: the slider's top
ROOT = Path(__file__).resolve().parent.parent


def build_demo(work: Path, rebuild: bool) -> tuple[Path, Path]:
    """`make demo`'s SAE and concept index on the zoo's MobileNetV2 under `work` (built once)."""
    from mmsae.demo import main as demo

    sae_dir, index_dir = work / "sae" / HOOK, work / "index"
    built = (sae_dir / "cfg.json").is_file() and (index_dir / "meta.json").is_file()
    if (rebuild or not built) and demo(["--encoder", ENCODER, "--hook", HOOK, "--out", str(work)]) != 0:
        raise SystemExit("mmsae demo failed: see its output above.")
    return sae_dir, index_dir


def serve(app: str, sae_dir: Path, index_dir: Path, device: str) -> tuple[Any, str]:
    """One app built by `mmsae app`'s own builder, served on 127.0.0.1; (Blocks, URL)."""
    from mmsae.apps.cli import build_app, build_parser
    from mmsae.apps.common import launch

    args = build_parser().parse_args(
        [app, "--sae", str(sae_dir), "--index", str(index_dir), "--device", device]
    )
    demo, settings = build_app(args)
    _, url, _ = launch(demo, settings, block=False)
    return demo, url


def upload(driver: Any, component: str, path: Path) -> None:
    driver.find_element("css selector", f"{component} input[type=file]").send_keys(str(path))
    wait_for(driver, f"{component} img")


def shoot_search(driver: Any, url: str, out: Path) -> Path:
    driver.get(url)
    wait_for(driver, "#search-text textarea")[0].send_keys(QUERY)
    wait_for(driver, "#search-go")[0].click()
    wait_for(driver, "#search-gallery img", count=3)
    wait_for(driver, "#search-status", text=f"images for '{QUERY}'")
    return screenshot(driver, out, "search", full_page=True, max_height=900)


def pick_feature(driver: Any, query: str, label: str) -> None:
    """Search the features by name, then choose `label` in the first feature slot."""
    from selenium.webdriver.common.keys import Keys

    box = wait_for(driver, "#steer-feature-search textarea")[0]
    box.send_keys(query, Keys.ENTER)
    field = wait_for(driver, "#steer-feature-0 input")[0]
    field.click()
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.BACKSPACE, label)  # filters the slot's choices, which now hold the matches
    wait_for(driver, "li[data-testid=dropdown-option]", text=label)[0].click()
    if label not in field.get_attribute("value"):
        raise SystemExit(f"Could not choose {label!r} in the first feature slot.")


def shoot_steer(driver: Any, url: str, out: Path, photo: Path, label: str) -> Path:
    from selenium.webdriver.common.keys import Keys

    driver.get(url)
    pick_feature(driver, QUERY, label)
    strength = wait_for(driver, "input[type=number]")[0]  # Strength 1's number box
    strength.send_keys(Keys.CONTROL, "a")
    strength.send_keys(str(STRENGTH), Keys.TAB)
    upload(driver, "#steer-image", photo)
    wait_for(driver, "#steer-run")[0].click()
    wait_for(driver, "#steer-before .output-class", text=UNLEARN)
    wait_for(driver, "#steer-after .output-class", text=QUERY)
    return screenshot(driver, out, "steer", full_page=True)


def shoot_unlearn(driver: Any, url: str, out: Path, photo: Path) -> Path:
    driver.get(url)
    wait_for(driver, "#unlearn-concept textarea")
    upload(driver, "#unlearn-image", photo)
    wait_for(driver, "#unlearn-generate")[0].click()
    wait_for(driver, "#unlearn-before .output-class", text=UNLEARN)
    after = wait_for(driver, "#unlearn-after .output-class")[0]
    if after.text.strip() == UNLEARN:
        raise SystemExit(f"After unlearning {UNLEARN!r} the cat photo is still classified as it.")
    wait_for(driver, "#unlearn-summary", text="keep their top-1")
    return screenshot(driver, out, "unlearn", full_page=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "screenshots", help="demo output folder")
    p.add_argument("--rebuild", action="store_true", help="rebuild the SAE and index even if present")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    from mmsae.apps.common import FeatureCatalog
    from mmsae.index import ConceptIndex

    sae_dir, index_dir = build_demo(args.work, args.rebuild)
    index = ConceptIndex.load(index_dir)
    photo = next(Path(x) for x in index.paths if Path(x).name.startswith(PHOTO))
    catalog = FeatureCatalog(names=[c[0].name if c else "" for c in index.names])
    named = [j for j, name in enumerate(catalog.names) if name == QUERY]
    if not named:
        raise SystemExit(f"No feature of the SAE in {sae_dir} is named {QUERY!r}: rebuild with --rebuild.")
    served = {app: serve(app, sae_dir, index_dir, args.device) for app in ("search", "steer", "unlearn")}
    try:
        with chromium(wait_s=300) as driver:  # real models on a CPU: a first request can take a while
            try:
                shots = [
                    shoot_search(driver, served["search"][1], args.out),
                    shoot_steer(driver, served["steer"][1], args.out, photo, catalog.label(named[0])),
                    shoot_unlearn(driver, served["unlearn"][1], args.out, photo),
                ]
            except Exception:
                print(f"failed; the page as it was: {screenshot(driver, args.work, 'failed', True)}")
                raise
    finally:
        for demo, _ in served.values():
            demo.close()
    print("\n".join(f"wrote {s}" for s in shots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
