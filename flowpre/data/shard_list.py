"""Shard lists and what is known about them before reading: patterns -> shard URLs, the
dataset's description (dataset.json), and the shard index (each shard's sample count,
dataset.json "nsamples", written by `flowpre shards`)."""
from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
import tarfile
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

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
    meta = dataset_json(first)
    if meta is not None:
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


# the shard's own URL inside a pipe: command ("pipe:aws s3 cp s3://b/train-000001.tar -")
_PIPE_TARGET = re.compile(r"[^\s'\"]+\.tar\b")


def shard_name(url: str) -> str:
    """The shard's file name, for a path, an http(s) URL or a pipe: command."""
    if url.startswith("pipe:"):
        found = _PIPE_TARGET.findall(url)
        return os.path.basename(found[-1]) if found else url
    return os.path.basename(urlparse(url).path if "://" in url else url)


def beside(url: str, name: str) -> str | None:
    """The URL (or pipe: command) of file `name` in the shard's folder, or None when the
    shard's own location cannot be found in it."""
    if url.startswith("pipe:"):
        found = _PIPE_TARGET.findall(url)
        if not found:
            return None
        target = found[-1]
        i = url.rindex(target)
        return url[:i] + target.rsplit("/", 1)[0] + "/" + name + url[i + len(target):] if "/" in target \
            else url[:i] + name + url[i + len(target):]
    if "://" in url:
        parts = urlparse(url)
        return parts._replace(path=parts.path.rsplit("/", 1)[0] + "/" + name, query="", fragment="").geturl()
    return os.path.join(os.path.dirname(url), name)


_remote_json: dict[str, dict | None] = {}  # a remote read per process, not per shard


def dataset_json(url: str) -> dict | None:
    """dataset.json beside shard `url`, read through the shards' own opener (a path, curl for
    http(s), the pipe: command with the shard's name replaced); None when there is none."""
    where = beside(url, "dataset.json")
    if where is None:
        return None
    if not _is_remote(where):
        return json.loads(Path(where).read_text()) if os.path.isfile(where) else None
    if where not in _remote_json:
        meta = None
        try:
            with wds.gopen(where, "rb") as f:
                data = f.read()
            meta = json.loads(data) if data.strip() else None
        except (OSError, ValueError) as e:  # absent (curl -f, a failing command) or not json
            log.warning("no dataset.json read from %s (%s): guessing the dataset from its first shard", where, e)
        _remote_json[where] = meta
    return _remote_json[where]


def shard_counts(shards: list[str]) -> list[int] | None:
    """Each shard's sample count from the shard index (the "nsamples" of a split in the
    dataset.json beside it), or None when any shard is missing from it (shards written
    before the index)."""
    counts, indexes = [], {}
    for url in shards:
        where = beside(url, "dataset.json")
        if where not in indexes:
            meta = dataset_json(url) or {}
            indexes[where] = {name: int(n) for split in meta.get("splits", {}).values()
                              for name, n in split.get("nsamples", {}).items()}
        n = indexes[where].get(shard_name(url))
        if n is None:
            return None
        counts.append(n)
    return counts
