"""The GPU check's CPU side: its fallback without CUDA, the synthetic latent shards its loop
stage trains on, and that stage (benchmarks/train_loop.py) run small on the CPU."""
import argparse
import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from flowpre.data import shards as shards_cli
from flowpre.data.pipeline import ShardLoader, read_dataset_info
from flowpre.data.synthetic import write_synthetic_latents
from flowpre.vae import vae_for_dataset

ROOT = Path(__file__).resolve().parents[1]


def test_synthetic_latents_are_imagenet_shaped_and_read_by_the_pipeline(tmp_path):
    paths = write_synthetic_latents(tmp_path, count=50, shard_size=16, seed=3)
    assert [Path(p).name for p in paths] == [f"train-{i:06d}.tar" for i in range(4)]
    with tarfile.open(paths[0]) as tar:
        names = tar.getnames()
        assert sorted(names[:2]) == ["00000000.cls", "00000000.latent.npy"] and len(names) == 2 * 16
        arr = np.load(io.BytesIO(tar.extractfile("00000001.latent.npy").read()))
    assert arr.dtype == np.float16 and arr.shape == (4, 32, 32) and np.isfinite(arr).all() and arr.std() > 0.5

    info = read_dataset_info(paths)
    assert (info["channels"], info["height"], info["width"], info["num_classes"]) == (4, 32, 32, 1000)
    assert info["pixel"] == {"channels": 3, "height": 256, "width": 256}
    assert vae_for_dataset(info) is None  # no VAE behind them: grids stay latents

    batches = list(ShardLoader(paths, batch_size=8, epochs=1, shuffle_buffer=10))
    x, cond = torch.cat([b["x"] for b in batches]), torch.cat([b["cond"] for b in batches])
    assert x.shape == (50, 4, 32, 32) and x.dtype == torch.float32
    assert cond.min() >= 0 and cond.max() < 1000 and len(set(cond.tolist())) == 50  # distinct classes
    assert sum(b["corrupt"] for b in batches[-1:]) == 0
    # the same seed gives the same latents; labels carry a class pattern (the loss can fall)
    again = write_synthetic_latents(tmp_path / "again", count=50, shard_size=16, seed=3)
    assert Path(again[1]).read_bytes() == Path(paths[1]).read_bytes()


def test_shards_cli_writes_synthetic_latents(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    shards_cli.add_arguments(parser)
    shards_cli.run(parser.parse_args(["--source", "synthetic-latents", "--out", str(tmp_path / "s"), "--limit", "30",
                                      "--shard-size", "10"]))
    printed = capsys.readouterr().out
    assert "30 samples in 3 shards" in printed and "latents 4x32x32" in printed
    meta = json.loads((tmp_path / "s" / "dataset.json").read_text())
    assert meta["splits"]["train"]["count"] == 30 and meta["latent"]["vae"] is None
    with pytest.raises(SystemExit, match="--split"):
        shards_cli.run(parser.parse_args(["--source", "synthetic-latents", "--out", str(tmp_path / "t"),
                                          "--split", "test"]))
    # a folder of another dataset is not overwritten
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / "dataset.json").write_text(json.dumps({"name": "digits"}))
    with pytest.raises(ValueError, match="another dataset"):
        write_synthetic_latents(tmp_path / "u", count=2)


def test_gpu_check_without_cuda_says_so_and_exits_0(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the check itself")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(["bash", "launchers/gpu_check.sh", str(tmp_path / "out")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "needs a CUDA GPU; nothing measured" in done.stdout and "train_loop.py" in done.stdout
    assert list((tmp_path / "out").iterdir()) == []


def _loop(tmp_path, *flags):
    out = tmp_path / "out" / "train_loop.json"
    done = subprocess.run([sys.executable, "benchmarks/train_loop.py", "--out", str(out), "--work", str(tmp_path / "w"),
                           "--models", "DiT-1x32x2/2", "--size", "8", "--count", "64", "--batch", "8", "--workers", "1",
                           "--steps", "4", "--log-every", "2", *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


def test_train_loop_stage_skips_what_its_budget_leaves_out(tmp_path):
    report, stdout = _loop(tmp_path, "--budget", "0")
    assert report["device"].startswith("cpu") and report["data"]["latent"] == [4, 8, 8]
    assert [(r["zero"], r["objective"]) for r in report["rows"]] == [(2, "fm"), (2, "scfm"), (3, "fm"), (3, "scfm")]
    assert all(r["skipped"].startswith("budget") for r in report["rows"]) and report["ratios"] == {}


def test_train_loop_stage_runs_flowpre_train_on_cpu(tmp_path):
    """The loop stage as the GPU check runs it, small: `flowpre train` under DeepSpeed at
    ZeRO-2 and ZeRO-3 (sharded EMAs) with scfm on synthetic latents; one JSON row each."""
    report, stdout = _loop(tmp_path, "--objectives", "scfm")
    rows = {(r["zero"], r["objective"]): r for r in report["rows"]}
    assert set(rows) == {(2, "scfm"), (3, "scfm")}
    for r in rows.values():
        assert r["returncode"] == 0, r.get("error_tail")
        assert r["windows"] == 2 and r["windows_timed"] == 1 and r["img_per_s"] > 0 and r["loss_finite"]
        assert r["mfu"] is None  # no peak FLOP/s on a CPU
        assert r["objective_overhead"] > 0 and r["ema_bytes_per_rank"] > 0
        assert (tmp_path / "out" / r["log"]).is_file()
    assert not any((tmp_path / "w").glob("DiT*"))  # run folders removed; shards kept


def test_train_loop_summary_and_ratios():
    spec = importlib.util.spec_from_file_location("train_loop", ROOT / "benchmarks" / "train_loop.py")
    loop = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loop)
    records = [{"step": 5 * i, "loss": 1.0 / i, "samples_per_s": s, "mfu": m, "objective_overhead": 0.17}
               for i, (s, m) in enumerate([(10.0, 0.1), (100.0, 0.5), (120.0, 0.6), (80.0, 0.4)], 1)]
    summary = loop.summarise(records)
    assert summary["img_per_s"] == 100.0 and summary["mfu"] == 0.5  # medians without the start-up window
    assert summary["windows"] == 4 and summary["windows_timed"] == 3 and summary["loss_finite"]
    assert summary["objective_overhead"] == pytest.approx(0.17)
    rows = [{"model": "M", "zero": 2, "objective": "fm", "img_per_s": 120.0},
            {"model": "M", "zero": 2, "objective": "scfm", "img_per_s": 100.0},
            {"model": "M", "zero": 3, "objective": "scfm", "img_per_s": 90.0},  # its fm run was cut off
            {"model": "M", "zero": 3, "objective": "fm", "skipped": "budget: 3 s left"}]
    assert loop.ratios(rows) == {"M zero2 scfm/fm step time": pytest.approx(1.2)}
    assert loop.parse_batches("DiT-B/2=256,DiT-XL/2=128", ["DiT-XL/2"]) == {"DiT-XL/2": 128}
    # the headline run first, then one change away from it (objective, stage, model), then two
    assert loop.plan(["XL", "B"], ["fm", "scfm"], [2, 3]) == [
        (2, "XL", "fm"), (2, "XL", "scfm"), (3, "XL", "fm"), (2, "B", "fm"),
        (3, "XL", "scfm"), (2, "B", "scfm"), (3, "B", "fm"), (3, "B", "scfm")]
