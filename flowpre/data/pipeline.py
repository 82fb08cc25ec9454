"""Reading side: webdataset shards -> batches for 1..many ranks, each shard read once per
epoch by the whole job, with exact resume on the same or another world size.

Streams (streams.py). A run has a fixed number S of logical streams (`data.streams`,
recorded in checkpoints). Each epoch deals the shards out to the streams (a function of
seed and epoch); each stream reads its shards in order, drops samples that fail the
header check, shuffles through its own buffer seeded by (seed, epoch, stream), and goes
on into its next epoch. Position p of the global order is the (p div S)-th sample of
stream p mod S: a pure function of (shards, seed, S, shuffle_buffer) whatever the ranks
and workers. Rank r takes the positions p mod world_size == r, as before, which are the
samples of its streams; its batches take its positions in order. After s optimizer
steps of global batch B every rank has consumed exactly the positions [0, s*B) between
them, so a run continues on another world size from the global sample count with no
sample repeated or skipped. Each physical worker (rank x data worker) serves whole
streams and opens only their shards: the job reads the dataset once per epoch, and adding
workers or ranks adds throughput.

Within a worker: for each batch of its rank, the worker fills the positions of its own
streams (every W-th one) and yields that part; the main process puts the W parts of a
batch together in position order. Per stream: read tar -> header check (cls text, PNG
header: mode and size vs the dataset; latents parsed whole; with has_captions a string
"caption") -> the stream's shuffle buffer (data.shuffle_buffer split over the S
streams, so memory is what one global buffer took) -> decode -> hflip (decided by a hash
of seed, epoch, shard and key). Batches carry `keys`, "epoch:shard:key" per sample.

Epoch boundaries are per stream: the plan keeps the streams' running sample totals within
about one shard of each other, so stream epochs start and end within a shard's worth of
samples of each other; every sample is delivered exactly once per epoch, and a key's tag
names its epoch. Finite mode (`epochs=N`, tests and evaluation): each stream ends after
its N-th epoch and the positions of ended streams are skipped, so batches near the end are
short.

The shard index (dataset.json "nsamples") gives each shard's count: the plan balances
samples, not shards, and a shard that ends early (truncated, corrupt) is caught: warned
about once per worker, naming the shard and the missing samples, which are counted as
corrupt, and reading goes on. Shards without an index are read as before, one warning,
and balanced by shard count. Corrupt samples are counted by the worker that reads their
shard, so once job-wide. A stream's valid count per shard that differs from the index (or
is learned without one) is reported to the main process (`ShardLoader.known`) and saved
in checkpoints: resuming skips whole stream epochs unread from these counts, and replays
only the current one (read and header-checked, not decoded). A PNG whose header parses
but whose pixels do not is found at decode time and leaves its batch one sample short,
without shifting anything after it.

Shuffle quality next to the previous pipeline (one global buffer of data.shuffle_buffer
over the shards read one after the other): better, because a batch draws from S shards at
once rather than from the last shuffle_buffer samples of one or two. Measured by
benchmarks/shuffle_quality.py (results/shuffle_quality.json) on the worst case, 100
classes written class-sorted into 200 shards of 100, batches of 256, data.shuffle_buffer
2000: distinct classes per batch 50.5 with the global buffer, 74.1 with 96 streams (21
samples of buffer each), 92.0 for a uniform random draw; total-variation distance of a
batch's class mix from the dataset's 0.577, 0.330 and 0.254. With few streams the
interleave mixes less (8 streams: 51.1 classes, like the global buffer); within a stream
the order is only as shuffled as its small buffer makes it, so shards should not be
written sorted where it can be helped.

Latent shards (written with `flowpre shards --vae`, dataset.json has a "latent" entry):
`x` is each sample's latent.npy as float32 (B, c, h, w), unscaled; the png is not read.
hflip flips the latent's width axis: not exactly the latent of the flipped image, but the
standard approximation of DiT-style latent training.
"""
from __future__ import annotations

import collections
import hashlib
import io
import itertools
import json
import logging
import random
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from flowpre.vae import LATENT_KEY, read_latent

# read_dataset_info and resolve_shards are imported from here by the rest of flowpre
from .shard_list import (_tar_samples, read_dataset_info, resolve_shards, shard_counts,  # noqa: F401
                         shard_name)
from .sources import image_mode
from .streams import StreamPlan, auto_streams, check_layout, consumed

