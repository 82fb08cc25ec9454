"""Shard lists and what is known about them before reading: patterns -> shard URLs, the
dataset's description (dataset.json), and the shard index (each shard's sample count,
dataset.json "nsamples", written by `flowpre shards`)."""
from __future__ import annotations

import glob
import io
import json
import logging
import os
import tarfile
from pathlib import Path
from typing import Iterator

import braceexpand
import webdataset as wds
from PIL import Image
from webdataset import tariterators

from flowpre.vae import LATENT_KEY

from .sources import image_mode

log = logging.getLogger(__name__)



def _is_remote(spec: str) -> bool:
    return "://" in spec or spec.startswith("pipe:")


def _split_commas(pattern: str) -> list[str]:
    """Split on commas outside braces, so "a-{0,1}.tar,b.tar" is two parts."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(pattern):
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            parts.append(pattern[start:i])
            start = i + 1
    parts.append(pattern[start:])
    return [p.strip() for p in parts if p.strip()]


def resolve_shards(pattern: str) -> list[str]:
    """Shard paths from a directory (its *.tar), brace patterns ({000000..000009}, {a,b}),
    globs, or a comma-separated list of these. Sorted and deduplicated. URLs (http://,
    pipe:...) are brace-expanded but not checked. Raises FileNotFoundError naming the
    pattern when any part matches nothing."""
    found: set[str] = set()
    for part in _split_commas(pattern or ""):
        if _is_remote(part):
            found.update(braceexpand.braceexpand(part))
            continue
        part = os.path.expanduser(part)
        if os.path.isdir(part):
            matches = glob.glob(os.path.join(part, "*.tar"))
        else:
            matches = []
            for p in braceexpand.braceexpand(part):
                matches += glob.glob(p) if glob.has_magic(p) else ([p] if os.path.isfile(p) else [])
        if not matches:
            raise FileNotFoundError(f"no shards match {part!r} (from shard pattern {pattern!r})")
        found.update(matches)
    if not found:
        raise FileNotFoundError(f"no shards match {pattern!r}")
    return sorted(found)


def _tar_samples(url: str) -> Iterator[dict]:
    """Samples of one shard, grouped by key. A read error (truncated or corrupt tar) ends
    the shard: the sample being read is yielded if it already has png and cls, and then a
    dict {"__error__": exc, "__key__": last key seen} marks the loss of the rest."""
    current = None
    try:
        with wds.gopen(url, "rb") as stream:
            for f in tariterators.tar_file_iterator(stream):
                prefix, suffix = tariterators.base_plus_ext(f["fname"])
                if prefix is None:
                    continue
                if current is not None and prefix != current["__key__"]:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": prefix, "__url__": url}
                current[suffix.lower()] = f["data"]
    except (OSError, EOFError, ValueError, tarfile.TarError) as e:  # truncated, corrupt, vanished
        key = current["__key__"] if current else None
        if current is not None and "cls" in current and ("png" in current or LATENT_KEY in current):
            yield current
        yield {"__error__": e, "__key__": key, "__url__": url}
        return
    if current is not None:
        yield current


def read_dataset_info(shards: list[str]) -> dict:
    """channels, height, width, num_classes (and name, class_names when known) of the shards:
    from dataset.json beside the first shard, else from its first sample (num_classes is
    then max(cls) + 1 over that shard, a lower bound). For latent shards channels, height
    and width are the latent's (what the model sees); "pixel" keeps the images' and
    "latent" the dataset.json entry (scaling, VAE path)."""
    first = shards[0]
    meta_path = Path(first).parent / "dataset.json"
    if not _is_remote(first) and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        info = {k: meta[k] for k in ("name", "num_classes", "class_names", "channels", "height", "width",
                                     "has_captions")
                if k in meta}
        if "latent" in meta:
            shape = ("channels", "height", "width")
            info = {**info, "pixel": {k: info[k] for k in shape}, "latent": meta["latent"],
                    **{k: meta["latent"][k] for k in shape}}
        return info
    info, max_cls = None, -1
    for s in _tar_samples(first):
        if "__error__" in s:
            break
        if info is None and "png" in s:
            with Image.open(io.BytesIO(s["png"])) as img:
                info = {"channels": 1 if image_mode(img) == "L" else 3, "height": img.height,
                        "width": img.width}
        if "cls" in s and s["cls"].strip().isdigit():
            max_cls = max(max_cls, int(s["cls"]))
    if info is None:
        raise ValueError(f"{first}: no readable png sample and no dataset.json beside it")
    return {**info, "num_classes": max_cls + 1}


def shard_counts(shards: list[str]) -> list[int] | None:
    """Each shard's sample count from the shard index (the "nsamples" of a split in the
    dataset.json beside it), or None when any shard is missing from it (shards written
    before the index, or remote ones)."""
    by_dir: dict[str, dict[str, int]] = {}
    counts = []
    for url in shards:
        if _is_remote(url):
            return None
        folder = os.path.dirname(url)
        if folder not in by_dir:
            meta_path = Path(folder) / "dataset.json"
            meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
            by_dir[folder] = {name: int(n) for split in meta.get("splits", {}).values()
                              for name, n in split.get("nsamples", {}).items()}
        n = by_dir[folder].get(os.path.basename(url))
        if n is None:
            return None
        counts.append(n)
    return counts
