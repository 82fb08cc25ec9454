"""The stream plan: which shards each logical stream reads in each epoch, and which
physical worker serves which stream.

A run has a fixed number S of logical streams (`data.streams`). Per epoch the shards
(or, for datasets with fewer shards than streams, strided pieces of them: piece j of k
holds the samples whose index in the shard is j mod k) are permuted with an RNG seeded by
(seed, epoch) and dealt out greedily to the stream that has been planned the fewest
samples so far, over all epochs up to this one. Balancing the running totals rather than
each epoch's keeps the streams within about one shard of each other however long the run
(per-epoch balancing with a fixed tie-break would give the same streams the extra shard
every epoch, and they would drift apart). The weights are the sample counts of the shard
index (dataset.json "nsamples"), or 1 per shard without one. The plan uses only static
facts, so every rank and worker computes the same one without reading anything.

Global order: position p of the stream of streams is the (p div S)-th sample of stream
p mod S. Rank r of R serves the streams t with t mod R == r (so it takes the positions
p mod R == r, as the pipeline always did), and its data worker w of W those with
(t div R) mod W == w; physical worker q = r + R*w serves t mod (R*W) == q. This needs
R*W to divide S: `check_layout` refuses other layouts before training, naming the ones
that would work.
"""
from __future__ import annotations

import heapq
import logging
import math

import numpy as np

# Divisible by 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 96: the usual GPU counts times the usual
# worker counts. With lcm(physical workers, 96) a run can later move to any of these.
STREAMS_BASE = 96

log = logging.getLogger(__name__)


def auto_streams(n_shards: int, physical: int) -> int:
    """data.streams=0: lcm(physical, 96), so that later resumes on most other layouts work;
    where that would be more streams than shards (and the dataset is not tiny, where
    splitting shards into pieces costs nothing worth saving), the largest lcm(physical, b)
    that fits, b a divisor of 96, so that every shard is read once per epoch."""
    full = math.lcm(physical, STREAMS_BASE)
    if n_shards < STREAMS_BASE or full <= n_shards:
        return full
    for base in (48, 32, 24, 16, 12, 8, 6, 4, 3, 2, 1):
        if math.lcm(physical, base) <= n_shards:
            return math.lcm(physical, base)
    return full


def working_layouts(streams: int, world_size: int, num_workers: int) -> str:
    """The world sizes (at this worker count) and worker counts (at this world size) that can
    serve `streams`, as a phrase for error messages."""
    workers = max(1, num_workers)
    sizes = [r for r in range(1, streams + 1) if streams % (r * workers) == 0]
    counts = [w for w in range(1, 65) if streams % (world_size * w) == 0]
    sizes_text = ", ".join(map(str, sizes[:24])) + (", ..." if len(sizes) > 24 else "")
    counts_text = ", ".join(map(str, counts)) if counts else f"none (no worker count works with {world_size} ranks)"
    return (f"world sizes that work with data.num_workers={num_workers}: {sizes_text or 'none'}; "
            f"data.num_workers that work on {world_size} ranks: {counts_text}")


def check_layout(streams: int, world_size: int, num_workers: int) -> str | None:
    """None when `world_size` ranks x `num_workers` data workers can serve `streams` streams,
    else the error (a physical worker serves whole streams, so their number must divide S)."""
    physical = world_size * max(1, num_workers)
    if streams >= 1 and streams % physical == 0:
        return None
    return (f"data.streams={streams} cannot be served by {world_size} rank(s) x {max(1, num_workers)} data "
            f"worker(s) = {physical} physical workers (each serves whole streams, so ranks x "
            f"max(1, data.num_workers) must divide data.streams); {working_layouts(streams, world_size, num_workers)}")


class StreamPlan:
    """Units (shard index, piece, pieces) of every stream per epoch; see the module docstring."""

    def __init__(self, n_shards: int, streams: int, seed: int, counts: list[int] | None = None):
        self.n_shards, self.streams, self.seed = n_shards, streams, seed
        self.pieces = max(1, -(-streams // n_shards))  # every stream gets at least one unit
        k = self.pieces
        self.units = [(i, j) for i in range(n_shards) for j in range(k)]
        # samples of unit (i, j): the indices j, j + k, ... below the shard's count
        self.weights = np.array([len(range(j, counts[i], k)) if counts else 1 for i, j in self.units], dtype=np.int64)
        self.counts = counts
        self._reset()

    def _reset(self):
        self._epochs: dict[int, list[list[int]]] = {}  # epoch -> stream -> unit ids; recent epochs only
        self._next = 0
        self._totals = [(0, t) for t in range(self.streams)]  # running planned samples per stream, a heap

    def epoch(self, epoch: int) -> list[list[int]]:
        """stream -> its unit ids (indices into self.units) in reading order, for `epoch`."""
        if epoch < self._next and epoch not in self._epochs:  # pruned: the running totals start at epoch 0
            self._reset()
        while self._next <= epoch:
            e = self._next
            order = np.random.default_rng([self.seed, e, 0x5354]).permutation(len(self.units))
            assigned: list[list[int]] = [[] for _ in range(self.streams)]
            totals = self._totals
            for u in order:
                total, t = heapq.heappop(totals)
                assigned[t].append(int(u))
                heapq.heappush(totals, (total + int(self.weights[u]), t))
            self._epochs[e] = assigned
            self._next += 1
            # the streams of a worker are within about an epoch of each other: older plans are not asked again
            self._epochs.pop(e - 4, None)
        return self._epochs[epoch]

    def planned(self, unit: int) -> int | None:
        """Samples unit `unit` holds by the shard index (None without one)."""
        return int(self.weights[unit]) if self.counts else None


def owner(stream: int, world_size: int, workers: int) -> tuple[int, int]:
    """(rank, data worker) that serves `stream`."""
    return stream % world_size, (stream // world_size) % workers


def consumed(stream_local: int, local_positions: int, per_rank: int) -> int:
    """Samples a rank's local stream `stream_local` (0..per_rank-1) has delivered once the
    rank consumed `local_positions` positions: those l < local_positions with l mod
    per_rank == stream_local."""
    return max(0, -(-(local_positions - stream_local) // per_rank))


def run_streams(configured: int, recorded: dict | None, checkpoint, n_shards: int, world_size: int,
                num_workers: int) -> int:
    """data.streams for this session: the checkpoint's value (`recorded`, its meta "data"
    entry) when resuming, else `configured` (0: auto). Raises ValueError naming the key
    when the config contradicts the checkpoint, or when this layout cannot serve it."""
    streams = configured or auto_streams(n_shards, world_size * max(1, num_workers))
    if recorded is None and checkpoint is not None:
        log.warning("checkpoint %s predates data.streams: its data position is continued in the stream order "
                    "(data.streams=%d), so this epoch's samples may repeat or be skipped once", checkpoint, streams)
    if recorded is not None:
        if configured and configured != recorded["streams"]:
            raise ValueError(f"data.streams={configured}, but checkpoint {checkpoint} was trained with "
                             f"data.streams={recorded['streams']}: the sample order depends on it; resume with "
                             f"data.streams={recorded['streams']} (or 0, which takes the checkpoint's)")
        streams = recorded["streams"]
    problem = check_layout(streams, world_size, num_workers)
    if problem:
        raise ValueError(problem + ("" if recorded is None else f" (data.streams is fixed by checkpoint {checkpoint})"))
    return streams
