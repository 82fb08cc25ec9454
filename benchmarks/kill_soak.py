"""Kill soak: a 2-rank run SIGKILLed at K random moments, each followed by `train.resume=auto`.

    python benchmarks/kill_soak.py --k 20                  # a few minutes per kill on a busy 2-core CPU
    python benchmarks/kill_soak.py --k 3 --out /tmp/k.json  # what the test runs

The kills alternate at random between a random moment of training (the launcher and every
rank get SIGKILL together: a lost node) and the middle of a checkpoint write
(FLOWPRE_FAULT_KILL_AT_CHECKPOINT: every rank kills itself after writing its files, before
the folder is renamed). After the K-th kill the run resumes to the end. It prints K/K when
the final exports (slow EMA and student) are bitwise equal to an uninterrupted run's, and
writes a JSON record (default benchmarks/results/kill_soak.json).
"""
import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flowpre import strict_json

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.name=DiT-2x32x2/4", "train.batch_size=8", "train.lr=0.001", "train.log_every=1",
        "data.num_workers=1", "data.shuffle_buffer=64", "sample.num_images=4", "sample.steps=[1]",
        "sample.every=0", "ema.fast_decay=0.9", "ema.slow_decay=0.95", "train.warmup_steps=3"]


def _env(**extra):
    e = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    e["PATH"] = os.path.dirname(sys.executable) + os.pathsep + e.get("PATH", "")
    e.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/flowpre/torch_extensions"))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TRITON_INTERPRET",
              "FLOWPRE_FAULT_KILL_AT_CHECKPOINT", "FLOWPRE_FAULT_NAN_AT"):
        e.pop(k, None)
    e.update(extra)
    return e


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(run, shards, args, **env):
    config = Path(f"{run}.yaml")
    config.write_text("objective:\n  name: fm\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
           "-m", "flowpre.cli", "train", "--config", str(config), f"run.dir={run}", f"data.shards={shards}", *TINY,
           f"train.max_steps={args.steps}", f"train.checkpoint_every={args.checkpoint_every}", "train.resume=auto"]
    log = open(f"{run}.log", "a")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(**env), start_new_session=True)


def _kill_tree(proc):
    """SIGKILL the launcher and every rank at once, as when a node is lost. torchrun starts its
    workers in sessions of their own, so a process-group kill would leave the ranks running."""
    import psutil

    try:
        ranks = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        ranks = []
    proc.kill()  # through Popen, so that its return code is recorded (psutil would reap it as 0)
    for p in ranks:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(ranks, timeout=60)


def _metric_lines(run):
    path = Path(run) / "metrics.jsonl"
    return path.read_text().splitlines() if path.is_file() else []


def _newest_step(run, skip):
    """The highest step logged by the current process (lines after the first `skip`; a killed run
    leaves lines of steps that its successor repeats)."""
    steps = [json.loads(line)["step"] for line in _metric_lines(run)[skip:] if line.strip()]
    return max(steps, default=-1)


def _latest(run):
    done = sorted(p.name for p in (Path(run) / "checkpoints").glob("step*") if (p / "meta.json").is_file())
    return int(done[-1][4:]) if done else 0


def _export(run, out):
    from safetensors.torch import load_file

    tensors = {}
    for ema in ("slow", "none"):
        path = Path(f"{out}_{ema}.safetensors")
        subprocess.run([sys.executable, "-m", "flowpre.cli", "export", "--run", str(run), "--out", str(path),
                        "--ema", ema], check=True, capture_output=True, env=_env())
        tensors[ema] = load_file(str(path))
    return tensors


def soak(args):
    import torch

    from flowpre.data.shards import write_shards

    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kill_soak-"))
    shards = work / "digits"
    if not shards.is_dir():
        write_shards("digits", shards, shard_size=200, split="train", limit=800)
    pattern = str(shards / "train-*.tar")
    t0 = time.time()
    straight = work / "straight"
    if _start(straight, pattern, args).wait() != 0:
        raise SystemExit(f"the uninterrupted run failed: see {straight}.log")
    reference = _export(straight, work / "straight")

    run, kills = work / "soaked", []
    for i in range(args.k):
        resumed_from = _latest(run)
        if resumed_from >= args.steps - 1:
            raise SystemExit(f"the run reached step {resumed_from} of {args.steps} after {i} kills: give more --steps")
        # kill within the next two checkpoint intervals, so K kills fit in one run
        left = [s for s in range(resumed_from + 1, args.steps) if s % args.checkpoint_every == 0][:2]
        if left and rng.random() < 0.5:  # mid-checkpoint: every rank dies before the rename
            at = rng.choice(left)
            proc = _start(run, pattern, args, FLOWPRE_FAULT_KILL_AT_CHECKPOINT=str(at))
            proc.wait()
            kills.append({"kind": "checkpoint", "step": at, "resumed_from": resumed_from, "rc": proc.returncode})
        else:  # a random moment: after this process logged step `at` (at = resumed_from: start-up), plus up to a step's time
            at = min(resumed_from + rng.randrange(0, 2 * args.checkpoint_every), args.steps - 2)
            skip = len(_metric_lines(run))
            proc = _start(run, pattern, args)
            while proc.poll() is None and at > resumed_from and _newest_step(run, skip) < at:
                time.sleep(0.01)
            if at == resumed_from:  # start-up: somewhere in the launch, engine set-up or loading, never later
                deadline = time.time() + rng.uniform(0, 8.0)
                while proc.poll() is None and time.time() < deadline and _newest_step(run, skip) < 0:
                    time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.4))
            _kill_tree(proc)
            kills.append({"kind": "moment", "after_step": at, "resumed_from": resumed_from, "rc": proc.returncode})
        print(f"kill {i + 1}/{args.k}: {kills[-1]}", flush=True)
    final = _start(run, pattern, args)
    if final.wait() != 0:
        raise SystemExit(f"the final resume failed: see {run}.log")
    soaked = _export(run, work / "soaked")
    equal = all(reference[e].keys() == soaked[e].keys() and
                all(torch.equal(reference[e][k], soaked[e][k]) for k in reference[e]) for e in reference)
    passed = args.k if equal else 0
    record = {"k": args.k, "passed": passed, "bitwise_equal": equal, "steps": args.steps,
              "checkpoint_every": args.checkpoint_every, "seed": args.seed, "kills": kills,
              "seconds": round(time.time() - t0, 1), "workdir": str(work)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(strict_json.dumps(record, indent=1) + "\n")
    print(f"{passed}/{args.k}: final exports {'bitwise equal to' if equal else 'DIFFER from'} the uninterrupted "
          f"run's ({record['seconds']} s); wrote {out}")
    return record


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=20, help="number of kills")
    p.add_argument("--steps", type=int, default=0, help="training steps (default: 2 x checkpoint interval x (k + 1))")
    p.add_argument("--checkpoint-every", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="default: a new temporary folder")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kill_soak.json"))
    args = p.parse_args(argv)
    args.steps = args.steps or 2 * args.checkpoint_every * (args.k + 1)
    record = soak(args)
    sys.exit(0 if record["bitwise_equal"] else 1)


if __name__ == "__main__":
    main()
