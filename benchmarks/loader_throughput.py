"""Data-loader throughput per worker: latent shards and PNG shards through the real pipeline.

    python benchmarks/loader_throughput.py --workers 1,2 --out benchmarks/results/loader_throughput_cpu.json

Writes shards once into --data (synthetic 4x32x32 float16 latents as `flowpre shards
--source synthetic-latents` does; PNG shards of smooth random RGB images through
`flowpre shards --source folder:`), then for each kind and worker count iterates
flowpre.data.pipeline.ShardLoader as training does (endless stream, shuffle buffer,
hflip, batches of --batch) and times --batches batches after the workers' first batch.
img/s per worker = img/s / workers (the main process alone for 0 workers).

Each worker reads and header-checks only its own streams' shards (see pipeline.py), so
workers add throughput; the JSON keeps each count's rate so that curve can be read off.
(The committed result predates the streams: then every worker read every sample, and 2
workers delivered less than 1. benchmarks/loader_scaling.py measures the streams.)
"""
import argparse
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from flowpre import strict_json  # noqa: E402
from flowpre.data.pipeline import ShardLoader  # noqa: E402
from flowpre.data.shards import write_shards  # noqa: E402
from flowpre.data.synthetic import write_synthetic_latents  # noqa: E402


def smooth_images(count, size, seed=0):
    """uint8 RGB images with photo-like statistics for PNG's sake: a low-frequency random
    field plus a little noise (pure noise would not compress and would decode slower than
    natural images)."""
    rng = np.random.default_rng(seed)
    coarse = max(2, size // 16)
    for _ in range(count):
        field = rng.uniform(0, 255, (coarse, coarse, 3)).astype(np.uint8)
        img = np.asarray(Image.fromarray(field, "RGB").resize((size, size), Image.BICUBIC), dtype=np.int16)
        img = img + rng.integers(-6, 7, img.shape, dtype=np.int16)
        yield np.clip(img, 0, 255).astype(np.uint8)


def make_png_shards(root: Path, count, size, classes=10):
    out = root / f"png{size}"
    if (out / "dataset.json").exists():
        return out
    folder = root / f"png{size}_folder"
    for i, img in enumerate(smooth_images(count, size)):
        d = folder / f"class{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, "RGB").save(d / f"{i:06d}.png")
    write_shards(f"folder:{folder}", out, shard_size=max(1, count // 4))
    return out


def make_latent_shards(root: Path, count):
    out = root / "latents"
    if not (out / "dataset.json").exists():
        write_synthetic_latents(out, count=count, shard_size=max(1, count // 4))
    return out


def measure(shards: Path, workers, batch, batches, shuffle_buffer):
    loader = ShardLoader(str(shards), batch_size=batch, num_workers=workers, seed=0, hflip=True,
                         shuffle_buffer=shuffle_buffer)
    it = iter(loader)
    t0 = time.perf_counter()
    for _ in range(max(1, workers)):  # every worker has started and filled its shuffle buffer
        next(it)
    first = time.perf_counter() - t0
    t = time.perf_counter()
    images = sum(len(next(it)["x"]) for _ in range(batches))
    dt = time.perf_counter() - t
    del it, loader
    rate = images / dt
    return {"workers": workers, "img_per_s": rate, "img_per_s_per_worker": rate / max(1, workers),
            "images_timed": images, "first_batches_s": first}


def per_sample_costs(shards: Path, batch, limit=2000):
    """(seconds per sample to read and header-check, to decode + flip + collate), in this
    process on one core: the first is paid by every worker for every sample of the stream,
    the second once per sample. (Drives the pipeline's worker-side steps directly.)"""
    from flowpre.data.pipeline import _WorkerState
    stream = ShardLoader(str(shards), batch_size=batch, num_workers=0, hflip=True).dataset
    state = _WorkerState(0)
    t = time.perf_counter()
    samples = []
    for s in stream._read(range(len(stream.plan.units)), state):
        samples.append(s)
        if len(samples) == limit:
            break
    check = (time.perf_counter() - t) / len(samples)
    t = time.perf_counter()
    for i in range(0, len(samples), batch):
        xs = [stream._decode(s, state)[:, :, ::-1] for s in samples[i:i + batch]]
        stream._collate(0, xs, [s["cls"] for s in samples[i:i + batch]], [None] * len(xs), [""] * len(xs),
                        list(range(len(xs))), state)
    decode = (time.perf_counter() - t) / len(samples)
    return check, decode


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="/tmp/flowpre_loader_bench", help="where the shards are written (kept)")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts (0 = the main process)")
    ap.add_argument("--kinds", default="latent32,png32,png256",
                    help="latent32 (4x32x32 float16), png32 / png256 (RGB PNG of that size)")
    ap.add_argument("--count", type=int, default=8000, help="samples per dataset (PNG 256: a quarter)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--batches", type=int, default=20, help="batches timed per measurement")
    ap.add_argument("--shuffle-buffer", type=int, default=2000, help="as data.shuffle_buffer's default")
    ap.add_argument("--consumption", type=float, default=700.0,
                    help="img/s one GPU consumes (DiT-XL/2 on an H100: ~700) for the workers-needed column")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    root = Path(args.data)
    root.mkdir(parents=True, exist_ok=True)
    report = {"host": platform.node(), "cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg(),
              "time": datetime.now(timezone.utc).isoformat(), "batch": args.batch, "batches": args.batches,
              "shuffle_buffer": args.shuffle_buffer, "consumption_img_per_s": args.consumption, "rows": []}
    for kind in args.kinds.split(","):
        if kind == "latent32":
            shards = make_latent_shards(root, args.count)
        elif kind.startswith("png") and kind[3:].isdigit():
            size = int(kind[3:])
            shards = make_png_shards(root, args.count if size <= 64 else args.count // 4, size)
        else:
            ap.error(f"--kinds: unknown kind {kind!r}")
        check, decode = per_sample_costs(shards, args.batch)
        # W workers on W free cores: each checks and decodes 1/W of the samples
        model = {"kind": kind, "check_ms_per_sample": check * 1e3, "decode_ms_per_sample": decode * 1e3,
                 "ceiling_img_per_s": 1 / (check + decode),
                 "predicted_img_per_s": {w: w / (check + decode) for w in (1, 2, 4, 8, 16)}}
        fits = [w for w, r in model["predicted_img_per_s"].items() if r >= args.consumption]
        model["workers_needed_predicted"] = fits[0] if fits else None
        report.setdefault("cost_model", []).append(model)
        print(f"{kind:9s} per sample: check {check * 1e3:.3f} ms, decode {decode * 1e3:.3f} ms; one worker "
              f"{1 / (check + decode):.0f} img/s", flush=True)
        for w in (int(x) for x in args.workers.split(",")):
            row = {"kind": kind, **measure(shards, w, args.batch, args.batches, args.shuffle_buffer)}
            row["workers_needed"] = int(np.ceil(args.consumption / row["img_per_s_per_worker"]))
            report["rows"].append(row)
            print(f"{kind:9s} workers {w}: {row['img_per_s']:8.0f} img/s, {row['img_per_s_per_worker']:8.0f} "
                  f"per worker (first batches {row['first_batches_s']:.1f} s)", flush=True)
            if args.out:  # as it goes: a cut-off run keeps what it measured
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(strict_json.dumps(report, indent=1) + "\n")
    report["load_avg_at_end"] = os.getloadavg()
    if args.out:
        Path(args.out).write_text(strict_json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
