"""Write an image source into webdataset tar shards (`flowpre shards`).

Layout of ``out_dir``::

    train-000000.tar  train-000001.tar ...  test-000000.tar ...  dataset.json

Each sample in a shard: key ``{index:08d}`` (index within the split), ``png``
(lossless PNG), ``cls`` (class id as text), ``json`` (class_name, source, index,
split and whatever the source adds). Shards are written to a ``.tmp`` name and
renamed when complete, so a crash never leaves a half shard under a final name.
``dataset.json`` describes the images and lists, per split, the count, the shards and
the shard index: ``nsamples``, each shard's sample count (as webdataset's wids shard
lists do), from which the reader plans epochs without reading and catches truncated
shards. Writing another split into the same directory adds to it.

With ``--vae PATH`` (a local diffusers AutoencoderKL) each sample also holds
``latent.npy``: its float16 latent (c, h, w), see flowpre/vae.py; dataset.json then
has a ``latent`` entry and the reader yields latents instead of pixels. The png stays
(it is small, and FID needs the real images).
"""
from __future__ import annotations

import argparse
import io
import json
import os
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from flowpre.vae import LATENT_KEY, encode_uint8, latent_bytes, latent_meta, load_vae

from . import synthetic
from .sources import Source, open_source

DATASET_JSON = "dataset.json"


def encode_png(image: np.ndarray) -> bytes:
    mode = {1: "L", 3: "RGB"}[image.shape[2]]
    buf = io.BytesIO()
    Image.fromarray(image[:, :, 0] if mode == "L" else image, mode).save(buf, format="PNG")
    return buf.getvalue()


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _with_latents(samples, vae, batch: int):
    """(image, cls, meta, latent or None); the VAE runs on batches, not image by image."""
    if vae is None:
        yield from ((image, cls, meta, None) for image, cls, meta in samples)
        return
    while chunk := list(islice(samples, batch)):
        latents = encode_uint8(vae, [image for image, _, _ in chunk])
        yield from ((*sample, latent) for sample, latent in zip(chunk, latents))


def _write_split(src: Source, out: Path, split: str, shard_size: int, limit: int | None,
                 vae=None, vae_batch: int = 64) -> tuple[list[str], list[int]]:
    """Write one split; returns (shard file names, their sample counts). Samples the source skips
    (unreadable files) are left out of the numbering, so indices stay dense."""
    names: list[str] = []
    counts: list[int] = []
    writer, tmp = None, None

    def finish():
        writer.close()
        os.replace(tmp, out / names[-1])

    try:
        samples = _with_latents(islice(src.samples(split), limit), vae, vae_batch)
        for index, (image, cls, meta, latent) in enumerate(samples):
            if index % shard_size == 0:
                if writer is not None:
                    finish()
                names.append(f"{split}-{len(names):06d}.tar")
                counts.append(0)
                tmp = out / (names[-1] + ".tmp")
                # A fixed mtime makes the same data give byte-identical shards.
                writer = wds.TarWriter(str(tmp), mtime=0)
            meta = {"class_name": src.info.class_names[cls], "source": src.info.name,
                    "index": index, "split": split, **meta}
            sample = {"__key__": f"{index:08d}", "png": encode_png(image), "cls": str(cls), "json": meta}
            if latent is not None:
                sample[LATENT_KEY] = latent_bytes(latent)
            writer.write(sample)
            counts[-1] += 1
        if writer is not None:
            finish()
    except BaseException:
        if writer is not None:
            writer.close()
            tmp.unlink(missing_ok=True)
        raise
    # Shards of an earlier, larger run of this split would otherwise be picked up by a
    # directory glob at read time.
    for stale in out.glob(f"{split}-*.tar"):
        if stale.name not in names:
            stale.unlink()
    return names, counts


