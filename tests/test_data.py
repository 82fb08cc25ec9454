"""Data layer: sources, shard writer, and the multi-rank / multi-worker reading pipeline."""
import argparse
import collections
import io
import json
import logging
import shutil
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from flowpre.data import shards as shards_cli
from flowpre.data.pipeline import ShardLoader, read_dataset_info, resolve_shards
from flowpre.data.shards import write_shards
from flowpre.data.sources import FolderSource, open_source

N_IMAGES, N_CLASSES, SIZE = 202, 4, 8  # 202: slots get unequal shares


@pytest.fixture(scope="module")
def noise_folder(tmp_path_factory):
    """202 random-noise 8x8 grayscale PNGs in 4 class folders: every image is unique."""
    root = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        d = root / f"class{i % N_CLASSES}"
        d.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8), "L").save(d / f"{i:04d}.png")
    return root


def _shards(tmp_path_factory, folder, shard_size):
    out = tmp_path_factory.mktemp(f"shards{shard_size}")
    paths = write_shards(f"folder:{folder}", out, shard_size=shard_size)
    return out, paths


@pytest.fixture(scope="module")
def many(tmp_path_factory, noise_folder):
    """11 shards (10 of 20, 1 of 2)."""
    return _shards(tmp_path_factory, noise_folder, 20)


@pytest.fixture(scope="module")
def few(tmp_path_factory, noise_folder):
    """3 shards (80, 80, 42): fewer than ranks x workers."""
    return _shards(tmp_path_factory, noise_folder, 80)


def _image_bytes(x: torch.Tensor) -> list[bytes]:
    """Batch in [-1, 1] back to the exact uint8 pixels, one bytes object per image."""
    u = ((x + 1) * 127.5).round().to(torch.uint8).numpy()
    return [img.tobytes() for img in u]


def _reference(paths) -> dict[bytes, int]:
    """pixels -> class of every sample, read with plain webdataset."""
    ds = wds.WebDataset(paths, shardshuffle=False, nodesplitter=wds.split_by_node).decode("l8")
    return {np.asarray(s["png"]).tobytes(): int(s["cls"]) for s in ds}


def test_written_shards_are_real_tars(many, noise_folder):
    out, paths = many
    assert [p.split("/")[-1] for p in paths] == [f"train-{i:06d}.tar" for i in range(11)]
    assert not list(out.glob("*.tmp"))
    with tarfile.open(paths[0]) as tf:
        names = tf.getnames()
    assert names[:3] == ["00000000.cls", "00000000.json", "00000000.png"] and len(names) == 60

    ds = wds.WebDataset(paths, shardshuffle=False, nodesplitter=wds.split_by_node)
    samples = list(ds)
    assert [s["__key__"] for s in samples] == [f"{i:08d}" for i in range(N_IMAGES)]
    first = samples[0]
    meta = json.loads(first["json"])
    assert meta["class_name"] == "class0" and meta["index"] == 0 and meta["split"] == "train"
    assert first["cls"] == b"0"
    original = np.asarray(Image.open(noise_folder / "class0" / "0000.png"))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(first["png"]))), original)
    assert len(_reference(paths)) == N_IMAGES  # all images distinct, as the tests below assume

    info = json.loads((out / "dataset.json").read_text())
    assert info["num_classes"] == N_CLASSES and info["class_names"] == [f"class{i}" for i in range(4)]
    assert (info["channels"], info["height"], info["width"]) == (1, SIZE, SIZE)
    assert info["splits"]["train"]["count"] == N_IMAGES
    assert info["splits"]["train"]["shards"] == [p.split("/")[-1] for p in paths]
    assert read_dataset_info(paths)["num_classes"] == N_CLASSES


