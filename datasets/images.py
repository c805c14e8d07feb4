"""Data sets for activation extraction: image folders, (image, caption) files, prompt lists, demo photos.

Every data set is an indexable `ExampleDataset` of `Example`s with a content `fingerprint()` (it names
the activation store, so changing one image gives a new store). Reading an unreadable image raises
`UnreadableExample`; the extraction loop counts and skips those instead of crashing a long run.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from mmsae.datasets.image_io import (
    EIGHT_BIT_MODES,
    IMAGE_EXTENSIONS,
    MAX_IMAGE_PIXELS,
    DraftSize,
    ImageReadError,
    open_image,
    to_rgb,
)

PROMPTS_DIR = Path(__file__).parent / "prompts"
# Photographs bundled with scikit-image itself (no pooch download needed).
SKIMAGE_PHOTOS = (
    "astronaut",
    "camera",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "page",
    "text",
    "coins",
    "grass",
    "gravel",
    "brick",
    "retina",
    "clock",
    "cell",
    "colorwheel",
)
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class Example:
    """One data set item: an RGB image, a text (caption or prompt), or both."""

    index: int
    image: Image.Image | None = None
    text: str | None = None


class UnreadableExample(Exception):
    """An item that cannot be decoded; extraction skips it and records `source` and `reason`."""

    def __init__(self, index: int, source: str, reason: str):
        super().__init__(f"example {index} ({source}) is unreadable: {reason}")
        self.index, self.source, self.reason = index, source, reason


class ExampleDataset(Dataset[Example]):
    """Base class: `kind` is "image" (items carry images) or "prompt" (items are texts only)."""

    kind: str = "image"
    draft_size: DraftSize | None = None
    """Data sets that read image files pass it to `open_image` (extraction's decode="draft" sets it)."""

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Example:
        raise NotImplementedError

    def source(self, index: int) -> str:
        """Human-readable origin of an item (a path or a name), used in skip reports."""
        return str(index)

    def fingerprint(self) -> str:
        """Hex digest of everything that determines the items' content, in order."""
        raise NotImplementedError

    def describe(self) -> str:
        return f"{type(self).__name__}({len(self)} items)"

    def _check_index(self, index: int) -> None:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {self.describe()}")


def open_rgb(path: Path, index: int, draft_size: DraftSize | None = None) -> Image.Image:
    """Decode an image fully (so truncated files fail here, not later) and convert it to RGB."""
    try:
        return open_image(path, draft_size=draft_size)
    except ImageReadError as e:
        raise UnreadableExample(index, str(path), e.reason) from e


def file_digest(path: Path) -> bytes:
    """sha256 of a file's bytes; a missing/unreadable file gets a stable marker instead of an error."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
    except OSError as e:
        return f"<unreadable {type(e).__name__}>".encode()
    return digest.digest()


class ImageFolder(ExampleDataset):
    """All images under `root` (recursively), in sorted relative-path order."""

    def __init__(self, root: str | Path, extensions: Sequence[str] = IMAGE_EXTENSIONS):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"Image folder {self.root} does not exist or is not a directory.")
        exts = {e.lower() for e in extensions}
        self.paths = sorted(
            (p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in exts),
            key=lambda p: p.relative_to(self.root).as_posix(),
        )
        if not self.paths:
            raise ValueError(
                f"No images found in {self.root} (looked for {', '.join(sorted(exts))} files, "
                "recursively). Point the data set at a folder that contains images."
            )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Example:
        self._check_index(index)
        return Example(index, image=open_rgb(self.paths[index], index, self.draft_size))

    def source(self, index: int) -> str:
        return str(self.paths[index])

    @cached_property
    def _fingerprint(self) -> str:
        digest = hashlib.sha256(b"image-folder")
        for p in self.paths:
            digest.update(p.relative_to(self.root).as_posix().encode() + b"\0")
            digest.update(file_digest(p))
        return digest.hexdigest()

    def fingerprint(self) -> str:
        return self._fingerprint

    def describe(self) -> str:
        return f"ImageFolder({self.root}, {len(self)} images)"


class ImageList(ExampleDataset):
    """Given images in the given order: files (paths) and/or images already in memory (PIL)."""

    def __init__(self, images: Sequence[str | os.PathLike | Image.Image]):
        self.images = list(images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Example:
        self._check_index(index)
        item = self.images[index]
        if isinstance(item, Image.Image):
            try:
                return Example(index, image=open_image(item))
            except ImageReadError as e:
                raise UnreadableExample(index, self.source(index), e.reason) from e
        return Example(index, image=open_rgb(Path(item), index, self.draft_size))

    def source(self, index: int) -> str:
        item = self.images[index]
        return f"<image {index}>" if isinstance(item, Image.Image) else os.fspath(item)

    def files(self) -> list[Path] | None:
        """The image files, if every item is one."""
        if any(isinstance(item, Image.Image) for item in self.images):
            return None
        return [Path(item) for item in self.images]

    @cached_property
    def _fingerprint(self) -> str:
        digest = hashlib.sha256(b"image-list")
        for item in self.images:
            if isinstance(item, Image.Image):
                digest.update(f"{item.mode} {item.size}".encode() + b"\0" + item.tobytes())
            else:
                digest.update(os.fspath(item).encode() + b"\0" + file_digest(Path(item)))
        return digest.hexdigest()

    def fingerprint(self) -> str:
        return self._fingerprint


class ImageCaptions(ExampleDataset):
    """(image path, caption) rows from a CSV (with a header) or JSONL file; paths relative to the file."""

    def __init__(self, path: str | Path, image_key: str = "image", caption_key: str = "caption"):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"Caption file {self.path} does not exist.")
        rows = self._read_rows(image_key, caption_key)
        if not rows:
            raise ValueError(f"{self.path} has no rows: add one ({image_key}, {caption_key}) pair per line.")
        base = self.path.parent
        self.images = [base / img for img, _ in rows]
        self.captions = [cap for _, cap in rows]

    def _read_rows(self, image_key: str, caption_key: str) -> list[tuple[str, str]]:
        suffix = self.path.suffix.lower()
        if suffix == ".csv":
            with self.path.open(newline="", encoding="utf-8") as f:
                records = list(csv.DictReader(f))
            where = "CSV header"
        elif suffix in (".jsonl", ".ndjson"):
            records = []
            for line_no, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{self.path}:{line_no} is not valid JSON ({e.msg}).") from e
            where = "JSON objects"
        else:
            raise ValueError(
                f"Unsupported caption file {self.path}: use a .csv (with a header) or .jsonl file."
            )
        rows = []
        for n, rec in enumerate(records, 1):
            if image_key not in rec or caption_key not in rec:
                raise ValueError(
                    f"{self.path} record {n} lacks {image_key!r}/{caption_key!r} (has "
                    f"{sorted(rec)}); name the columns in the {where} "
                    "or pass image_key=/caption_key=."
                )
            rows.append((str(rec[image_key]), str(rec[caption_key])))
        return rows

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Example:
        self._check_index(index)
        return Example(
            index, image=open_rgb(self.images[index], index, self.draft_size), text=self.captions[index]
        )

    def source(self, index: int) -> str:
        return str(self.images[index])

    @cached_property
    def _fingerprint(self) -> str:
        digest = hashlib.sha256(b"image-captions")
        for img, cap in zip(self.images, self.captions):
            digest.update(cap.encode() + b"\0")
            digest.update(file_digest(img))
        return digest.hexdigest()

    def fingerprint(self) -> str:
        return self._fingerprint

    def describe(self) -> str:
        return f"ImageCaptions({self.path}, {len(self)} pairs)"


class PromptList(ExampleDataset):
    """Text prompts (e.g. for diffusion): a list, or a file with one prompt per line (# comments)."""

    kind = "prompt"

    def __init__(self, prompts: Sequence[str] | str | Path, name: str = "prompts"):
        if isinstance(prompts, (str, Path)):
            path = Path(prompts)
            if not path.is_file():
                bundled = ", ".join(sorted(p.stem for p in PROMPTS_DIR.glob("*.txt")))
                raise FileNotFoundError(
                    f"Prompt file {path} does not exist (bundled lists: {bundled}; "
                    "use PromptList.bundled(name))."
                )
            name = path.name
            lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
            prompts = [ln for ln in lines if ln and not ln.startswith("#")]
        self.prompts = list(prompts)
        self.name = name
        if not self.prompts:
            raise ValueError(f"Prompt list {name!r} is empty: give at least one prompt.")

    @classmethod
    def bundled(cls, name: str) -> PromptList:
        """A prompt list shipped in mmsae/datasets/prompts/<name>.txt."""
        return cls(PROMPTS_DIR / f"{name}.txt")

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> Example:
        self._check_index(index)
        return Example(index, text=self.prompts[index])

    def source(self, index: int) -> str:
        return repr(self.prompts[index][:60])

    def fingerprint(self) -> str:
        return hashlib.sha256("\0".join(["prompts", *self.prompts]).encode()).hexdigest()

    def describe(self) -> str:
        return f"PromptList({self.name}, {len(self)} prompts)"


class SkimagePhotos(ExampleDataset):
    """The photographs bundled with scikit-image (~18 images): real pictures for demos and tests."""

    def __init__(self, names: Sequence[str] = SKIMAGE_PHOTOS):
        try:
            import skimage.data  # noqa: F401  (optional dependency, part of the dev extra)
        except ImportError as e:
            raise ImportError("SkimagePhotos needs scikit-image: pip install scikit-image") from e
        unknown = sorted(set(names) - set(SKIMAGE_PHOTOS))
        if unknown:
            raise ValueError(
                f"Unknown scikit-image photos {unknown}; choose from {', '.join(SKIMAGE_PHOTOS)}."
            )
        if not names:
            raise ValueError("SkimagePhotos needs at least one photo name.")
        self.names = list(names)

    def __len__(self) -> int:
        return len(self.names)

    def _array(self, index: int) -> np.ndarray:
        import skimage.data

        arr = np.asarray(getattr(skimage.data, self.names[index])())
        if arr.ndim == 2:  # grayscale → RGB, so every encoder gets 3 channels
            arr = np.repeat(arr[..., None], 3, axis=2)
        return np.ascontiguousarray(arr[..., :3])  # drop alpha

    def __getitem__(self, index: int) -> Example:
        self._check_index(index)
        return Example(index, image=Image.fromarray(self._array(index)))

    def source(self, index: int) -> str:
        return f"skimage.data.{self.names[index]}"

    @cached_property
    def _fingerprint(self) -> str:
        digest = hashlib.sha256(b"skimage")
        for i, name in enumerate(self.names):
            digest.update(name.encode() + b"\0")
            digest.update(self._array(i).tobytes())
        return digest.hexdigest()

    def fingerprint(self) -> str:
        return self._fingerprint


class RandomCrops(ExampleDataset):
    """`n` augmented random crops (scale, aspect, flip) of a base image data set, deterministic per index.

    Item i crops base image i mod len(base) with an RNG seeded by (seed, i), so items do not depend on
    worker order and a resumed extraction sees exactly the same crops.
    """

    def __init__(
        self,
        base: ExampleDataset,
        n: int,
        scale: tuple[float, float] = (0.25, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        seed: int = 0,
    ):
        if base.kind != "image":
            raise ValueError(f"RandomCrops needs an image data set, got {base.describe()}.")
        if n < 1:
            raise ValueError(f"RandomCrops needs n >= 1 crops, got {n}.")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}.")
        self.base, self.n, self.scale, self.ratio, self.seed = base, n, scale, ratio, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Example:
        self._check_index(index)
        img = self.base[index % len(self.base)].image
        assert img is not None  # guaranteed by kind == "image"
        rng = np.random.default_rng([self.seed, index])
        W, H = img.size
        area = rng.uniform(*self.scale) * W * H
        aspect = np.exp(rng.uniform(np.log(self.ratio[0]), np.log(self.ratio[1])))
        w = int(min(W, max(1, round(np.sqrt(area * aspect)))))
        h = int(min(H, max(1, round(np.sqrt(area / aspect)))))
        x, y = int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))
        crop = img.crop((x, y, x + w, y + h))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return Example(index, image=crop)

    def source(self, index: int) -> str:
        return f"crop {index} of {self.base.source(index % len(self.base))}"

    def fingerprint(self) -> str:
        params = json.dumps([self.n, self.scale, self.ratio, self.seed])
        return hashlib.sha256(f"crops{params}{self.base.fingerprint()}".encode()).hexdigest()

    def describe(self) -> str:
        return f"RandomCrops({self.n} of {self.base.describe()})"


