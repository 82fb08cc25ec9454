"""What every image source is: a DatasetInfo describing its images and samples(split) yielding
(image, class_id, metadata) tuples (sources.py lists the sources; `flowpre shards` writes them).

Its own file, below the sources, so that a source built on another (twemoji_subgroups.py on
twemoji.py) and the registry that opens them all (sources.open_source) import it from below.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterator

import numpy as np

Sample = tuple[np.ndarray, int, dict]


@dataclass
class DatasetInfo:
    name: str
    num_classes: int
    class_names: list[str]
    channels: int
    height: int
    width: int
    splits: list[str] = field(default_factory=lambda: ["train", "test"])
    has_captions: bool = False  # samples carry metadata["caption"] (text conditioning)

    def to_dict(self) -> dict:
        d = asdict(self)
        # Only when set, so dataset.json of the caption-less sources stays as it was (and
        # shard directories written before this field still accept another split).
        if not d["has_captions"]:
            d.pop("has_captions")
        return d


class Source:
    """Base: `info` describes the images, `samples(split)` yields them."""

    info: DatasetInfo

    def samples(self, split: str) -> Iterator[Sample]:
        raise NotImplementedError

    def _check_split(self, split: str) -> None:
        if split not in self.info.splits:
            raise ValueError(f"source {self.info.name!r} has no split {split!r} "
                             f"(it has: {', '.join(self.info.splits)})")
