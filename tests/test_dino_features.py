"""DINOv2-S/14 (the zoo's real weights) SAE features on real photos: localization and dashboards.

The margin comes from measured numbers (benchmarks/bench_dino_features.py, docs/benchmarks.md): with the
benchmark's SAE (1536 features, 256 crops) the top-3 SAE features keep 0.78 of their mass inside the object
boxes on average, random directions 0.60. The test's smaller SAE (768 features, 64 crops) measured 0.83
against 0.63 (gain 0.20); other crop/training seeds gave gains of 0.08-0.13, so the test asks for 0.08.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmsae.analysis.dashboard import feature_dashboard, localization_grid
from mmsae.analysis.heatmap import patch_codes
from mmsae.analysis.localization import (
    energy_in_box,
    localization_scores,
    mean_energy,
    random_directions,
    sae_and_random,
)
from mmsae.analysis.objects import (
    OBJECT_BOXES,
    ObjectBox,
    PhotoList,
    box_coverage,
    load_photo,
    model_view,
    real_photo_specs,
)
from mmsae.analysis.stats import StatsConfig, feature_stats
from mmsae.datasets.images import RandomCrops
from mmsae.encoders.timm import TimmEncoder

HOOK = "blocks.9"
MIN_GAIN = 0.08  # SAE − random mean top-3 energy in the boxes (see the module docstring)


def test_energy_in_box_is_the_share_of_mass_inside() -> None:
    codes_HWn = torch.zeros(2, 2, 3)
    codes_HWn[0, 0, 0], codes_HWn[1, 1, 0] = 3.0, 1.0  # feature 0: 3/4 of its mass in the box
    codes_HWn[..., 1] = -1.0  # feature 1 never fires (negative parts do not count)
    codes_HWn[1, 1, 2] = 2.0  # feature 2: all mass outside
    coverage = np.array([[1.0, 0.0], [0.0, 0.0]], dtype=np.float32)
    energy = energy_in_box(codes_HWn, coverage)
    assert energy[0] == pytest.approx(0.75) and energy[1].isnan() and energy[2] == 0


def test_box_coverage_follows_the_encoder_crop() -> None:
    from mmsae.encoders import get_encoder

    vit = get_encoder("timm:test_vit")  # 160 px input, resize + centre crop like every timm model
    image = Image.new("RGB", (300, 200))
    left = box_coverage(vit, image, ObjectBox("x", "left half", (0, 0, 150, 200)), (10, 10))
    assert left[:, :5].min() > 0.99 and left[:, 5:].max() < 0.01  # the square crop is centred
    outer = box_coverage(vit, image, ObjectBox("x", "outside the crop", (0, 0, 40, 200)), (10, 10))
    assert outer.max() < 0.01  # the centre crop drops x < 50
    red_left = Image.new("RGB", (300, 200), "white")
    red_left.paste((255, 0, 0), (0, 0, 50, 200))
    view = np.asarray(model_view(vit, red_left))  # what dashboards draw heatmaps on
    assert view.shape == (160, 160, 3) and view[..., 1].min() > 250  # the red strip is cropped away
    with pytest.raises(ValueError, match="does not fit its 300×200 photo"):
        box_coverage(vit, image, ObjectBox("x", "too wide", (0, 0, 301, 10)), (10, 10))


def test_every_object_box_fits_its_photo(zoo: Path) -> None:  # foolbox photos come with the zoo
    for obj in OBJECT_BOXES:
        W, H = load_photo(obj.photo).size
        x0, y0, x1, y1 = obj.box
        assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H, obj
    with pytest.raises(ValueError, match="Unknown photo spec"):
        load_photo("skimage:nope")


@pytest.fixture(scope="session")
def dino(zoo: Path) -> TimmEncoder:
    from mmsae.encoders import get_encoder

    return get_encoder("timm:vit_small_patch14_dinov2", pretrained=True)


@pytest.fixture(scope="session")
def dino_sae(dino: TimmEncoder):
    """A small TopK SAE on blocks.9 patch tokens of 64 random crops of the real photos, and the crops."""
    from mmsae.trainer.api import train

    torch.manual_seed(0)
    crops = RandomCrops(PhotoList(real_photo_specs(n_interior=8)), 64, scale=(0.1, 1.0))
    images = [crops[i].image for i in range(len(crops))]
    acts_ND = patch_codes(lambda x: x, dino, images, HOOK).flatten(0, 2)
    sae = train(acts_ND, n_features=768, k=16, tokens=6 * len(acts_ND), batch_size=1024, warmup_steps=10)
    return sae, acts_ND.mean(0), images


def test_sae_features_localize_on_objects_better_than_random(dino: TimmEncoder, dino_sae) -> None:
    sae, center, _ = dino_sae
    scores = localization_scores(dino, HOOK, sae_and_random(sae, center), OBJECT_BOXES, k=3)
    gain = mean_energy(scores, "sae") - mean_energy(scores, "random")
    assert gain >= MIN_GAIN, [(s.obj.label, s.bases["sae"].mean, s.bases["random"].mean) for s in scores]
    # The baseline is no strawman: it beats a location-blind feature (the box's area fraction).
    assert mean_energy(scores, "random") > np.mean([s.area for s in scores])


def test_dashboards_render_for_the_real_model(tmp_path: Path, dino: TimmEncoder, dino_sae) -> None:
    sae, center, images = dino_sae
    two = [o for o in OBJECT_BOXES if o.label in ("rocket", "cup")]
    scores = localization_scores(dino, HOOK, sae_and_random(sae, center), two, k=2)
    png = localization_grid(scores, tmp_path / "objects.png")
    assert Image.open(png).size[0] > 400
    stats = feature_stats(sae, [_token_acts(dino, images[:8])], StatsConfig(top_k=4))
    feature = scores[0].bases["sae"].features[0]
    page_png, page = feature_dashboard(feature, stats, images[:8], tmp_path, sae=sae, encoder=dino, hook=HOOK)
    assert Image.open(page_png).size[0] > 400 and "data:image/png;base64," in page.read_text()
    assert random_directions(4, 3, torch.zeros(4))(torch.ones(2, 4)).shape == (2, 3)


def _token_acts(encoder: TimmEncoder, images: list[Image.Image]):
    pixels = torch.stack([encoder.transform(im) for im in images])
    return encoder.activations(pixels, [HOOK], tokens="patch")[HOOK]
