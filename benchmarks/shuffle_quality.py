"""Shuffle quality of the stream interleave next to the previous single global buffer.

    python benchmarks/shuffle_quality.py --out benchmarks/results/shuffle_quality.json

Labels only, through the pipeline's own pieces (streams.StreamPlan, pipeline._shuffled):
a dataset of --classes classes written class-sorted into shards (the worst case, as
`flowpre shards --source folder:` writes an ImageNet-style folder), read
- "global buffer": the previous pipeline, the shards permuted per epoch and read one after
  the other through one buffer of data.shuffle_buffer samples;
- "streams": S streams, each with data.shuffle_buffer / S, interleaved round-robin;
- "uniform": batches drawn uniformly at random without replacement (the ideal).
Per batch of --batch: the number of distinct classes and the total-variation distance of
its class histogram from the dataset's (0 = the same proportions), averaged over an epoch.
"""
import argparse
import itertools
import os
import random
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from flowpre import strict_json  # noqa: E402
from flowpre.data.pipeline import _rng_seed, _shuffled  # noqa: E402
from flowpre.data.streams import StreamPlan  # noqa: E402


def global_buffer(shards, buffer, seed=0, epoch=0):
    order = np.random.default_rng([seed, epoch]).permutation(len(shards))
    return list(_shuffled(itertools.chain.from_iterable(shards[i] for i in order), buffer,
                          random.Random(_rng_seed(seed, epoch))))


def streams_order(shards, buffer, streams, seed=0, epoch=0):
    plan = StreamPlan(len(shards), streams, seed, [len(s) for s in shards])
    per = []
    for t, units in enumerate(plan.epoch(epoch)):
        samples = [x for u in units for x in shards[plan.units[u][0]][plan.units[u][1]::plan.pieces]]
        per.append(list(_shuffled(samples, -(-buffer // streams), random.Random(_rng_seed(seed, epoch, t)))))
    out = []
    for i in itertools.count():  # round-robin; an epoch's end is where the streams run out
        row = [s[i] for s in per if i < len(s)]
        if not row:
            return out
        out += row


def batch_stats(labels, batch, classes):
    labels = np.asarray(labels)
    n = len(labels) // batch
    overall = np.bincount(labels, minlength=classes) / len(labels)
    distinct, tv = [], []
    for b in range(n):
        counts = np.bincount(labels[b * batch:(b + 1) * batch], minlength=classes)
        distinct.append(int((counts > 0).sum()))
        tv.append(0.5 * np.abs(counts / batch - overall).sum())
    return {"distinct_classes_per_batch": float(np.mean(distinct)), "tv_from_dataset": float(np.mean(tv))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--per-class", type=int, default=200)
    ap.add_argument("--shard-size", type=int, default=100)
    ap.add_argument("--buffer", type=int, default=2000, help="data.shuffle_buffer")
    ap.add_argument("--streams", type=int, default=96)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    labels = np.repeat(np.arange(args.classes), args.per_class)  # class-sorted
    shards = [labels[i:i + args.shard_size].tolist() for i in range(0, len(labels), args.shard_size)]
    rng = np.random.default_rng(0)
    result = {"classes": args.classes, "samples": len(labels), "shards": len(shards), "buffer": args.buffer,
              "data_streams": args.streams, "batch": args.batch,
              "global buffer": batch_stats(global_buffer(shards, args.buffer), args.batch, args.classes),
              "streams": batch_stats(streams_order(shards, args.buffer, args.streams), args.batch, args.classes),
              "uniform": batch_stats(rng.permutation(labels), args.batch, args.classes)}
    for k in ("global buffer", "streams", "uniform"):
        print(f"{k:14s} distinct classes per batch of {args.batch}: {result[k]['distinct_classes_per_batch']:6.1f} "
              f"of {args.classes}; TV distance from the dataset's class mix: {result[k]['tv_from_dataset']:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            f.write(strict_json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
