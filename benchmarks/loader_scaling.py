"""Loader scaling over world sizes: rank 0's img/s, the whole job's, and the bytes each
physical worker reads per epoch.

    python benchmarks/loader_scaling.py --out benchmarks/results/loader_scaling_cpu.json

Writes two datasets once into --data: synthetic 4x32x32 float16 latents (as `flowpre
shards --source synthetic-latents`) and 32 px RGB PNGs (`flowpre shards --source
folder:`), both in many small shards with the shard index. For each world size W and
data-worker count, one process runs rank 0 of W exactly as training does
(`ShardLoader(rank=0, world_size=W, num_workers=n)`, endless, shuffle buffer, hflip,
data.streams at its auto value) and times --batches batches after a round over every stream of the rank (startup: each
stream opens its first shard and fills its shuffle buffer; reported as "first s").
The other ranks would do the same on their own CPUs, so the whole job's rate is W times
rank 0's (the model of the issue's table; on this 2-core machine only rank 0 is run).

Bytes: per physical worker, the bytes of the shards its streams open in epoch 0, from the
stream plan (a unit opens its whole shard); "read / dataset" is their sum over all
physical workers over the dataset's bytes (1.0: each shard read once per epoch). For
W x 1 worker, rank 0's bytes are also measured, by counting what the tar reader pulls
from the files over one epoch.
"""
import argparse
import collections
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from flowpre import strict_json  # noqa: E402
from flowpre.data import shard_list  # noqa: E402
from flowpre.data.pipeline import ShardLoader, resolve_shards, shard_counts  # noqa: E402
from flowpre.data.shards import write_shards  # noqa: E402
from flowpre.data.streams import StreamPlan  # noqa: E402
from flowpre.data.synthetic import write_synthetic_latents  # noqa: E402
from loader_throughput import smooth_images  # noqa: E402


def make_datasets(root: Path, count: int, shard_size: int) -> dict[str, Path]:
    latents, png = root / "latents", root / "png32"
    if not (latents / "dataset.json").exists():
        write_synthetic_latents(latents, count=count, shard_size=shard_size)
    if not (png / "dataset.json").exists():
        folder = root / "png32_folder"
        for i, img in enumerate(smooth_images(count, 32)):
            d = folder / f"class{i % 10}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img, "RGB").save(d / f"{i:06d}.png")
        write_shards(f"folder:{folder}", png, shard_size=shard_size)
    return {"latent32": latents, "png32": png}


def planned_bytes(paths, streams, world, workers, seed=0):
    """{physical worker: bytes its streams open in epoch 0}."""
    plan = StreamPlan(len(paths), streams, seed, shard_counts(paths))
    sizes = [os.path.getsize(p) for p in paths]
    per = collections.Counter({q: 0 for q in range(world * workers)})
    for t, units in enumerate(plan.epoch(0)):
        for u in units:
            per[t % (world * workers)] += sizes[plan.units[u][0]]
    return per


class _CountingFile:
    def __init__(self, f, counter):
        self.f, self.counter = f, counter

    def read(self, *a):
        data = self.f.read(*a)
        self.counter[0] += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def measured_bytes(paths, world, streams):
    """Bytes rank 0 (no data workers) reads from its files over epoch 0."""
    counter = [0]
    gopen = shard_list.wds.gopen
    shard_list.wds.gopen = lambda url, mode="rb", **kw: _CountingFile(gopen(url, mode, **kw), counter)
    try:
        for _ in ShardLoader(paths, batch_size=64, rank=0, world_size=world, streams=streams, epochs=1):
            pass
    finally:
        shard_list.wds.gopen = gopen
    return counter[0]