def load_dataset(spec: str) -> ExampleDataset:
    """Build a data set from a string spec (used by configs and the CLI).

    "folder:PATH", "captions:FILE.csv|.jsonl", "prompts:FILE.txt" or "prompts:NAME" (bundled list),
    "skimage", "skimage-crops:N" (N random crops of the scikit-image photos); the zoo's labelled photos
    "skimage-labeled", "foolbox:imagenet|cifar10|cifar100", "interior" (`mmsae.datasets.photos`). Any image
    spec followed by "+prompt:TEXT" or "+prompts:FILE.txt|NAME" pairs its images with prompts
    (`ImagePrompts`, for LLaVA).
    """
    from mmsae.datasets.image_prompts import is_image_prompt_spec, load_image_prompts

    if is_image_prompt_spec(spec):
        return load_image_prompts(spec)
    kind, _, arg = spec.partition(":")
    if kind == "folder" and arg:
        return ImageFolder(arg)
    if kind == "captions" and arg:
        return ImageCaptions(arg)
    if kind == "prompts" and arg:
        bundled = PROMPTS_DIR / f"{arg}.txt"
        return PromptList(arg if Path(arg).is_file() or not bundled.is_file() else bundled)
    if kind == "skimage" and not arg:
        return SkimagePhotos()
    if kind == "skimage-crops" and arg.isdigit():
        return RandomCrops(SkimagePhotos(), int(arg))
    from mmsae.datasets.photos import PHOTO_SPECS, load_photos  # the offline zoo's labelled photos

    if kind in PHOTO_SPECS:
        return load_photos(spec)
    raise ValueError(
        f"Unknown data set spec {spec!r}. Use folder:PATH, captions:FILE.csv|.jsonl, "
        "prompts:FILE.txt|NAME, skimage, skimage-crops:N, skimage-labeled, foolbox:imagenet|cifar10|cifar100 "
        "or interior; add +prompt:TEXT to an image spec for (image, prompt) pairs."
    )


__all__ = [  # the image-file names live in mmsae.datasets.image_io and stay importable from here
    "EIGHT_BIT_MODES",
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "PROMPTS_DIR",
    "SKIMAGE_PHOTOS",
    "DraftSize",
    "Example",
    "ExampleDataset",
    "ImageCaptions",
    "ImageFolder",
    "ImageReadError",
    "PromptList",
    "RandomCrops",
    "SkimagePhotos",
    "UnreadableExample",
    "file_digest",
    "load_dataset",
    "open_image",
    "open_rgb",
    "to_rgb",
]
