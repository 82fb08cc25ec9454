"""Logical streams: one global sample order whatever the ranks and workers, each shard read
by one physical worker, the shard index, and layouts the streams cannot serve."""
import collections
import json
import logging
import random
import tarfile

import pytest

from flowpre.data import pipeline
from flowpre.data.pipeline import ShardLoader
from flowpre.data.streams import StreamPlan, auto_streams, check_layout, run_streams
from flowpre.data.synthetic import write_synthetic_latents

N, SHARD = 330, 11  # 30 shards


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    out = tmp_path_factory.mktemp("latents")
    return write_synthetic_latents(out, count=N, shard_size=SHARD, shape=(2, 4, 4), num_classes=5, seed=1)


def _global_order(paths, world, workers, steps, global_batch=12, start_step=0, streams=8, **kw):
    """The keys of `steps` optimizer steps put back in global order (rank r's local position
    l is global position l * world + r), and the set of keys per step."""
    micro = global_batch // world
    iters = [iter(ShardLoader(paths, batch_size=micro, rank=r, world_size=world, num_workers=workers, seed=2,
                              shuffle_buffer=24, streams=streams, start_batch=start_step, **kw))
             for r in range(world)]
    order, per_step = [], []
    for _ in range(steps):
        batches = [next(it)["keys"] for it in iters]
        assert all(len(b) == micro for b in batches)  # infinite mode: always full
        order += [batches[r][i] for i in range(micro) for r in range(world)]
        per_step.append(set(k for b in batches for k in b))
    return order, per_step


def test_same_order_for_every_layout(latents):
    """(ranks, workers) = (1, 1), (2, 1), (2, 2), (4, 1): the same keys per step, in the same
    global order, over the end of epoch 0 (~28 steps) into epoch 1."""
    reference, ref_steps = _global_order(latents, 1, 1, 40)
    for world, workers in [(2, 1), (2, 2), (4, 1)]:
        order, steps = _global_order(latents, world, workers, 40)
        assert steps == ref_steps, (world, workers)
        assert order == reference, (world, workers)
    epoch0 = [k for k in reference if k.startswith("0:")]
    assert len(epoch0) == N == len(set(epoch0))  # every sample of epoch 0 once in 480 positions
    assert len(set(reference)) == len(reference)  # and nothing twice, epoch 1 included
    assert len({k.split(":")[1] for k in reference[:12]}) >= 6  # a batch mixes the streams' shards


def test_resume_is_exact_and_elastic(latents):
    """Same world size: from batch b, exactly the batches of an uninterrupted loader. Other
    world sizes (2 -> 1, 1 -> 2, 4 -> 3 with streams that 3 divides): the same keys per step
    from the global sample count, every key of epoch 0 once."""
    # 24 streams on 30 shards: some streams hold 2 shards per epoch, so epoch 0 ends by position 22 * 24
    straight, straight_steps = _global_order(latents, 1, 1, 50, streams=24)
    for before, after in [(2, 1), (1, 2), (4, 3)]:
        head, head_steps = _global_order(latents, before, 1, 13, streams=24)
        tail, tail_steps = _global_order(latents, after, 2 if after < 3 else 1, 37, start_step=13, streams=24)
        assert head_steps + tail_steps == straight_steps, (before, after)
        assert head + tail == straight
        seen = collections.Counter(head + tail)
        assert set(seen.values()) == {1} and sum(k.startswith("0:") for k in seen) == N


def test_layout_refused_naming_key_and_what_works(latents):
    with pytest.raises(ValueError, match=r"data.streams=8 cannot be served by 3 rank\(s\) x 1 data worker") as e:
        ShardLoader(latents, batch_size=4, rank=0, world_size=3, streams=8)
    assert "world sizes that work with data.num_workers=0: 1, 2, 4, 8" in str(e.value)
    assert "data.num_workers that work on 3 ranks: none" in str(e.value)
    assert check_layout(96, 3, 4) is None and check_layout(96, 64, 1) is not None
    recorded = {"streams": 24}
    with pytest.raises(ValueError, match="data.streams=48, but checkpoint ck was trained with data.streams=24"):
        run_streams(48, recorded, "ck", 30, 2, 2)
    assert run_streams(0, recorded, "ck", 30, 3, 2) == 24
    with pytest.raises(ValueError, match="data.streams=24 cannot be served by 16 rank.*fixed by checkpoint ck"):
        run_streams(0, recorded, "ck", 30, 16, 1)


