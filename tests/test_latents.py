"""Latent training data: VAE encode/decode, latent shards, and the loader yielding latents.

A tiny randomly initialised AutoencoderKL is saved to a temp folder and loaded back from
it, as a real one would be: nothing is downloaded.
"""
import argparse
import io
import json
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import diffusers  # noqa: E402  (the dev extra installs it: a missing one must fail, not skip)

from flowpre.data import shards as shards_cli
from flowpre.data.pipeline import ShardLoader, read_dataset_info
from flowpre.data.shards import write_shards
from flowpre.vae import decode, encode, encode_uint8, load_vae, read_latent, vae_for_dataset

N_IMAGES, N_CLASSES, SIZE, LATENT_CHANNELS = 24, 2, 16, 4


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=SIZE, scaling_factor=0.5, shift_factor=0.1)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def rgb_folder(tmp_path_factory):
    """Random-noise 16x16 RGB PNGs in 2 class folders (values 1..255: never all zero)."""
    root = tmp_path_factory.mktemp("rgb")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        d = root / f"class{i % N_CLASSES}"
        d.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(1, 256, (SIZE, SIZE, 3), dtype=np.uint8), "RGB").save(d / f"{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def latent_shards(tmp_path_factory, rgb_folder, vae_dir):
    out = tmp_path_factory.mktemp("latent_shards")
    # vae_batch 10: batches that do not divide the shards or the image count
    paths = write_shards(f"folder:{rgb_folder}", out, shard_size=8, vae=vae_dir, vae_batch=10)
    return out, paths


def _folder_images(folder):
    """(image in [-1, 1] (3, H, W), class) in the folder source's order."""
    items = []
    for cls, d in enumerate(sorted(p for p in folder.iterdir() if p.is_dir())):
        for f in sorted(d.iterdir()):
            arr = np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 127.5 - 1
            items.append((torch.from_numpy(arr).permute(2, 0, 1), cls))
    return items


def test_encode_decode_shapes_and_determinism(vae_dir):
    vae = load_vae(vae_dir)
    x = torch.rand(3, 3, SIZE, SIZE) * 2 - 1
    z = encode(vae, x)
    assert z.shape == (3, LATENT_CHANNELS, SIZE // 2, SIZE // 2) and z.dtype == torch.float32
    assert torch.equal(z, encode(vae, x))  # the mean, not a sample
    mean = vae.encode(x).latent_dist.mean
    torch.testing.assert_close(z, (mean - 0.1) * 0.5)
    y = decode(vae, z)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1


def test_grayscale_is_replicated_for_an_rgb_vae(vae_dir):
    vae = load_vae(vae_dir)
    gray = np.random.default_rng(1).integers(1, 256, (2, SIZE, SIZE, 1), dtype=np.uint8)
    z = encode_uint8(vae, list(gray))
    assert z.dtype == np.float16 and z.shape == (2, LATENT_CHANNELS, SIZE // 2, SIZE // 2)
    rgb = encode_uint8(vae, list(np.repeat(gray, 3, axis=3)))
    np.testing.assert_allclose(z.astype(np.float32), rgb.astype(np.float32), rtol=2e-3, atol=1e-4)


def test_load_vae_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_vae(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises((ValueError, FileNotFoundError), match=str(tmp_path)):
        load_vae(tmp_path)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now fails
    with pytest.raises(ImportError, match=r"flowpre\[vae\]"):
        load_vae(tmp_path)


def test_shards_hold_latents(latent_shards, vae_dir):
    out, paths = latent_shards
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["latent"]["channels"] == LATENT_CHANNELS
    assert (meta["latent"]["height"], meta["latent"]["width"]) == (SIZE // 2, SIZE // 2)
    assert meta["latent"]["scaling_factor"] == 0.5 and meta["latent"]["shift_factor"] == pytest.approx(0.1)
    assert meta["latent"]["vae"] == str(vae_dir.resolve())
    assert (meta["channels"], meta["height"], meta["width"]) == (3, SIZE, SIZE)  # pixels stay
    assert meta["splits"]["train"]["count"] == N_IMAGES and len(paths) == 3
    with tarfile.open(paths[0]) as tar:
        names = tar.getnames()
        assert "00000000.png" in names and "00000000.latent.npy" in names
        arr = np.load(io.BytesIO(tar.extractfile("00000000.latent.npy").read()))
    assert arr.dtype == np.float16 and arr.shape == (LATENT_CHANNELS, SIZE // 2, SIZE // 2)

    info = read_dataset_info(paths)
    assert (info["channels"], info["height"], info["width"]) == (LATENT_CHANNELS, SIZE // 2, SIZE // 2)
    assert info["pixel"] == {"channels": 3, "height": SIZE, "width": SIZE}
    assert info["latent"]["vae"] == meta["latent"]["vae"]
    assert vae_for_dataset(info) is not None and vae_for_dataset({"channels": 3}) is None


def test_loader_yields_latents_of_the_images(latent_shards, rgb_folder, vae_dir):
    _, paths = latent_shards
    vae = load_vae(vae_dir)
    items = _folder_images(rgb_folder)
    ref = encode(vae, torch.stack([x for x, _ in items]))
    ref_cls = torch.tensor([c for _, c in items])
    batches = list(ShardLoader(paths, batch_size=5, epochs=1, shuffle_buffer=8))
    x = torch.cat([b["x"] for b in batches])
    cond = torch.cat([b["cond"] for b in batches])
    assert x.dtype == torch.float32 and x.shape == (N_IMAGES, LATENT_CHANNELS, SIZE // 2, SIZE // 2)
    # Shuffled: match each yielded latent to its nearest reference; must be a permutation.
    match = torch.cdist(x.flatten(1), ref.flatten(1)).argmin(1)
    assert sorted(match.tolist()) == list(range(N_IMAGES))
    torch.testing.assert_close(x, ref[match], rtol=2e-3, atol=2e-3)  # float16 storage
    assert torch.equal(cond, ref_cls[match])
    assert sum(b["corrupt"] for b in batches[-1:]) == 0

    flipped = torch.cat([b["x"] for b in ShardLoader(paths, batch_size=N_IMAGES, epochs=1, hflip=True)])
    flips = sum(any(torch.equal(f, r.flip(-1)) for r in x) for f in flipped if not any(torch.equal(f, r) for r in x))
    assert flips > 0  # hflip flips the latent's width axis


def test_corrupt_latent_skipped_and_counted(latent_shards, tmp_path):
    out, paths = latent_shards
    shutil.copy(out / "dataset.json", tmp_path / "dataset.json")
    for p in paths[1:]:
        shutil.copy(p, tmp_path)
    bad = tmp_path / "train-000000.tar"
    # first shard rewritten: one garbled latent, one of the wrong shape, one missing
    with tarfile.open(paths[0]) as src, tarfile.open(bad, "w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            if m.name == "00000001.latent.npy":
                data = b"\x93NUMPY garbage" + data[40:60]
            elif m.name == "00000002.latent.npy":
                buf = io.BytesIO()
                np.save(buf, np.ones((LATENT_CHANNELS, 3, 3), np.float16))
                data = buf.getvalue()
            elif m.name == "00000003.latent.npy":
                continue
            m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    with pytest.raises(ValueError, match="unreadable latent"):
        read_latent(np.ones(3, np.float16).tobytes(), (1, 1, 3))  # raw bytes, no npy header
    loader = ShardLoader(str(tmp_path), batch_size=4, epochs=1)
    n = sum(len(b["x"]) for b in loader)
    assert n == N_IMAGES - 3 and loader.corrupt_count == 3


def test_cli_with_vae(rgb_folder, vae_dir, tmp_path):
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "flowpre.cli", "shards", "--source", f"folder:{rgb_folder}",
                        "--out", str(out), "--vae", str(vae_dir), "--limit", "6"],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert "latents 4x8x8" in r.stdout
    info = read_dataset_info([str(out / "train-000000.tar")])
    assert info["channels"] == LATENT_CHANNELS and info["latent"]["vae"] == str(vae_dir.resolve())
    # a folder that is not a VAE: a usage error naming it, not a traceback (in-process: a
    # second subprocess would pay diffusers' slow import again)
    parser = argparse.ArgumentParser()
    shards_cli.add_arguments(parser)
    args = parser.parse_args(["--source", f"folder:{rgb_folder}", "--out", str(tmp_path / "x"),
                              "--vae", str(tmp_path)])
    with pytest.raises(SystemExit, match=f"not a VAE folder.*{tmp_path}|{tmp_path}.*not a VAE folder"):
        shards_cli.run(args)


def test_training_on_latent_shards_samples_pixels(latent_shards, tmp_path):
    """The DiT trains on latents (shape from dataset.json) and its sample grids and the
    sample CLI decode through the shards' VAE back to pixel size."""
    from helpers import flowpre, train
    out, _ = latent_shards
    run = tmp_path / "run"
    train(run, str(out / "train-*.tar"), "model.name=DiT-1x32x2/2", "train.max_steps=2", "sample.steps=[2]",
          "data.shuffle_buffer=8", "train.batch_size=4")
    grid = Image.open(run / "samples" / "step0000002_2steps.png")
    # one column per class of decoded RGB images (the grid refuses 4-channel latents), SIZE
    # pixels upscaled to the readable 64
    cell, pad = 64, 2
    assert grid.size[0] == N_CLASSES * (cell + pad) + pad and grid.mode == "RGB"
    from flowpre.weights import read_metadata
    meta = read_metadata(run / "model.safetensors")
    assert meta["model"]["in_channels"] == LATENT_CHANNELS and meta["model"]["image_size"] == SIZE // 2
    png = tmp_path / "s.png"
    flowpre("sample", "--weights", str(run / "model.safetensors"), "--steps", "1,2", "--num", "3", "--out", str(png))
    width, height = Image.open(png).size
    assert width > 3 * (cell + pad) and 2 * (cell + pad) < height < 3 * (cell + pad) + 40  # 2 rows, a header
