"""Checkpoint integrity: every file's size and SHA-256 in meta.json, checked before resuming.

A checkpoint folder is complete once its meta.json exists (written last, see
checkpoint.py), but a complete folder can still be damaged later: a half-finished
copy between filesystems, a truncated file after a full disk, a flipped byte. The
manifest lets `resume=auto` notice and fall back to the previous checkpoint instead of
dying in torch's unpickler.

SHA-256 (not a cheaper CRC) so that a user can check a file by hand with `sha256sum`;
with SHA extensions it hashes about 1.5 GB/s per core (measured here), and the files are
split among the ranks, each hashing its share, so a DiT-XL checkpoint (~14 GB with
Adam state and both EMAs) costs about 1 s per rank on 8 ranks, on top of the write.
Checkpoints written before this manifest existed still load, with a warning that they
cannot be verified.
"""
import hashlib
import json
import warnings
from pathlib import Path

import torch

META = "meta.json"


class DamagedCheckpoint(RuntimeError):
    """A checkpoint whose files do not match its manifest; the message names the file."""


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file() and p.name != META)


def _share(items, dist):
    """This rank's part of `items` (round robin), or all of them outside a process group."""
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    return items[rank::world]


def _gather(part, dist):
    """The union of every rank's dict (all ranks get it; the same on all of them)."""
    if dist is None or dist.world_size == 1 or not torch.distributed.is_initialized():
        return part
    parts = [None] * dist.world_size
    torch.distributed.all_gather_object(parts, part)
    return {k: v for p in parts for k, v in p.items()}


def manifest(folder, dist=None):
    """{relative path: {size, sha256}} of every file under `folder` but meta.json; collective."""
    folder = Path(folder)
    mine = {name: {"size": (folder / name).stat().st_size, "sha256": sha256(folder / name)}
            for name in _share(_files(folder), dist)}
    return dict(sorted(_gather(mine, dist).items()))


def problems(folder, dist=None):
    """[(file, what is wrong)] for a complete checkpoint folder; [] when it verifies, None when it has
    no manifest (written before checksums). Collective when `dist` is given: every rank checks a share
    of the files and all ranks get the same answer."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, ValueError) as e:
        return [(str(folder / META), f"unreadable ({e})")]
    files = meta.get("files")
    if files is None:
        return None
    found = {}
    for name in _share(sorted(files), dist):
        path, want = folder / name, files[name]
        if not path.is_file():
            found[str(path)] = "missing"
        elif path.stat().st_size != want["size"]:
            found[str(path)] = f"{path.stat().st_size} bytes, {want['size']} when written (truncated or replaced)"
        elif sha256(path) != want["sha256"]:
            found[str(path)] = "SHA-256 differs from the one recorded when written (corrupted)"
    return sorted(_gather(found, dist).items())


def check(folder, dist=None):
    """Raise DamagedCheckpoint naming the first bad file; warn when the folder cannot be verified."""
    bad = problems(folder, dist)
    if bad is None:
        warnings.warn(f"checkpoint {folder} has no checksums (written by an older flowpre): it cannot be "
                      "verified, loading it as it is", stacklevel=2)
        return
    if bad:
        lines = "; ".join(f"{f}: {why}" for f, why in bad)
        raise DamagedCheckpoint(f"checkpoint {folder} is damaged: {lines}")


def newest_intact(candidates, dist=None):
    """The newest of [(step, path)] (oldest first) that verifies; each damaged one is warned about,
    naming its bad file. None when none is intact."""
    for step, path in reversed(candidates):
        try:
            check(path, dist)
            return path
        except DamagedCheckpoint as e:
            if dist is None or dist.is_main:
                warnings.warn(f"{e}. Falling back to the previous complete checkpoint.", stacklevel=2)
    return None
