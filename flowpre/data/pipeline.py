"""Reading side: webdataset shards -> batches for 1..many ranks, with exact resume.

The sample order is a pure function of (shards, seed, shuffle_buffer): the global
stream. Each epoch permutes the shard list with an RNG seeded by (seed, epoch), reads the
shards in that order, drops samples that fail the header check, and shuffles through a
buffer seeded by (seed, epoch). The epochs are concatenated, and position p of that
stream goes to rank p mod world_size, whose batches take its samples in order (batch j
from data-loader worker j mod num_workers). After s optimizer steps of global batch B,
every rank has consumed exactly the positions [0, s*B) between them, whatever the world
size; that is why a run can continue on another world size from a global sample count
(`ShardLoader(start_batch=count // (world_size * batch_size))`) with no sample of the
epoch repeated or skipped. Nothing depends on timing or on torch's worker seeding, so
resume is exact.

The price: every worker reads (and header-checks) every tar of each epoch, and decodes
only its own samples. Reading is sequential and cheap next to decoding and training for
datasets of up to a few million samples; beyond that, a shard-level assignment with a
fixed number of logical streams would avoid the re-reading (not done).

Within a worker: read tar -> cheap header check (cls text, PNG header: mode and size vs
the dataset; with has_captions in dataset.json, a string "caption" in the json) ->
global shuffle buffer -> keep this worker's positions, from the resume position on ->
decode PNG -> hflip (decided by a hash of seed, epoch, shard and key) -> batches of
`batch_size`. In infinite mode batches run across epoch boundaries and are always full;
in finite mode a worker's last batch may be short. A corrupt sample is counted by one
worker only (its raw index mod ranks x workers). Batches carry `keys`,
"epoch:shard:key" per sample.

Resume. torch's DataLoader takes batches round-robin from workers 0..W-1, starting at
worker 0. A loader built with start_batch=b gives physical worker w the logical id
(w + b) % W, so batch b again comes from the logical worker that made it first.
Exactness assumes all workers are still producing (always true in infinite mode), and
that corrupt samples are caught by the header check: a PNG whose header parses but whose
pixel data does not is only found at decode time and shortens that batch's stream by
one sample. Resuming re-reads the tars (without decoding) until the validity of every
shard's samples is known; from then on whole epochs are skipped unread.

Latent shards (written with `flowpre shards --vae`, dataset.json has a "latent" entry):
`x` is each sample's latent.npy as float32 (B, c, h, w), unscaled; the png is not read.
The whole latent is checked in the header check, so corrupt latents never shift a
resume. hflip flips the latent's width axis: not exactly the latent of the flipped
image, but the standard approximation of DiT-style latent training.
"""
from __future__ import annotations

import glob
import hashlib
import io
import itertools
import json
import logging
import os
import random
import tarfile
from pathlib import Path
from typing import Iterator

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from webdataset import tariterators

from flowpre.vae import LATENT_KEY, read_latent

from .sources import image_mode

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- shard lists

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


# ----------------------------------------------------------------------------- worker side

def _rng_seed(*parts) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _shuffled(samples, size: int, rng: random.Random):
    """webdataset-style shuffle buffer, driven by our own seeded RNG."""
    if size <= 1:
        yield from samples
        return
    buf = []
    for s in samples:
        if len(buf) < size:
            buf.append(s)
            continue
        i = rng.randrange(size)
        yield buf[i]
        buf[i] = s
    rng.shuffle(buf)
    yield from buf


class _WorkerState:
    def __init__(self, worker: int):
        self.worker = worker
        self.corrupt = 0
        self.warned = False


