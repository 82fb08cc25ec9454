"""The real training loop's throughput: `flowpre train` itself, per model x objective x ZeRO stage.

    python benchmarks/train_loop.py --out OUT/train_loop.json [--budget 200]

Unlike train_throughput.py (a bare model step), each run is the whole path a user takes:
`python -m flowpre.cli train` in its own process (one GPU, no launcher: a world of one,
as launchers/local.sh), DeepSpeed with the ZeRO stage's template, bf16 autocast with
fp32 master weights (train.precision=auto on CUDA), both fp32 EMAs, the objective, the
fused loss, and the data pipeline with its workers, on synthetic ImageNet-shaped latent
shards (4x32x32 float16, 1000 classes; flowpre/data/synthetic.py) written first, in seconds.

From each run's metrics.jsonl: img/s and MFU are the median over the logged windows
after the first (which holds start-up: Triton autotuning, DeepSpeed's first steps);
objective_overhead is the objective's extra no-grad forwards in units of the student's
forward + backward. The JSON is rewritten after every run, so a run cut off by --budget
or the stage's cap still leaves the finished ones. The headline run goes first (DiT-XL/2,
fm, ZeRO-2), then those closest to it (`plan`), and none starts with less than --min-run-s left.

Without CUDA the same code runs on the CPU (fp32, gloo): tests use that with a tiny model.
"""
import argparse
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flowpre import strict_json  # noqa: E402
from flowpre.data.synthetic import write_synthetic_latents  # noqa: E402


def parse_batches(text, models):
    """'256' for every model, or 'DiT-B/2=256,DiT-XL/2=128'."""
    if "=" not in text:
        return {m: int(text) for m in models}
    pairs = dict(p.split("=") for p in text.split(","))
    missing = [m for m in models if m not in pairs]
    if missing:
        raise SystemExit(f"--batch names no batch for {missing}")
    return {m: int(pairs[m]) for m in models}


def plan(models, objectives, stages):
    """(zero, model, objective), the headline run first (the first of each list: ZeRO-2,
    DiT-XL/2, fm, the MFU goal's setting), then the runs that differ from it in one thing
    (scfm for the step-time ratio, then ZeRO-3, then the other model), then in two, and so on, so
    that a budget cut leaves out the runs furthest from it."""
    def distance(run):
        other = (run[1] != models[0], run[0] != stages[0], run[2] != objectives[0])
        return sum(other), other  # ties: another objective, then another stage, then another model
    return sorted(itertools.product(stages, models, objectives), key=distance)


def overrides(run_dir, shards, model, objective, zero, batch, steps, log_every, workers):
    return [f"run.dir={run_dir}", f"model.name={model}", f"data.shards={shards}/train-*.tar",
            f"data.num_workers={workers}", f"objective.name={objective}", f"deepspeed.zero_stage={zero}",
            f"train.batch_size={batch}", f"train.max_steps={steps}", f"train.log_every={log_every}",
            "train.checkpoint_every=0", "train.final_checkpoint=false", "train.warmup_steps=0",
            "sample.every=0", "logging.wandb=off", "logging.progress=off"]


def summarise(records):
    """img/s, MFU, objective overhead and losses of one run's metrics.jsonl records."""
    timed = records[1:] or records  # the first window holds start-up
    out = {"windows": len(records), "windows_timed": len(timed),
           "img_per_s": statistics.median(r["samples_per_s"] for r in timed),
           "img_per_s_windows": [round(r["samples_per_s"], 2) for r in records]}
    mfu = [r["mfu"] for r in timed if r.get("mfu") is not None]
    out["mfu"] = statistics.median(mfu) if mfu else None
    out["objective_overhead"] = statistics.mean(r.get("objective_overhead", 0.0) for r in timed)
    out["loss_first"], out["loss_last"] = records[0]["loss"], records[-1]["loss"]
    out["loss_finite"] = all(isinstance(r["loss"], float) and r["loss"] == r["loss"] for r in records)
    out["skipped_steps"] = records[-1].get("skipped_steps", 0)
    out["ema_bytes_per_rank"] = records[-1].get("ema_bytes_per_rank")
    return out


_RUNNING = []  # the run in progress, for the SIGTERM handler


def _stop_running(signum, frame):
    """`timeout` (the stage's cap) signals this process only; the run lives in a session of
    its own (so that it and its loader workers can be killed together): take it down too,
    or it would go on holding the GPU during the next stage."""
    for proc in _RUNNING:
        os.killpg(proc.pid, signal.SIGKILL)
    raise SystemExit(128 + signum)