def write_shards(source: str, out_dir, shard_size: int = 5000, split: str = "train",
                 image_size: int | None = None, limit: int | None = None, vae=None,
                 vae_batch: int = 64) -> list[str]:
    """Write `source` ("fashion-mnist", "digits", "folder:PATH") as shards in `out_dir`.

    split: "train", "test", "heldout" or "all" (every split the source has). limit: at most that many
    samples per split. vae: folder of a diffusers AutoencoderKL; adds latent.npy to each
    sample (encoded vae_batch images at a time, on the GPU when there is one). Returns the
    paths of the shards written, in order.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    src = open_source(source, image_size)
    splits = list(src.info.splits) if split == "all" else [split]
    for s in splits:
        if s not in src.info.splits:
            raise ValueError(f"source {source!r} has no split {s!r} (it has: {', '.join(src.info.splits)})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    meta_path = out / DATASET_JSON
    info = src.info.to_dict()
    info.pop("splits")
    vae_model = None
    if vae is not None:
        vae_model = load_vae(vae, "cuda" if torch.cuda.is_available() else "cpu")
        info["latent"] = latent_meta(vae_model, vae, info["height"], info["width"])
    meta = {**info, "splits": {}}
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        # "latent" too: latents of another VAE (or none) must not mix with these
        if any(old.get(k) != info.get(k) for k in {*info, "latent"}):
            raise ValueError(f"{out} already holds shards of another dataset ({old.get('name')!r}, "
                             f"{old.get('channels')}x{old.get('height')}x{old.get('width')}, "
                             f"latents: {old.get('latent', {}).get('vae', 'none')}); "
                             "use another --out directory")
        meta["splits"] = old.get("splits", {})

    paths = []
    for s in splits:
        names, counts = _write_split(src, out, s, shard_size, limit, vae_model, vae_batch)
        meta["splits"][s] = {"count": sum(counts), "skipped": getattr(src, "skipped", 0), "shards": names,
                             "nsamples": dict(zip(names, counts))}
        paths += [str(out / n) for n in names]
        _write_json_atomic(meta_path, meta)
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True,
                        help="fashion-mnist | digits | twemoji | twemoji-subgroups | folder:PATH (class subfolders) | "
                             "synthetic-latents (random ImageNet-shaped 4x32x32 latents, 1000 classes; "
                             "--limit N of them, default 10000: loop benchmarks)")
    parser.add_argument("--out", required=True, help="output directory for the shards and dataset.json")
    parser.add_argument("--shard-size", type=int, default=5000, help="samples per shard (default 5000)")
    parser.add_argument("--split", default="train", choices=["train", "test", "heldout", "all"],
                        help="a split of the source (twemoji-subgroups has train and heldout), or all of them")
    parser.add_argument("--image-size", type=int, default=None,
                        help="folder sources: resize the shorter side to S and center-crop SxS; twemoji: SxS")
    parser.add_argument("--limit", type=int, default=None, help="at most N samples per split")
    parser.add_argument("--vae", default=None, metavar="PATH",
                        help="local diffusers AutoencoderKL folder: also store each image's latent "
                             "(latent training; needs pip install flowpre[vae])")


def run(args: argparse.Namespace) -> int:
    try:
        if args.source == synthetic.SOURCE:
            if args.split != "train" or args.image_size or getattr(args, "vae", None):
                raise ValueError(f"--source {synthetic.SOURCE} writes a train split of latents: "
                                 "--split, --image-size and --vae do not apply")
            paths = synthetic.write_synthetic_latents(args.out, count=args.limit or synthetic.DEFAULT_COUNT,
                                                      shard_size=args.shard_size)
        else:
            paths = write_shards(args.source, args.out, shard_size=args.shard_size, split=args.split,
                                 image_size=args.image_size, limit=args.limit, vae=getattr(args, "vae", None))
    except (ValueError, FileNotFoundError, ImportError) as e:  # bad spec, sizes, VAE: usage errors
        raise SystemExit(f"flowpre shards: error: {e}") from None
    meta = json.loads((Path(args.out) / DATASET_JSON).read_text())
    written = {Path(p).name for p in paths}
    for s, entry in meta["splits"].items():
        if written & set(entry["shards"]):
            print(f"{s}: {entry['count']} samples in {len(entry['shards'])} shards -> {args.out} "
                  f"({meta['name']}, {meta['channels']}x{meta['height']}x{meta['width']}, "
                  f"{meta['num_classes']} classes"
                  + (", latents {channels}x{height}x{width}".format(**meta["latent"]) if "latent" in meta else "")
                  + (f", {entry['skipped']} unreadable files skipped)" if entry.get("skipped") else ")"))
    return 0
