"""experiments/fashion_fewstep.py end to end at its smoke scale: train, export, evaluate
(FD and FID on shared samples), write the json/md/png, and reuse finished stages."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from flowpre.data.shards import write_shards
from flowpre.data.sources import FASHION_MNIST_DIRS

from helpers import env

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not any(Path(d).is_dir() for d in FASHION_MNIST_DIRS), reason="dataset-fashion-mnist not installed")
def test_experiment_script_smoke(tmp_path):
    write_shards("fashion-mnist", tmp_path / "data", shard_size=100, split="train", limit=200)

    def experiment(steps):
        return subprocess.run([sys.executable, str(ROOT / "experiments" / "fashion_fewstep.py"), "--scale", "smoke",
                               "--objectives", "fm", "--data", str(tmp_path / "data"), "--steps", steps,
                               "--fid-steps", "1", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")],
                              capture_output=True, text=True, timeout=900, env=env())

    r = experiment("1,2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "fashion_fewstep.json").read_text())
    (run,) = summary["runs"]
    assert run["name"] == "fm" and set(run["results"]) == {"1", "2"}
    assert "fid" in run["results"]["1"] and "fid" not in run["results"]["2"]  # FID only at --fid-steps
    assert run["eval"]["fid_samples"] == 4 and run["train"]["trained_images"] == 4 * 8
    assert run["train"]["train_pflops"] > 0 and run["train"]["objective_overhead"] == 0
    assert all(g["met"] is None for g in summary["goals"])  # scfm/shortcut not run: not judged
    md = (tmp_path / "out" / "fashion_fewstep.md").read_text()
    assert f"| fm | {run['results']['1']['fd']:.1f} | {run['results']['2']['fd']:.1f} |" in md
    assert (tmp_path / "out" / "fashion_fewstep.png").stat().st_size > 10_000
    # a second call with one more step count trains nothing and evaluates only that step count
    stamp = (tmp_path / "runs" / "fm" / "experiment_train.json").stat().st_mtime
    r = experiment("1,2,4")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "flowpre train" not in r.stdout and "--steps 4 " in r.stdout
    assert (tmp_path / "runs" / "fm" / "experiment_train.json").stat().st_mtime == stamp
    again = json.loads((tmp_path / "out" / "fashion_fewstep.json").read_text())["runs"][0]["results"]
    assert set(again) == {"1", "2", "4"} and again["1"] == run["results"]["1"]