log = logging.getLogger(__name__)
# a stream whose shards gave no usable sample this many epochs in a row: nothing is readable
MAX_EMPTY_EPOCHS = 3


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


def unit_key(url: str, piece: int, pieces: int) -> str:
    return url if pieces == 1 else f"{url}#{piece}/{pieces}"


class _WorkerState:
    def __init__(self, worker: int):
        self.worker = worker
        self.corrupt = 0
        self.warned = False
        self.short_warned: set[str] = set()
        self.new_known: dict[str, int] = {}  # unit -> valid samples, not yet sent to the main process


class ShardStream(torch.utils.data.IterableDataset):
    """One data worker's part of its rank's batches; ShardLoader wraps it in a
    DataLoader(batch_size=None) and assembles the parts."""

    def __init__(self, shards, batch_size, rank, world_size, num_workers, seed, hflip,
                 shuffle_buffer, epochs, start_batch, channels, height, width, num_classes=None,
                 latent=False, captions=False, streams=0, counts=None, known=None):
        super().__init__()
        self.shards, self.batch_size = list(shards), batch_size
        self.rank, self.world_size, self.workers = rank, world_size, max(1, num_workers)
        self.seed, self.hflip = seed, hflip
        self.epochs, self.start_batch = epochs, start_batch
        self.shape = (channels, height, width)
        self.num_classes = num_classes
        self.latent = latent  # shape is then the latent's, and x comes from latent.npy
        self.captions = captions  # batches carry "captions" from each sample's json
        self.streams = streams
        self.per_rank = streams // world_size
        self.stream_buffer = -(-shuffle_buffer // streams) if shuffle_buffer else 0
        self.counts = counts
        self.plan = StreamPlan(len(self.shards), streams, seed, counts)
        self.known = dict(known or {})  # unit key -> valid samples, where it differs from the index

    # --------------------------------------------------------------------- batches
    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        state = _WorkerState(info.id if info else 0)
        W, T, m = self.workers, self.per_rank, self.batch_size
        start = self.start_batch * m  # local position of this rank's batch start_batch
        mine = range(state.worker, T, W)  # this worker's streams, by their local index u
        streams = {u: self._stream(u * self.world_size + self.rank, consumed(u, start, T), state) for u in mine}
        ended: set[int] = set()
        for j in itertools.count(self.start_batch):
            xs, ys, caps, tags, positions = [], [], [], [], []
            first = j * m + (state.worker - j * m) % W  # the first local position of batch j that is ours
            for position in range(first, (j + 1) * m, W):
                u = position % T
                if u in ended:
                    continue
                item = next(streams[u], None)
                if item is None:
                    ended.add(u)
                    continue
                epoch, s = item
                x = self._decode(s, state)
                if x is None:
                    continue
                if self.hflip and self._flip(epoch, s):
                    x = x[:, :, ::-1]
                xs.append(x)
                ys.append(s["cls"])
                caps.append(s.get("caption"))
                tags.append(f"{epoch}:{shard_name(s['__url__'])}:{s['__key__']}")
                positions.append(position)
            yield self._collate(j, xs, ys, caps, tags, positions, state)
            if len(ended) == len(mine):  # only in finite mode
                yield {"done": j + 1, "worker": state.worker, "corrupt": state.corrupt, "known": {}}
                return

    def _stream(self, stream: int, skip: int, state: _WorkerState):
        """(epoch, raw sample) of one stream over its epochs, header-checked and shuffled,
        after its first `skip` samples (resume); undecoded."""
        empty = 0
        for epoch in (itertools.count() if self.epochs is None else range(self.epochs)):
            units = self.plan.epoch(epoch)[stream]
            lengths = [self._valid_count(u) for u in units]
            # resume: a whole stream epoch, unread (one known to be empty is read, so that it counts as empty)
            if None not in lengths and 0 < sum(lengths) <= skip:
                skip -= sum(lengths)
                continue
            rng = random.Random(_rng_seed(self.seed, epoch, stream))
            n = 0
            for s in _shuffled(self._read(units, state), self.stream_buffer, rng):
                n += 1
                if skip:
                    skip -= 1
                    continue
                yield epoch, s
            # a stream can be dealt nothing in an epoch (it is ahead), or only empty pieces: not a failure
            expected = any(self.plan.planned(u) != 0 for u in units)
            empty = 0 if n else empty + expected
            if empty >= MAX_EMPTY_EPOCHS and self.epochs is None:
                names = sorted({shard_name(self.shards[self.plan.units[u][0]]) for u in units})
                raise RuntimeError(f"stream {stream} (rank {self.rank}, worker {state.worker}): no usable samples "
                                   f"in {empty} epochs in a row (last: {', '.join(names[:5])}; all corrupt?)")

    def _valid_count(self, unit: int) -> int | None:
        i, j = self.plan.units[unit]
        known = self.known.get(unit_key(self.shards[i], j, self.plan.pieces))
        return known if known is not None else self.plan.planned(unit)

    def _read(self, units, state: _WorkerState):
        """The valid samples of these units, in order. Counts against the index: a unit that
        yields fewer valid samples than planned is remembered (for resume), and a shard that
        ends early is warned about and its missing samples counted as corrupt."""
        k = self.plan.pieces
        for unit in units:
            i, j = self.plan.units[unit]
            url = self.shards[i]
            raw = own = valid = 0
            for s in _tar_samples(url):
                if "__error__" in s:
                    if self.counts is None and j == 0:  # without an index the loss cannot be sized: one is counted
                        self._corrupt(state, s, f"unreadable tar ({s['__error__']!r}); rest of shard lost")
                    break
                raw += 1
                if (raw - 1) % k != j:
                    continue
                own += 1
                problem = self._problem(s)
                if problem is None:
                    valid += 1
                    yield s
                else:
                    self._corrupt(state, s, problem)
            if self.counts is not None:
                expected = self.counts[i]
                missing = len(range(j, expected, k)) - own
                if missing > 0:
                    state.corrupt += missing
                    if url not in state.short_warned:
                        state.short_warned.add(url)
                        log.warning("shard %s is short: %d of its %d samples (the shard index, dataset.json "
                                    "nsamples) are missing%s; counted as corrupt, going on (rank %d, worker %d)",
                                    url, expected - raw, expected, " (read in pieces: this is piece %d of %d)" % (j, k)
                                    if k > 1 else "", self.rank, state.worker)
            key = unit_key(url, j, k)
            if valid != self.plan.planned(unit) and self.known.get(key) != valid:
                self.known[key] = state.new_known[key] = valid

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
        tag = f"{self.seed}:{epoch}:{shard_name(s['__url__'])}:{s['__key__']}".encode()
        return bool(hashlib.blake2b(tag, digest_size=1).digest()[0] & 1)

    def _corrupt(self, state: _WorkerState, s: dict, reason: str):
        state.corrupt += 1
        if not state.warned:
            state.warned = True
            log.warning("skipping corrupt sample %r in %s: %s (rank %d, worker %d; further corrupt "
                        "samples in this worker are counted, not logged)", s.get("__key__"),
                        s.get("__url__"), reason, self.rank, state.worker)
        return None

    def _collate(self, batch_index, xs, ys, caps, tags, positions, state: _WorkerState) -> dict:
        if xs:
            x = torch.from_numpy(np.ascontiguousarray(np.stack(xs))).float()
        else:
            x = torch.empty((0, *self.shape))
        if not self.latent:
            x = x.div_(127.5).sub_(1.0)
        part = {"batch": batch_index, "x": x, "cond": torch.tensor(ys, dtype=torch.int64), "corrupt": state.corrupt,
                "worker": state.worker, "keys": tags, "positions": positions, "known": state.new_known}
        state.new_known = {}
        if self.captions:
            part["captions"] = caps
        return part


# ----------------------------------------------------------------------------- main process

def _assemble(parts: list[dict], captions: bool) -> dict:
    """One batch from its workers' parts, in position order."""
    if len(parts) == 1:
        part = parts[0]
        batch = {"x": part["x"], "cond": part["cond"], "keys": part["keys"]}
        if captions:
            batch["captions"] = part["captions"]
        return batch
    positions = [p for part in parts for p in part["positions"]]
    order = sorted(range(len(positions)), key=positions.__getitem__)
    index = torch.tensor(order, dtype=torch.int64)
    keys = [k for part in parts for k in part["keys"]]
    batch = {"x": torch.cat([p["x"] for p in parts])[index], "cond": torch.cat([p["cond"] for p in parts])[index],
             "keys": [keys[i] for i in order]}
    if captions:
        caps = [c for part in parts for c in part["captions"]]
        batch["captions"] = [caps[i] for i in order]
    return batch


class ShardLoader:
    """Batches {"x": float32 (B,C,H,W) in [-1,1], "cond": int64 (B,), "corrupt": int, "keys"} for
    one rank. For latent shards (info has "latent") x is the latent (B,c,h,w), unscaled.

    shards: list of paths (or a pattern for resolve_shards). batch_size: per rank.
    epochs: None for an endless stream, or a number of passes (tests, evaluation).
    streams: data.streams, 0 for auto (streams.auto_streams); `self.streams` is the value
    used, to be saved with the run: the sample order depends on it. A layout that cannot
    serve it raises ValueError naming data.streams and the layouts that would work.
    start_batch: resume; yields exactly what a fresh loader yields from its batch
    `start_batch` on. known: the `known` of the loaders that made the checkpoint (merged
    over ranks); it lets a resume skip whole epochs unread when shards are short.
    After iteration, `batches_consumed` is start_batch plus the batches handed out, and
    `corrupt_count` the corrupt samples skipped by this rank's workers in this iteration.
    Iterating again starts over from start_batch.
    """

    def __init__(self, shards, batch_size: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, seed: int = 0, hflip: bool = False,
                 shuffle_buffer: int = 1000, epochs: int | None = None, start_batch: int = 0,
                 info: dict | None = None, prefetch_factor: int = 4, streams: int = 0,
                 known: dict | None = None):
        if isinstance(shards, str):
            shards = resolve_shards(shards)
        if not shards:
            raise FileNotFoundError("ShardLoader: empty shard list")
        if batch_size < 1 or not 0 <= rank < world_size or num_workers < 0 or start_batch < 0 or streams < 0:
            raise ValueError(f"ShardLoader: bad batch_size={batch_size}, rank={rank}, world_size={world_size}, "
                             f"num_workers={num_workers}, start_batch={start_batch} or streams={streams}")
        self.streams = streams or auto_streams(len(shards), world_size * max(1, num_workers))
        problem = check_layout(self.streams, world_size, num_workers)
        if problem:
            raise ValueError(problem)
        self.info = info or read_dataset_info(shards)
        counts = shard_counts(shards)
        if counts is None:
            log.warning("shards %s... have no sample counts (dataset.json nsamples: written before the shard index, "
                        "or remote): truncated shards cannot be detected and streams are balanced by shard count; "
                        "rewrite them with `flowpre shards` to get both", shards[0])
        self.workers = max(1, num_workers)
        self.start_batch = start_batch
        self.batches_consumed = start_batch
        self.corrupt_count = 0
        self.known = dict(known or {})
        self.dataset = ShardStream(shards, batch_size, rank, world_size, num_workers, seed, hflip,
                                   shuffle_buffer, epochs, start_batch, self.info["channels"],
                                   self.info["height"], self.info["width"], self.info.get("num_classes"),
                                   latent="latent" in self.info, captions=bool(self.info.get("has_captions")),
                                   streams=self.streams, counts=counts, known=known)
        extra = {"persistent_workers": True, "prefetch_factor": prefetch_factor} if num_workers else {}
        self.loader = torch.utils.data.DataLoader(self.dataset, batch_size=None, num_workers=num_workers,
                                                  pin_memory=torch.cuda.is_available(), **extra)

    def __iter__(self) -> Iterator[dict]:
        self.batches_consumed = self.start_batch
        self.corrupt_count = 0
        latest: dict[int, int] = {}  # worker -> its cumulative corrupt count
        pending: dict[int, dict[int, dict]] = collections.defaultdict(dict)  # batch -> worker -> part
        done: dict[int, int] = {}  # worker -> the first batch it makes no part of (finite mode)
        j = self.start_batch
        for part in self.loader:
            w = part["worker"]
            latest[w] = part["corrupt"]
            self.corrupt_count = sum(latest.values())
            self.known.update(part["known"])
            if "done" in part:
                done[w] = part["done"]
            else:
                pending[part["batch"]][w] = part
            while True:
                expected = [w for w in range(self.workers) if done.get(w, j + 1) > j]
                if not expected or any(w not in pending[j] for w in expected):
                    break
                parts = [pending[j][w] for w in expected]
                del pending[j]
                j += 1
                batch = _assemble(parts, self.dataset.captions)
                if not len(batch["x"]):  # finite mode: every position of this batch was skipped
                    continue
                self.batches_consumed += 1
                batch["corrupt"] = self.corrupt_count
                yield batch