class ShardStream(torch.utils.data.IterableDataset):
    """The per-worker batch stream; ShardLoader wraps it in a DataLoader(batch_size=None)."""

    def __init__(self, shards, batch_size, rank, world_size, num_workers, seed, hflip,
                 shuffle_buffer, epochs, start_batch, channels, height, width, num_classes=None,
                 latent=False, captions=False):
        super().__init__()
        self.shards, self.batch_size = list(shards), batch_size
        self.rank, self.world_size, self.workers = rank, world_size, max(1, num_workers)
        self.seed, self.hflip, self.shuffle_buffer = seed, hflip, shuffle_buffer
        self.epochs, self.start_batch = epochs, start_batch
        self.shape = (channels, height, width)
        self.num_classes = num_classes
        self.latent = latent  # shape is then the latent's, and x comes from latent.npy
        self.captions = captions  # batches carry "captions" from each sample's json
        self._valid: dict[str, np.ndarray] = {}  # shard -> which raw samples pass _problem

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        W, b = self.workers, self.start_batch
        worker = ((info.id if info else 0) + b) % W
        state = _WorkerState(worker)
        xs, ys, caps, tags = [], [], [], []
        start = b * self.batch_size * self.world_size  # global position of this rank's batch b
        for epoch, s in self._samples(state, start):
            x = self._decode(s, state)
            if x is None:
                continue
            if self.hflip and self._flip(epoch, s):
                x = x[:, :, ::-1]
            xs.append(x)
            ys.append(s["cls"])
            caps.append(s.get("caption"))
            tags.append(f"{epoch}:{os.path.basename(s['__url__'])}:{s['__key__']}")
            if len(xs) == self.batch_size:
                yield self._collate(xs, ys, caps, tags, state)
                xs, ys, caps, tags = [], [], [], []
        if xs:  # only reached in finite mode
            yield self._collate(xs, ys, caps, tags, state)

    def _mine(self, position: int, worker: int) -> bool:
        """Whether global position `position` is this rank's and this logical worker's:
        rank = position mod world_size, and the rank's local index feeds its batches in
        order, batch j coming from logical worker j mod workers."""
        local, rank = divmod(position, self.world_size)
        return rank == self.rank and (local // self.batch_size) % self.workers == worker

    def _samples(self, state: _WorkerState, start: int):
        """(epoch, raw sample) of this worker from the global stream, header-checked and
        shuffled, from global position `start` on (resume); undecoded."""
        slot, slots = self.rank * self.workers + state.worker, self.world_size * self.workers
        position = 0  # over the concatenation of epochs
        for epoch in (itertools.count() if self.epochs is None else range(self.epochs)):
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
            shards = [self.shards[i] for i in order]
            n = self._epoch_count(shards)
            # A resume far into a run would re-read every epoch since the start; once the
            # validity of the shards' samples is known, whole epochs are skipped unread.
            if n is not None and position + n <= start and (n > 0 or self.epochs is not None):
                position += n
                continue
            rng = random.Random(_rng_seed(self.seed, epoch))
            n = 0
            for s in _shuffled(self._read(shards, slot, slots, state), self.shuffle_buffer, rng):
                n += 1
                position += 1
                if position > start and self._mine(position - 1, state.worker):
                    yield epoch, s
            if n == 0 and self.epochs is None:
                raise RuntimeError(f"rank {self.rank} worker {state.worker}: no usable samples in epoch "
                                   f"{epoch} from {len(self.shards)} shards (all corrupt?)")

    def _epoch_count(self, shards) -> int | None:
        """Valid samples in an epoch over `shards`, if every shard's validity is known."""
        if any(u not in self._valid for u in shards):
            return None
        return sum(int(self._valid[u].sum()) for u in shards)

    def _read(self, shards, slot, slots, state):
        """Every valid sample of `shards`, in order: the global stream must be the same on
        every rank and worker. A corrupt one is counted by one slot only (its raw index
        mod slots). Notes which samples of each shard are valid (for _epoch_count)."""
        index = 0
        for url in shards:
            flags = []
            for s in _tar_samples(url):
                index += 1
                if "__error__" in s:
                    problem = f"unreadable tar ({s['__error__']!r}); rest of shard lost"
                else:
                    problem = self._problem(s)
                flags.append(problem is None)
                if problem is None:
                    yield s
                elif (index - 1) % slots == slot:
                    self._corrupt(state, s, problem)
            self._valid[url] = np.array(flags, dtype=bool)

    def _problem(self, s: dict) -> str | None:
        """Cheap validation before the shuffle: everything short of decoding the pixels.
        Returns what is wrong, or None (and s["cls"] becomes an int)."""
        image = LATENT_KEY if self.latent else "png"
        if image not in s or "cls" not in s:
            return f"missing {image if image not in s else 'cls'}"
        try:
            cls = int(s["cls"].decode("utf-8").strip())
        except (UnicodeDecodeError, ValueError):
            return f"bad cls {s['cls'][:20]!r}"
        if cls < 0 or (self.num_classes and cls >= self.num_classes):
            return f"cls {cls} outside 0..{self.num_classes - 1}"
        if self.captions:
            try:
                caption = json.loads(s["json"])["caption"] if "json" in s else None
            except (ValueError, TypeError, KeyError):
                caption = None
            if not isinstance(caption, str):
                return "missing or unreadable caption (json 'caption')"
            s["caption"] = caption
        if self.latent:  # a few KB: parse it all here, so decode never fails after a resume skip
            try:
                s["latent"] = read_latent(s[LATENT_KEY], self.shape)
            except ValueError as e:
                return str(e)
            s["cls"] = cls
            return None
        try:
            with Image.open(io.BytesIO(s["png"])) as img:  # parses the header only
                shape = (1 if image_mode(img) == "L" else 3, img.height, img.width)
        except Exception as e:  # PIL raises several types for garbage
            return f"undecodable png ({e})"
        if shape != self.shape:
            return f"image shape {shape} but the dataset is {self.shape}"
        s["cls"] = cls
        return None

    def _decode(self, s: dict, state: _WorkerState) -> np.ndarray | None:
        """PNG -> uint8 (C, H, W); grayscale stays 1 channel, RGBA/P become RGB. Latent
        shards: the float16 latent parsed by _problem."""
        if self.latent:
            return s["latent"]
        try:
            with Image.open(io.BytesIO(s["png"])) as img:
                arr = np.asarray(img.convert("L" if self.shape[0] == 1 else "RGB"))
        except Exception as e:
            return self._corrupt(state, s, f"undecodable png ({e})")
        return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)

    def _flip(self, epoch: int, s: dict) -> bool:
        tag = f"{self.seed}:{epoch}:{os.path.basename(s['__url__'])}:{s['__key__']}".encode()
        return bool(hashlib.blake2b(tag, digest_size=1).digest()[0] & 1)

    def _corrupt(self, state: _WorkerState, s: dict, reason: str):
        state.corrupt += 1
        if not state.warned:
            state.warned = True
            log.warning("skipping corrupt sample %r in %s: %s (rank %d, worker %d; further corrupt "
                        "samples in this worker are counted, not logged)", s.get("__key__"),
                        s.get("__url__"), reason, self.rank, state.worker)
        return None

    def _collate(self, xs, ys, caps, tags, state: _WorkerState) -> dict:
        x = torch.from_numpy(np.ascontiguousarray(np.stack(xs))).float()
        if not self.latent:
            x = x.div_(127.5).sub_(1.0)
        batch = {"x": x, "cond": torch.tensor(ys, dtype=torch.int64), "corrupt": state.corrupt,
                 "worker": state.worker, "keys": tags}
        if self.captions:
            batch["captions"] = caps
        return batch