@pytest.mark.parametrize("physical", [1, 2, 3, 4, 6, 8, 16, 24, 32, 64, 128, 256, 384, 512])
@pytest.mark.parametrize("n_shards", [12, 40, 300, 1281, 20_000])
def test_auto_streams_serve_usual_layouts(n_shards, physical):
    s = auto_streams(n_shards, physical)
    assert s % physical == 0
    if n_shards >= 96 and physical <= n_shards:
        assert s <= n_shards  # every stream has whole shards: each shard read once per epoch
    plan = StreamPlan(n_shards, s, seed=0, counts=[1000] * (n_shards - 1) + [517])
    totals = [0] * s
    for epoch in range(3):
        for t, units in enumerate(plan.epoch(epoch)):
            totals[t] += sum(int(plan.weights[u]) for u in units)
        # running totals stay within one unit of each other, so stream epochs end together
        assert max(totals) - min(totals) <= 1000 // plan.pieces + 1


def test_each_shard_read_by_one_worker(latents, monkeypatch):
    """4 ranks (1 worker each, in this process): every shard of the epoch opened by exactly one
    rank, and once."""
    opened = collections.Counter()
    read = pipeline._tar_samples

    def counting(url):
        opened[url] += 1
        return read(url)

    monkeypatch.setattr(pipeline, "_tar_samples", counting)
    total = 0
    for rank in range(4):
        loader = ShardLoader(latents, batch_size=5, rank=rank, world_size=4, streams=8, epochs=1)
        total += sum(len(b["keys"]) for b in loader)
    # (a shard opened by two ranks would count 2)
    assert total == N and sorted(opened) == sorted(latents) and set(opened.values()) == {1}


def _truncate(path, keep_samples):
    """Cut a shard after `keep_samples` samples, inside the next one, as a failed copy would."""
    with tarfile.open(path) as tf:
        members = tf.getmembers()
    cut = members[2 * keep_samples].offset_data + 7  # 2 members per sample (cls, latent.npy)
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[:cut])


def test_truncated_shard_warned_counted_and_training_goes_on(tmp_path, caplog):
    paths = write_synthetic_latents(tmp_path, count=60, shard_size=20, shape=(2, 4, 4), num_classes=5)
    keep = random.Random(0).randrange(1, 12)
    _truncate(paths[1], keep)
    missing = 20 - keep
    with caplog.at_level(logging.WARNING, logger="flowpre.data.pipeline"):
        loader = ShardLoader(paths, batch_size=7, streams=4, epochs=1)
        keys = [k for b in loader for k in b["keys"]]
    assert len(keys) == 60 - missing == len(set(keys)) and loader.corrupt_count == missing
    short = [r.getMessage() for r in caplog.records if "is short" in r.getMessage()]
    assert len(short) == 1 and "train-000001.tar" in short[0] and f"{missing} of its 20 samples" in short[0]
    # endless: it goes on past the short shard, and a resume past it is exact (the checkpoint's `known`)
    full = [b["keys"] for _, b in zip(range(30), iter(ShardLoader(paths, batch_size=7, streams=4)))]
    first = ShardLoader(paths, batch_size=7, streams=4)
    _ = [b for _, b in zip(range(12), first)]
    # 3 shards on 4 streams: each is read in 2 pieces (odd and even samples)
    assert sorted(first.known) == [f"{paths[1]}#0/2", f"{paths[1]}#1/2"] and sum(first.known.values()) == keep
    resumed = ShardLoader(paths, batch_size=7, streams=4, start_batch=20, known=json.loads(json.dumps(first.known)))
    assert [b["keys"] for _, b in zip(range(10), resumed)] == full[20:]