def run_one(config, run_dir, args_list, timeout, log_path):
    """One `flowpre train` process; killed with its data-loader workers at `timeout`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("TRITON_CACHE_AUTOTUNING", "1")  # later runs of a shape reuse the first one's tuning
    cmd = [sys.executable, "-m", "flowpre.cli", "train", "--config", str(config), *args_list]
    t = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _RUNNING.append(proc)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the run and its loader workers
            proc.wait()
            rc = "timeout"
        finally:
            _RUNNING.remove(proc)
    wall = time.perf_counter() - t
    metrics = Path(run_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line] if metrics.exists() else []
    return rc, wall, records


def ratios(rows):
    """scfm's step time over fm's, per (model, ZeRO stage), from img/s (goal: <= 1.2)."""
    done = {(r["model"], r["zero"], r["objective"]): r for r in rows if "img_per_s" in r}
    out = {}
    for (model, zero, objective), r in done.items():
        fm = done.get((model, zero, "fm"))
        if objective != "fm" and fm:
            out[f"{model} zero{zero} {objective}/fm step time"] = fm["img_per_s"] / r["img_per_s"]
    return out


def device_info():
    import torch
    info = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
    else:
        info["device"] = "cpu (fp32, gloo; no MFU)"
    try:
        import deepspeed
        info["deepspeed"] = deepspeed.__version__
    except ImportError as e:
        info["deepspeed"] = f"missing: {e}"
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/train_loop.json")
    ap.add_argument("--models", default="DiT-XL/2,DiT-B/2")
    ap.add_argument("--objectives", default="fm,scfm")
    ap.add_argument("--zero", default="2,3", help="ZeRO stages, in the order run")
    ap.add_argument("--batch", default="256", help="per GPU: N, or MODEL=N,MODEL=N")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--workers", type=int, default=4, help="data.num_workers")
    ap.add_argument("--shards", default=None, help="synthetic latent shards to use (default: written under --work)")
    ap.add_argument("--count", type=int, default=8192, help="synthetic latents to write")
    ap.add_argument("--size", type=int, default=32, help="latent height and width (4 x size x size)")
    ap.add_argument("--work", default="/tmp/flowpre_train_loop", help="shards and run folders (runs deleted)")
    ap.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"),
                    help="base config; every key the runs depend on is overridden")
    ap.add_argument("--budget", type=float, default=200.0, help="seconds for the whole stage")
    ap.add_argument("--min-run-s", type=float, default=25.0, help="start no run with less time left")
    ap.add_argument("--keep-runs", action="store_true", help="keep run folders (they hold logs and config)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    signal.signal(signal.SIGTERM, _stop_running)
    models = args.models.split(",")
    batches = parse_batches(args.batch, models)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    shards = Path(args.shards) if args.shards else work / "shards"
    t = time.perf_counter()
    if not args.shards:
        write_synthetic_latents(shards, count=args.count, shard_size=max(1, args.count // 8),
                                shape=(4, args.size, args.size))
    report = {**device_info(), "commit": os.environ.get("FLOWPRE_COMMIT") or _git_commit(),
              "time": datetime.now(timezone.utc).isoformat(), "steps": args.steps, "log_every": args.log_every,
              "data": {"shards": str(shards), "count": args.count, "latent": [4, args.size, args.size],
                       "num_workers": args.workers, "write_s": round(time.perf_counter() - t, 2)},
              "rows": [], "ratios": {}}

    def write():
        report["ratios"] = ratios(report["rows"])
        out.write_text(strict_json.dumps(report, indent=1) + "\n")

    write()
    print(f"train loop: {report['device']}, deepspeed {report['deepspeed']}; {args.count} latents written in "
          f"{report['data']['write_s']} s", flush=True)
    for zero, model, objective in plan(models, args.objectives.split(","), [int(z) for z in args.zero.split(",")]):
        row = {"model": model, "objective": objective, "zero": zero, "batch": batches[model]}
        left = args.budget - (time.perf_counter() - t_start)
        if left < args.min_run_s:
            row["skipped"] = f"budget: {left:.0f} s left"
            report["rows"].append(row)
            write()
            continue
        name = f"{model.replace('/', '_')}_{objective}_z{zero}"
        run_dir, log_path = work / name, out.parent / f"train_loop_{name}.log"
        shutil.rmtree(run_dir, ignore_errors=True)
        rc, wall, records = run_one(args.config, run_dir, overrides(
            run_dir, shards, model, objective, zero, batches[model], args.steps, args.log_every, args.workers),
            timeout=left, log_path=log_path)
        row.update(returncode=rc, wall_s=round(wall, 1), log=log_path.name)
        if records:
            row.update(summarise(records))
        if rc != 0:
            row["error_tail"] = log_path.read_text()[-1500:]
        report["rows"].append(row)
        write()
        print(f"{model:9s} {objective:5s} ZeRO-{zero} batch {batches[model]:4d}: " + (
            f"{row['img_per_s']:8.1f} img/s" + (f"  MFU {row['mfu']:.1%}" if row.get("mfu") else "")
            + f"  overhead {row['objective_overhead']:.2f}" if "img_per_s" in row else "no metrics")
            + f"  ({wall:.0f} s, rc {rc})", flush=True)
        if not args.keep_runs:
            shutil.rmtree(run_dir, ignore_errors=True)
    for k, v in report["ratios"].items():
        print(f"{k}: {v:.3f}")
    print(f"wrote {out}")
    return 0


def _git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