# ----------------------------------------------------------------------------- main process

class ShardLoader:
    """Batches {"x": float32 (B,C,H,W) in [-1,1], "cond": int64 (B,), "corrupt": int} for one rank.
    For latent shards (info has "latent") x is the latent (B,c,h,w), unscaled.

    shards: list of paths (or a pattern for resolve_shards). batch_size: per rank.
    epochs: None for an endless stream, or a number of passes (tests, evaluation).
    start_batch: resume; yields exactly what a fresh loader yields from its batch
    `start_batch` on. After iteration, `batches_consumed` is start_batch plus the batches
    handed out (save it in the checkpoint) and `corrupt_count` the corrupt samples skipped
    by all workers in this iteration. Iterating again starts over from start_batch.
    """

    def __init__(self, shards, batch_size: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, seed: int = 0, hflip: bool = False,
                 shuffle_buffer: int = 1000, epochs: int | None = None, start_batch: int = 0,
                 info: dict | None = None, prefetch_factor: int = 4):
        if isinstance(shards, str):
            shards = resolve_shards(shards)
        if not shards:
            raise FileNotFoundError("ShardLoader: empty shard list")
        if batch_size < 1 or not 0 <= rank < world_size or num_workers < 0 or start_batch < 0:
            raise ValueError(f"ShardLoader: bad batch_size={batch_size}, rank={rank}, "
                             f"world_size={world_size}, num_workers={num_workers} or start_batch={start_batch}")
        self.info = info or read_dataset_info(shards)
        self.start_batch = start_batch
        self.batches_consumed = start_batch
        self.corrupt_count = 0
        self.dataset = ShardStream(shards, batch_size, rank, world_size, num_workers, seed, hflip,
                                   shuffle_buffer, epochs, start_batch, self.info["channels"],
                                   self.info["height"], self.info["width"], self.info.get("num_classes"),
                                   latent="latent" in self.info, captions=bool(self.info.get("has_captions")))
        extra = {"persistent_workers": True, "prefetch_factor": prefetch_factor} if num_workers else {}
        self.loader = torch.utils.data.DataLoader(self.dataset, batch_size=None, num_workers=num_workers,
                                                  pin_memory=torch.cuda.is_available(), **extra)

    def __iter__(self) -> Iterator[dict]:
        self.batches_consumed = self.start_batch
        self.corrupt_count = 0
        latest: dict[int, int] = {}  # logical worker -> its cumulative corrupt count
        for batch in self.loader:
            latest[batch.pop("worker")] = batch["corrupt"]
            self.corrupt_count = sum(latest.values())
            self.batches_consumed += 1
            yield batch