def test_old_shards_without_index_read_with_one_warning(tmp_path, caplog):
    paths = write_synthetic_latents(tmp_path, count=40, shard_size=10, shape=(2, 4, 4), num_classes=5)
    meta = json.loads((tmp_path / "dataset.json").read_text())
    del meta["splits"]["train"]["nsamples"]
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="flowpre.data.pipeline"):
        keys = [k for b in ShardLoader(paths, batch_size=6, world_size=2, rank=1, streams=4, epochs=1)
                for k in b["keys"]]
        keys += [k for b in ShardLoader(paths, batch_size=6, world_size=2, rank=0, streams=4, epochs=1)
                 for k in b["keys"]]
    assert sorted(keys) == sorted(f"0:train-{i // 10:06d}.tar:{i:08d}" for i in range(40))
    assert sum("no sample counts" in r.getMessage() for r in caplog.records) == 2  # one per loader (rank)


@pytest.fixture
def http_root(tmp_path):
    """A loopback HTTP server (127.0.0.1 only) serving tmp_path; yields its base URL."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("opener", ["http", "pipe"])
def test_remote_shards_with_their_index(http_root, opener, caplog):
    """http:// and pipe: brace patterns: dataset.json (class names, shard index) read beside the
    first URL through the same opener; every sample once over 2 ranks; a short shard caught."""
    from flowpre.data.shard_list import read_dataset_info, shard_counts

    root, base = http_root
    paths = write_synthetic_latents(root, count=50, shard_size=10, shape=(2, 4, 4), num_classes=5)
    _truncate(paths[3], 4)
    pattern = (f"{base}/train-{{000000..000004}}.tar" if opener == "http"
               else f"pipe:cat {root}/train-{{000000..000004}}.tar")
    urls = pipeline.resolve_shards(pattern)
    assert len(urls) == 5 and pipeline.shard_name(urls[0]) == "train-000000.tar"
    info = read_dataset_info(urls)
    assert info["class_names"] == [f"class{i}" for i in range(5)] and info["channels"] == 2
    assert shard_counts(urls) == [10] * 5
    with caplog.at_level(logging.WARNING, logger="flowpre.data.pipeline"):
        keys, corrupt = [], 0
        for rank in range(2):
            loader = ShardLoader(pattern, batch_size=4, rank=rank, world_size=2, streams=4, epochs=1)
            keys += [k for b in loader for k in b["keys"]]
            corrupt += loader.corrupt_count
    expected = {f"0:train-{i // 10:06d}.tar:{i:08d}" for i in range(50) if not 34 <= i < 40}
    assert sorted(keys) == sorted(expected) and corrupt == 6
    assert any("is short" in r.getMessage() and "train-000003.tar" in r.getMessage() for r in caplog.records)


def test_training_records_streams_and_refuses_other_values(tmp_path):
    """`flowpre train`: data.streams saved in the checkpoint; resuming with another value, or on a
    layout that cannot serve it, fails before training with an error naming the key."""
    from helpers import metrics, train

    shards = write_synthetic_latents(tmp_path / "data", count=48, shard_size=8, shape=(3, 8, 8), num_classes=3)
    pattern = str(tmp_path / "data" / "train-*.tar")
    run = tmp_path / "run"
    train(run, pattern, "train.max_steps=2", "train.checkpoint_every=2", "data.streams=6")
    meta = json.loads((run / "checkpoints" / "step000000002" / "meta.json").read_text())
    assert meta["data"] == {"streams": 6, "known": {}} and len(shards) == 6
    r = train(run, pattern, "train.max_steps=4", "train.resume=auto", "data.streams=12",
              check=False)
    assert r.returncode != 0 and "data.streams=12, but checkpoint" in r.stderr and "data.streams=6" in r.stderr
    r = train(run, pattern, "train.max_steps=4", "train.resume=auto", "data.num_workers=4",
              check=False)
    assert r.returncode != 0 and "data.streams=6 cannot be served by 1 rank(s) x 4 data worker(s)" in r.stderr
    assert "data.num_workers that work on 1 ranks: 1, 2, 3, 6" in r.stderr
    assert [m["step"] for m in metrics(run)] == [1, 2]  # nothing trained by the refused runs
