"""FM vs SCFM vs Shortcut Models at equal training compute on Fashion-MNIST (issue 6).

    python experiments/fashion_fewstep.py                 # the CPU-sized run (~1.5 h on 2 cores)
    python experiments/fashion_fewstep.py --scale gpu     # bigger model, longer, more samples
    python experiments/fashion_fewstep.py --variant scfm_fm50=scfm:objective.fm_fraction=0.5 --no-fid

For each objective: train from configs/experiments/fashion_<objective>.yaml (the three
differ only in objective.name), export the slow EMA, then `flowpre eval` on the test
split (--split train when tuning: pick settings on train, report the pick on test): FD
(the project's classifier) on --num-samples images at every step count, FID (InceptionV3)
on the first --fid-samples of the same images at --fid-steps. Wall time and training
FLOPs, including the objective's extra no-grad forwards, are recorded.
Writes <out>/fashion_fewstep.{json,md,png}.

Each stage leaves a file in the run folder and is skipped when that file exists, so an
interrupted experiment continues where it stopped (--fresh starts over). A variant is an
extra run, `NAME=OBJECTIVE:key=value,key=value` (config overrides on that objective's
file), reported beside the three. The goals are checked for `scfm` and for every SCFM
variant, against the FM and Shortcut runs trained on as many images (a 3000-step SCFM
variant against a 3000-step FM variant).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OBJECTIVES = ("fm", "scfm", "shortcut")
STEPS = [1, 2, 4, 8, 16, 32, 128]
# Scales change every run identically; the configs hold the CPU scale.
SCALES = {
    "cpu": {"overrides": [], "num_samples": 2000, "fid_samples": 1000, "ref_count": 1000, "batch_size": 500},
    "gpu": {"overrides": ["model.name=DiT-S/2", "train.max_steps=20000", "train.batch_size=256",
                          "train.checkpoint_every=5000", "train.warmup_steps=500", "data.num_workers=4",
                          "deepspeed.zero_stage=2"],
            "num_samples": 10000, "fid_samples": 10000, "ref_count": None, "batch_size": 1000},
    # a minute-long pass through every stage, for the test suite
    "smoke": {"overrides": ["train.max_steps=4", "train.batch_size=8", "train.checkpoint_every=4",
                            "train.log_every=2", "train.warmup_steps=0", "data.num_workers=0"],
              "num_samples": 8, "fid_samples": 4, "ref_count": 6, "batch_size": 8},
}
GOALS = [  # METHOD.md section 6, as issue 6 quantifies it: (text, holds(scfm, fm, shortcut FD by steps))
    ("SCFM 4-step FD <= 1.3 x FM 128-step FD", lambda s, f, c: s[4] <= 1.3 * f[128]),
    ("SCFM 128-step FD <= 1.1 x FM 128-step FD", lambda s, f, c: s[128] <= 1.1 * f[128]),
    ("SCFM 1-step FD <= FM 1-step FD / 3", lambda s, f, c: s[1] <= f[1] / 3),
    ("SCFM 1-step FD <= Shortcut 1-step FD", lambda s, f, c: s[1] <= c[1]),
]


def flowpre(*args, log):
    """Run the flowpre CLI in a subprocess (each stage gets a clean process, as a user's would)."""
    cmd = [sys.executable, "-m", "flowpre.cli", *map(str, args)]
    log(f"$ flowpre {' '.join(map(str, args))}")
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.time() - t0


def parse_variant(text):
    name, _, rest = text.partition("=")
    objective, _, overrides = rest.partition(":")
    if not name or objective not in OBJECTIVES or not overrides:
        raise argparse.ArgumentTypeError(f"--variant expects NAME=OBJECTIVE:key=value[,key=value], got {text!r}")
    return name, objective, overrides.split(",")


def train_flops(run_dir, cfg_overrides, config):
    """Training FLOPs: 3 x forward per trained image (forward + backward) plus the objective's
    no-grad forwards, which the loop logs as `objective_overhead` relative to that."""
    from flowpre.config import load_config
    from flowpre.objectives import build as build_objective
    from flowpre.train.loop import build_model, fill_model_shape

    cfg = load_config(config, cfg_overrides)
    dataset = fill_model_shape(cfg)
    model = build_model(cfg, dataset, build_objective(cfg.objective).step_levels)
    m = cfg.model
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    overheads = [r["objective_overhead"] for r in records if r.get("objective_overhead") is not None]
    overhead = sum(overheads) / len(overheads) if overheads else 0.0
    speeds = [r["samples_per_s"] for r in records[1:] if r.get("samples_per_s")]  # first window includes start-up
    images = cfg.train.max_steps * cfg.train.batch_size
    return {"forward_gflops_per_image": model.forward_flops() / 1e9, "trained_images": images,
            "objective_overhead": overhead, "train_pflops": 3 * model.forward_flops() * images * (1 + overhead) / 1e15,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "train_img_per_s": sum(speeds) / len(speeds) if speeds else None, "model": m.name}


def run_one(name, objective, overrides, args, scale, log):
    run_dir = Path(args.runs) / name
    config = ROOT / "configs" / "experiments" / f"fashion_{objective}.yaml"
    overrides = [f"run.dir={run_dir}", f"data.shards={args.data}/train-*.tar", *scale["overrides"], *overrides]
    if args.fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    record = run_dir / "experiment_train.json"
    if not record.exists():
        wall = flowpre("train", "--config", config, *overrides, log=log)
        record.write_text(json.dumps({"wall_s": wall, "overrides": overrides}, indent=2))
    train = {**json.loads(record.read_text()), **train_flops(run_dir, overrides, config)}
    weights = run_dir / "model.safetensors"
    common = ["--weights", weights, "--reference", f"fashion-mnist:{args.split}", "--num-samples", scale["num_samples"],
              "--batch-size", scale["batch_size"], "--seed", args.seed, "--shift", 1.0, "--cfg", 1.0]
    # One eval file per call, named by split, metric and steps; only step counts that no file
    # of the run has scored on this split yet are evaluated (an ablation can add steps).
    def scored(kind):
        return {int(k) for f in run_dir.glob(f"eval_{args.split}_{kind}_*.json")
                for k in json.loads(f.read_text())["results"]}

    fid_steps = [s for s in args.steps if s in args.fid_steps and s not in scored("fd_fid")]
    plain_steps = [s for s in args.steps if s not in args.fid_steps and s not in scored("fd") | scored("fd_fid")]
    for tag, steps, extra in (("fd", plain_steps, ["--metric", "fd"]),
                              ("fd_fid", fid_steps, ["--metric", "fd,fid", "--fid-samples", scale["fid_samples"]]
                               + (["--ref-count", scale["ref_count"]] if scale["ref_count"] else []))):
        if steps:
            out = run_dir / f"eval_{args.split}_{tag}_{'-'.join(map(str, steps))}.json"
            wall = flowpre("eval", *common, "--steps", ",".join(map(str, steps)), *extra, "--out", out, log=log)
            saved = json.loads(out.read_text())
            saved["wall_s"] = wall
            out.write_text(json.dumps(saved, indent=2))
    evals = {f.stem: json.loads(f.read_text()) for f in sorted(run_dir.glob(f"eval_{args.split}_*.json"))}
    results = {}
    for e in evals.values():
        for s, r in e["results"].items():
            if int(s) in args.steps:
                results.setdefault(int(s), {}).update(r)
    meta = next((e for e in evals.values() if "fid" in e["metrics"]), next(iter(evals.values()), {}))
    return {"name": name, "objective": objective, "config": str(config.relative_to(ROOT)), "overrides": overrides,
            "train": train, "eval_wall_s": sum(e.get("wall_s", 0) for e in evals.values()),
            "eval": {"num_samples": scale["num_samples"], "fid_samples": meta.get("fid_samples"),
                     "fid_reference_count": meta.get("reference_count"), "reference": f"fashion-mnist:{args.split}",
                     "shift": 1.0, "cfg": 1.0, "seed": args.seed, "classifier_test_accuracy":
                     meta.get("classifier_test_accuracy")},
            "results": {s: results[s] for s in sorted(results)}}


def check_goals(runs):
    def fd(r):
        return {s: v["fd"] for s, v in r["results"].items()}

    def baseline(objective, images):  # the run of that objective at equal training length
        same = [r for r in runs if r["objective"] == objective and r["train"]["trained_images"] == images]
        return fd(min(same, key=lambda r: r["name"] != objective)) if same else {}

    scfm_runs = [r for r in runs if r["objective"] == "scfm"] or [{"name": "scfm", "results": {}, "train": {}}]
    out = []
    for run in scfm_runs:
        images = run["train"].get("trained_images")
        for text, holds in GOALS:
            try:
                met = bool(holds(fd(run), baseline("fm", images), baseline("shortcut", images)))
            except KeyError:  # an objective or step count was not run
                met = None
            out.append({"run": run["name"], "goal": text, "met": met})
    return out


def fmt(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}"


def write_markdown(path, summary):
    runs, steps = summary["runs"], summary["steps"]
    lines = [f"# Fashion-MNIST: quality against sampling steps, {' vs '.join(r['name'] for r in runs)}", "",
             f"Produced by `{summary['command']}` on {summary['date']} ({summary['machine']}, "
             f"commit {summary['commit']}). Lower FD/FID is better.", "",
             f"## FD (classifier features, {summary['split']} split, "
             f"{runs[0]['eval']['num_samples']} samples per cell)", "",
             "| objective | " + " | ".join(f"{s}" for s in steps) + " |",
             "|---|" + "---:|" * len(steps)]
    for r in runs:
        lines.append(f"| {r['name']} | " + " | ".join(fmt(r["results"].get(s, {}).get("fd")) for s in steps) + " |")
    fid_steps = [s for s in steps if any("fid" in r["results"].get(s, {}) for r in runs)]
    if fid_steps:
        lines += ["", f"## FID (InceptionV3, first {runs[0]['eval']['fid_samples']} of the same samples, against "
                      f"{runs[0]['eval']['fid_reference_count']} {summary['split']} images)", "",
                  "| objective | " + " | ".join(map(str, fid_steps)) + " |", "|---|" + "---:|" * len(fid_steps)]
        for r in runs:
            lines.append(f"| {r['name']} | " + " | ".join(fmt(r["results"].get(s, {}).get("fid")) for s in fid_steps) + " |")
    lines += ["", "## Class accuracy (the classifier agrees with the requested class)", "",
              "| objective | " + " | ".join(map(str, steps)) + " |", "|---|" + "---:|" * len(steps)]
    for r in runs:
        lines.append(f"| {r['name']} | " + " | ".join(fmt(r["results"].get(s, {}).get("class_accuracy"), 3)
                                                     for s in steps) + " |")
    lines += ["", "## Training compute", "",
              "| objective | model | params | images | objective overhead | train PFLOP | img/s | train wall | eval wall |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        t = r["train"]
        lines.append(f"| {r['name']} | {t['model']} | {t['params_m']:.2f}M | {t['trained_images']} | "
                     f"+{t['objective_overhead']:.1%} | {t['train_pflops']:.3f} | {fmt(t['train_img_per_s'])} | "
                     f"{t['wall_s'] / 60:.1f} min | {r['eval_wall_s'] / 60:.1f} min |")
    lines += ["", "## Goals (METHOD.md section 6)", ""]
    for g in summary["goals"]:
        if g["met"] is not None:
            lines.append(f"- {'met' if g['met'] else 'MISSED'}: {g['goal'].replace('SCFM', g['run'], 1)}")
    unjudged = sum(g["met"] is None for g in summary["goals"])
    if unjudged:
        lines.append(f"- not judged: {unjudged} goal(s) whose run or step count is not on this page")
    path.write_text("\n".join(lines) + "\n")


def plot(path, summary):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in ("fd", "fid") if any(m in v for r in summary["runs"] for v in r["results"].values())]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for r in summary["runs"]:
            pts = [(s, v[metric]) for s, v in r["results"].items() if metric in v]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=r["name"])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(summary["steps"], [str(s) for s in summary["steps"]])
        ax.set_xlabel("sampling steps (Euler)")
        ax.set_ylabel(metric.upper() + " (lower is better)")
        ax.set_title(f"Fashion-MNIST {summary['split']}, {metric.upper()}")
        ax.grid(True, which="both", alpha=0.3)
        many = len(summary["runs"]) > 4
        ax.legend(fontsize="x-small" if many else None, ncol=2 if many else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    p.add_argument("--objectives", default=",".join(OBJECTIVES))
    p.add_argument("--variant", type=parse_variant, action="append", default=[])
    p.add_argument("--steps", default=",".join(map(str, STEPS)))
    p.add_argument("--fid-steps", default="1,4,128")
    p.add_argument("--no-fid", action="store_true", help="FD only for runs not yet evaluated (quick ablations)")
    p.add_argument("--seed", type=int, default=0, help="evaluation seed")
    p.add_argument("--split", choices=("test", "train"), default="test",
                   help="reference split: tune on train, report on test")
    p.add_argument("--runs", default="runs/experiments")
    p.add_argument("--data", default="data/fashion-mnist", help="training shards (written here when missing)")
    p.add_argument("--out", default="docs/results")
    p.add_argument("--name", default="fashion_fewstep", help="file name of the results (an ablation page: another name)")
    p.add_argument("--fresh", action="store_true", help="retrain and re-evaluate even where results exist")
    args = p.parse_args(argv)
    from flowpre.cli import parse_steps

    args.steps, args.fid_steps = parse_steps(args.steps), [] if args.no_fid else parse_steps(args.fid_steps)
    os.chdir(ROOT)
    log = lambda msg: print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)  # noqa: E731
    if not (Path(args.data) / "dataset.json").exists():
        flowpre("shards", "--source", "fashion-mnist", "--out", args.data, log=log)
    scale = SCALES[args.scale]
    jobs = [(o, o, []) for o in args.objectives.split(",") if o] + args.variant
    began, runs = time.time(), []
    for name, objective, overrides in jobs:
        runs.append(run_one(name, objective, overrides, args, scale, log))
        log(f"{name}: FD " + ", ".join(f"{s}:{v['fd']:.1f}" for s, v in runs[-1]["results"].items()))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    summary = {"command": "python experiments/fashion_fewstep.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "scale": args.scale, "split": args.split, "steps": args.steps, "fid_steps": args.fid_steps, "commit": commit,
               "date": datetime.date.today().isoformat(), "machine": f"{os.cpu_count()}-core CPU, torch "
               + __import__("torch").__version__, "wall_s_this_invocation": time.time() - began,
               "runs": runs, "goals": check_goals(runs)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_markdown(out / f"{args.name}.md", summary)
    plot(out / f"{args.name}.png", summary)
    log(f"wrote {out}/{args.name}.{{json,md,png}}")
    print((out / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