def test_digits_both_splits_and_cli(tmp_path, capsys, noise_folder):
    parser = argparse.ArgumentParser()
    shards_cli.add_arguments(parser)
    args = parser.parse_args(["--source", "digits", "--out", str(tmp_path), "--shard-size", "16",
                              "--split", "all", "--limit", "40"])
    assert shards_cli.run(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("train: 40 samples in 3 shards")
    info = json.loads((tmp_path / "dataset.json").read_text())
    assert {s: e["count"] for s, e in info["splits"].items()} == {"train": 40, "test": 40}
    assert resolve_shards(str(tmp_path / "test-{000000..000002}.tar"))[-1].endswith("test-000002.tar")
    # digits test split starts after the first 80% (1437 samples)
    test0 = next(iter(wds.WebDataset(str(tmp_path / "test-000000.tar"), shardshuffle=False,
                                     nodesplitter=wds.split_by_node)))
    assert json.loads(test0["json"])["source_index"] == 1437
    batch = next(iter(ShardLoader(str(tmp_path / "train-*.tar"), 8, epochs=1)))
    assert batch["x"].shape == (8, 1, 8, 8) and batch["x"].max() == 1.0  # 16 -> 255

    # Rewriting one split keeps the other and removes that split's stale shards.
    assert len(write_shards("digits", tmp_path, shard_size=16, split="test", limit=10)) == 1
    info = json.loads((tmp_path / "dataset.json").read_text())
    assert {s: e["count"] for s, e in info["splits"].items()} == {"train": 40, "test": 10}
    assert sorted(p.name for p in tmp_path.glob("test-*")) == ["test-000000.tar"]
    with pytest.raises(ValueError, match="another dataset"):
        write_shards(f"folder:{noise_folder}", tmp_path)


@pytest.mark.parametrize("regime", ["many", "few"])
def test_every_sample_once_per_epoch_2_ranks_2_workers(regime, request):
    out, paths = request.getfixturevalue(regime)
    reference = _reference(paths)
    seen = collections.Counter()
    for rank in range(2):
        loader = ShardLoader(paths, batch_size=7, rank=rank, world_size=2, num_workers=2, seed=3,
                             shuffle_buffer=16, epochs=1)
        for batch in loader:
            x, cond = batch["x"], batch["cond"]
            assert x.dtype == torch.float32 and x.shape[1:] == (1, SIZE, SIZE) and x.ndim == 4
            assert cond.dtype == torch.int64 and cond.shape == (x.shape[0],)
            assert x.min() >= -1 and x.max() <= 1
            for img, c in zip(_image_bytes(x), cond.tolist()):
                assert reference[img] == c
                seen[img] += 1
        assert loader.corrupt_count == 0
    assert len(seen) == N_IMAGES and set(seen.values()) == {1}


def test_epochs_and_shuffle(few):
    _, paths = few
    loader = ShardLoader(paths, batch_size=10, seed=1, shuffle_buffer=32, epochs=2)
    batches = list(loader)
    images = [img for b in batches for img in _image_bytes(b["x"])]
    assert len(images) == 2 * N_IMAGES and set(collections.Counter(images).values()) == {2}
    assert images[:N_IMAGES] != images[N_IMAGES:]  # each epoch has its own order
    assert loader.batches_consumed == len(batches)  # the streams end unevenly: the last ones are short
    again = [img for b in loader for img in _image_bytes(b["x"])]
    assert again == images  # iterating again starts over: the stream is a pure function


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("regime", ["many", "few"])
def test_exact_resume(regime, num_workers, request):
    _, paths = request.getfixturevalue(regime)
    kw = dict(batch_size=8, rank=1, world_size=2, num_workers=num_workers, seed=5, hflip=True,
              shuffle_buffer=16)
    # ~12 batches per epoch on this rank: 40 batches cross several epoch boundaries.
    full = [b for _, b in zip(range(40), ShardLoader(paths, **kw))]
    assert all(b["x"].shape == (8, 1, SIZE, SIZE) for b in full)  # full batches across epochs
    for start in (5, 27):
        loader = ShardLoader(paths, start_batch=start, **kw)
        tail = [b for _, b in zip(range(40 - start), loader)]
        assert loader.batches_consumed == 40
        for a, b in zip(full[start:], tail):
            assert torch.equal(a["x"], b["x"]) and torch.equal(a["cond"], b["cond"])
    unflipped = [b for _, b in zip(range(3), ShardLoader(paths, **{**kw, "hflip": False}))]
    pairs = [(a["x"], b["x"]) for a, b in zip(full, unflipped)]
    flipped = sum(not torch.equal(u[i], f[i]) for f, u in pairs for i in range(8))
    assert all(torch.equal(u[i], f[i]) or torch.equal(u[i].flip(-1), f[i]) for f, u in pairs for i in range(8))
    assert 3 <= flipped <= 21


def _global_steps(paths, world, start_step, steps, global_batch=12, num_workers=2):
    """Per optimizer step, the set of sample keys all `world` ranks consume between them."""
    iters = [iter(ShardLoader(paths, batch_size=global_batch // world, rank=r, world_size=world,
                              num_workers=num_workers, seed=4, shuffle_buffer=16, start_batch=start_step))
             for r in range(world)]
    out = []
    for _ in range(steps):
        keys = [k for it in iters for k in next(it)["keys"]]
        assert len(keys) == global_batch
        out.append(set(keys))
    return out


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2), (2, 3)])
def test_world_size_switch_sees_every_sample_once(many, before, after):
    """7 steps on `before` ranks, then 33 on `after` from the global sample count (past the
    end of every stream's epoch 0): per step the same samples as one straight run, and
    every sample of epoch 0 exactly once."""
    _, paths = many
    straight = _global_steps(paths, 1, 0, 40, num_workers=0)
    split = _global_steps(paths, before, 0, 7) + _global_steps(paths, after, 7, 33)
    assert split == straight
    seen = collections.Counter(k for step in split for k in step)
    epoch0 = [k for k in seen if k.startswith("0:")]
    assert len(epoch0) == N_IMAGES and set(seen.values()) == {1}
    assert 0 < sum(k.startswith("1:") for k in seen) < N_IMAGES