def measure(paths, world, workers, batch, batches, shuffle_buffer):
    loader = ShardLoader(paths, batch_size=batch, rank=0, world_size=world, num_workers=workers, seed=0,
                         hflip=True, shuffle_buffer=shuffle_buffer)
    it = iter(loader)
    t0 = time.perf_counter()
    # every worker has started, and every stream of this rank has opened its shard and filled its buffer
    for _ in range(max(1, workers) + -(-loader.streams // world // batch)):
        next(it)
    first = time.perf_counter() - t0
    t = time.perf_counter()
    images = sum(len(next(it)["x"]) for _ in range(batches))
    dt = time.perf_counter() - t
    streams = loader.streams
    del it, loader
    return images / dt, first, streams


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="/tmp/flowpre_loader_scaling", help="where the shards are written (kept)")
    ap.add_argument("--worlds", default="1,4,16,64,256")
    ap.add_argument("--workers", default="1,4", help="data workers per rank")
    ap.add_argument("--count", type=int, default=8192, help="samples per dataset")
    ap.add_argument("--shard-size", type=int, default=16, help="samples per shard (default: 512 shards)")
    ap.add_argument("--batch", type=int, default=32, help="per rank")
    ap.add_argument("--batches", type=int, default=12, help="batches timed per measurement")
    ap.add_argument("--shuffle-buffer", type=int, default=2000, help="as data.shuffle_buffer's default")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    root = Path(args.data)
    root.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    datasets = make_datasets(root, args.count, args.shard_size)
    report = {"host": platform.node(), "cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg(),
              "time": datetime.now(timezone.utc).isoformat(), "count": args.count, "shard_size": args.shard_size,
              "batch_per_rank": args.batch, "batches": args.batches, "shuffle_buffer": args.shuffle_buffer,
              "write_s": round(time.perf_counter() - t, 1), "rows": []}
    header = (f"{'kind':9s} {'W':>4s} {'wk':>3s} {'streams':>7s} {'rank0 img/s':>11s} {'per worker':>10s} "
              f"{'job img/s':>10s} {'MB/worker/epoch':>15s} {'read/dataset':>12s} {'first s':>7s}")
    print(header)
    for kind, folder in datasets.items():
        paths = resolve_shards(str(folder))
        dataset_bytes = sum(os.path.getsize(p) for p in paths)
        for workers in (int(w) for w in args.workers.split(",")):
            for world in (int(w) for w in args.worlds.split(",")):
                rate, first, streams = measure(paths, world, workers, args.batch, args.batches, args.shuffle_buffer)
                per = planned_bytes(paths, streams, world, workers)
                row = {"kind": kind, "world_size": world, "workers": workers, "streams": streams,
                       "rank0_img_per_s": rate, "rank0_img_per_s_per_worker": rate / workers,
                       "job_img_per_s": rate * world, "first_batches_s": first,
                       "bytes_per_worker_epoch_mean": float(np.mean(list(per.values()))),
                       "bytes_per_worker_epoch_max": max(per.values()),
                       "read_over_dataset": sum(per.values()) / dataset_bytes, "dataset_bytes": dataset_bytes}
                if workers == 1:
                    row["rank0_bytes_measured"] = measured_bytes(paths, world, streams)
                report["rows"].append(row)
                print(f"{kind:9s} {world:4d} {workers:3d} {streams:7d} {rate:11.0f} {rate / workers:10.0f} "
                      f"{rate * world:10.0f} {row['bytes_per_worker_epoch_max'] / 1e6:15.2f} "
                      f"{row['read_over_dataset']:12.3f} {first:7.1f}", flush=True)
                if args.out:  # as it goes: a cut-off run keeps what it measured
                    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                    Path(args.out).write_text(strict_json.dumps(report, indent=1) + "\n")
    report["load_avg_at_end"] = os.getloadavg()
    for kind in datasets:  # the goal: rank 0 at W=64 delivers >= 0.8x its W=1 rate, per worker
        for workers in (int(w) for w in args.workers.split(",")):
            rows = {r["world_size"]: r for r in report["rows"] if r["kind"] == kind and r["workers"] == workers}
            if 1 in rows and 64 in rows:
                ratio = rows[64]["rank0_img_per_s"] / rows[1]["rank0_img_per_s"]
                report.setdefault("rank0_w64_over_w1", {})[f"{kind}/{workers}"] = ratio
                print(f"{kind} {workers} worker(s): rank 0 at W=64 delivers {ratio:.2f}x its W=1 rate")
    if args.out:
        Path(args.out).write_text(strict_json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
