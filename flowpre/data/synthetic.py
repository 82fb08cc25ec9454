"""Synthetic latent shards: `flowpre shards --source synthetic-latents --out DIR [--limit N]`.

For measuring the training loop where no dataset is at hand (the GPU check; a new
cluster): float16 latents of the shape DiT trains on for ImageNet 256 (SD-VAE: 4x32x32,
1000 classes), in the layout `flowpre shards --vae` writes, so the real reading pipeline
loads them exactly as it would real latents. 10,000 of them take a few seconds.

Each class has its own fixed mean pattern under unit noise, so the labels carry
information and the loss can fall. There is no VAE: dataset.json's latent entry names
none (sample grids then show the raw latent channels), and samples hold no png.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import webdataset as wds

from flowpre.vae import LATENT_KEY, latent_bytes

SOURCE = "synthetic-latents"
# ImageNet 256 through SD's VAE: 8x downsampling, 4 channels
DEFAULT_SHAPE = (4, 32, 32)
DEFAULT_CLASSES = 1000
DEFAULT_COUNT = 10_000
CLASS_MEAN_STD = 0.5  # spread of the per-class mean patterns, against unit noise


def dataset_meta(count: int, shard_names: list[str], channels: int, size: int, num_classes: int,
                 shard_size: int | None = None) -> dict:
    """dataset.json as `flowpre shards --vae` writes it, with no VAE behind the latents."""
    pixels = size * 8  # what the latents stand for: the SD-VAE's downsampling
    return {"name": SOURCE, "num_classes": num_classes, "class_names": [f"class{i}" for i in range(num_classes)],
            "channels": 3, "height": pixels, "width": pixels,
            "latent": {"channels": channels, "height": size, "width": size, "scaling_factor": 1.0,
                       "shift_factor": 0.0, "vae": None},
            "splits": {"train": {"count": count, "skipped": 0, "shards": shard_names,
                                 "nsamples": {name: min(shard_size or count, count - i * (shard_size or count))
                                              for i, name in enumerate(shard_names)}}}}


def write_synthetic_latents(out_dir, count: int = DEFAULT_COUNT, shard_size: int = 1000,
                            shape: tuple[int, int, int] = DEFAULT_SHAPE, num_classes: int = DEFAULT_CLASSES,
                            seed: int = 0) -> list[str]:
    """Write `count` latents of `shape` (c, h, w), labels cycling through `num_classes`, as
    train-NNNNNN.tar shards of `shard_size` in `out_dir`. Returns the shard paths."""
    channels, height, width = shape
    if count < 1 or shard_size < 1 or num_classes < 1 or height != width:
        raise ValueError(f"synthetic latents: count, shard size and classes must be >= 1 and the latent square "
                         f"(got count={count}, shard_size={shard_size}, classes={num_classes}, shape={shape})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "dataset.json"
    if meta_path.exists() and json.loads(meta_path.read_text()).get("name") != SOURCE:
        raise ValueError(f"{out} already holds shards of another dataset; use another --out directory")
    rng = np.random.default_rng(seed)
    means = (rng.standard_normal((num_classes, *shape), dtype=np.float32) * CLASS_MEAN_STD)
    names = []
    for start in range(0, count, shard_size):
        names.append(f"train-{len(names):06d}.tar")
        tmp = out / (names[-1] + ".tmp")
        n = min(shard_size, count - start)
        # a prime stride: every window of num_classes samples holds each class once
        labels = (np.arange(start, start + n) * 7919) % num_classes
        latents = (means[labels] + rng.standard_normal((n, *shape), dtype=np.float32)).astype(np.float16)
        with wds.TarWriter(str(tmp), mtime=0) as writer:
            for i in range(n):
                writer.write({"__key__": f"{start + i:08d}", LATENT_KEY: latent_bytes(latents[i]),
                              "cls": str(int(labels[i]))})
        os.replace(tmp, out / names[-1])
    for stale in out.glob("train-*.tar"):  # a larger earlier run would otherwise be globbed in
        if stale.name not in names:
            stale.unlink()
    tmp = meta_path.with_name(meta_path.name + ".tmp")
    tmp.write_text(json.dumps(dataset_meta(count, names, channels, height, num_classes, shard_size), indent=2) + "\n")
    os.replace(tmp, meta_path)
    return [str(out / n) for n in names]