def test_resolve_shards(many, tmp_path):
    out, paths = many
    assert resolve_shards(str(out)) == paths
    assert resolve_shards(str(out / "train-{000000..000010}.tar")) == paths
    assert resolve_shards(str(out / "train-*.tar")) == paths
    assert resolve_shards(f"{paths[3]},{out}/train-{{000001,000000}}.tar") == [paths[0], paths[1], paths[3]]
    missing = str(tmp_path / "nothing-{000000..000003}.tar")
    with pytest.raises(FileNotFoundError, match="nothing-"):
        resolve_shards(missing)
    with pytest.raises(FileNotFoundError, match="nope"):
        resolve_shards(f"{paths[0]},{tmp_path}/nope-*.tar")


def _png(shape, seed=0) -> bytes:
    buf = io.BytesIO()
    arr = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def corrupt_dir(tmp_path, many):
    """Shard A: 10 good samples and 4 bad ones; shard B: a good shard cut inside sample 12's png."""
    out, paths = many
    shutil.copy(out / "dataset.json", tmp_path / "dataset.json")
    bad = {3: {"png": b"not a png at all"}, 5: {"png": _png((SIZE, SIZE))},  # missing cls
           7: {"png": _png((SIZE, SIZE)), "cls": "seven"}, 9: {"png": _png((16, 16)), "cls": "1"}}
    with wds.TarWriter(str(tmp_path / "a.tar")) as w:
        for i in range(14):
            w.write({"__key__": f"a{i:04d}", **bad.get(i, {"png": _png((SIZE, SIZE), i), "cls": str(i % N_CLASSES)})})
    raw = open(paths[0], "rb").read()
    with tarfile.open(paths[0]) as tf:
        cut = tf.getmember("00000012.png").offset_data + 20
    (tmp_path / "b.tar").write_bytes(raw[:cut])
    return tmp_path


def test_corrupt_samples_skipped_counted_warned_once(corrupt_dir, caplog):
    paths = resolve_shards(str(corrupt_dir))
    with caplog.at_level(logging.WARNING, logger="flowpre.data.pipeline"):
        loader = ShardLoader(paths, batch_size=4, num_workers=0, shuffle_buffer=0, epochs=1)
        n = sum(b["x"].shape[0] for b in loader)
    assert n == 10 + 12 and loader.corrupt_count == 5
    warnings = [r.getMessage() for r in caplog.records if r.name == "flowpre.data.pipeline"]
    assert len(warnings) == 2 and "no sample counts" in warnings[0]  # a.tar and b.tar are not in the index
    assert "corrupt sample" in warnings[1] and ".tar" in warnings[1]

    loader = ShardLoader(paths, batch_size=4, num_workers=2, shuffle_buffer=8, epochs=1)
    batches = list(loader)
    assert sum(b["x"].shape[0] for b in batches) == 22 and loader.corrupt_count == 5
    assert max(b["corrupt"] for b in batches) == 4  # per-worker cumulative count, shard a's worker

    # 2 ranks x 2 workers > 2 shards: samples are split by index; each loss is counted once.
    n = corrupt = 0
    for rank in range(2):
        loader = ShardLoader(paths, batch_size=4, rank=rank, world_size=2, num_workers=2, epochs=1)
        n += sum(b["x"].shape[0] for b in loader)
        corrupt += loader.corrupt_count
    assert (n, corrupt) == (22, 5)


def test_folder_source_rgba_resize_and_unreadable(tmp_path, caplog):
    """Loose images: one class named after the folder; RGBA -> RGB; unreadable file skipped."""
    src_dir, out = tmp_path / "emoji", tmp_path / "shards"
    src_dir.mkdir()
    rng = np.random.default_rng(1)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (12, 16, 4), dtype=np.uint8), "RGBA").save(src_dir / f"{i}.png")
    (src_dir / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    src = FolderSource(str(src_dir), image_size=10)
    assert (src.info.channels, src.info.height, src.info.width, src.info.num_classes) == (3, 10, 10, 1)
    assert src.info.class_names == ["emoji"]
    with caplog.at_level(logging.WARNING):
        paths = write_shards(f"folder:{src_dir}", out, image_size=10)
    assert "broken.jpg" in caplog.text
    assert json.loads((out / "dataset.json").read_text())["splits"]["train"] == {
        "count": 5, "skipped": 1, "shards": ["train-000000.tar"], "nsamples": {"train-000000.tar": 5}}
    batch = next(iter(ShardLoader(paths, batch_size=5, epochs=1)))
    assert batch["x"].shape == (5, 3, 10, 10) and batch["cond"].tolist() == [0] * 5
    with pytest.raises(ValueError, match="no split 'test'"):
        write_shards(f"folder:{src_dir}", out, split="test")


def test_fashion_mnist(tmp_path):
    try:
        open_source("fashion-mnist")
    except FileNotFoundError as e:
        pytest.fail(f"{e} (the test set-up must run: apt-get install -y dataset-fashion-mnist)")
    paths = write_shards("fashion-mnist", tmp_path, shard_size=16, limit=32)
    assert len(paths) == 2
    info = json.loads((tmp_path / "dataset.json").read_text())
    assert info["num_classes"] == 10 and info["class_names"][0] == "T-shirt/top"
    assert info["class_names"][9] == "Ankle boot" and info["splits"]["train"]["count"] == 32
    batch = next(iter(ShardLoader(paths, batch_size=32, epochs=1, shuffle_buffer=0)))
    assert batch["x"].shape == (32, 1, 28, 28) and batch["x"].std() > 0.1
    assert 0 <= batch["cond"].min() and batch["cond"].max() < 10
