"""Tables, goals and plots of experiments/fashion_fewstep.py, over training seeds.

A run is one (name, seed); a group is a name over its seeds. Every number on the page is
the mean over the group's seeds, with the sample standard deviation beside it when there
is more than one seed. The flow-map yardstick (METHOD.md section 8) is computed per seed,
against flow matching of the same seed and the same number of trained images, before
averaging: FD at k steps / the best FD that flow matching reaches at any step count.
"""
from __future__ import annotations

import math
import statistics

SCFM_GOALS = [  # METHOD.md section 6, as issue 6 quantifies it: (text, holds(run FD, fm FD, shortcut FD by steps))
    ("SCFM 4-step FD <= 1.3 x FM 128-step FD", lambda s, f, c: s[4] <= 1.3 * f[128]),
    ("SCFM 128-step FD <= 1.1 x FM 128-step FD", lambda s, f, c: s[128] <= 1.1 * f[128]),
    ("SCFM 1-step FD <= FM 1-step FD / 3", lambda s, f, c: s[1] <= f[1] / 3),
    ("SCFM 1-step FD <= Shortcut 1-step FD", lambda s, f, c: s[1] <= c[1]),
]
# issue 12, for JVP-free objectives: (text, measured ratio(group, fm group), limit) on means over seeds
FLOWMAP_GOALS = [
    ("1-step FD <= 1.3 x FM's best FD", lambda g, f: g["yardstick"][1]["mean"], 1.3),
    ("2-step FD <= 1.15 x FM's best FD", lambda g, f: g["yardstick"][2]["mean"], 1.15),
    ("128-step FD <= 1.05 x FM's 128-step FD", lambda g, f: g["fd"][128]["mean"] / f["fd"][128]["mean"], 1.05),
    ("training FLOPs per image <= 1.35 x FM's", lambda g, f: g["flops_per_image"] / f["flops_per_image"], 1.35),
]
JVP_FREE = ("scfm", "meanflow_fd")  # the objectives the flow-map goals judge (shortcut is the baseline)
YARDSTICK_STEPS = (1, 2)


def stats(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values), "values": values}


def fd_by_steps(run):
    return {int(s): v["fd"] for s, v in run["results"].items() if "fd" in v}


def aggregate(runs):
    """Groups in order of first appearance, each with per-step stats and the yardstick."""
    names = list(dict.fromkeys(r["group"] for r in runs))
    # FM's best: the lowest FD any flow-matching run of that seed and length reaches (the page
    # may hold FM variants, e.g. another sigma embedding: the yardstick is the strongest of them)
    fm_best = {}
    for r in runs:
        if r["objective"] == "fm" and fd_by_steps(r):
            key = (r["seed"], r["train"]["trained_images"])
            fm_best[key] = min(fm_best.get(key, math.inf), *fd_by_steps(r).values())
    groups = []
    for name in names:
        members = [r for r in runs if r["group"] == name]
        steps = sorted({int(s) for r in members for s in r["results"]})
        g = {"name": name, "objective": members[0]["objective"], "seeds": [r["seed"] for r in members],
             "trained_images": members[0]["train"]["trained_images"],
             "flops_per_image": statistics.fmean(r["train"]["train_pflops"] * 1e15 / r["train"]["trained_images"]
                                                 for r in members),
             "train": members[0]["train"]}
        for metric in ("fd", "fid", "class_accuracy"):
            g[metric] = {s: stats([r["results"].get(s, r["results"].get(str(s), {})).get(metric) for r in members])
                         for s in steps}
        ratios = {k: [] for k in YARDSTICK_STEPS}
        for r in members:
            best, fd = fm_best.get((r["seed"], r["train"]["trained_images"])), fd_by_steps(r)
            if best is not None:
                for k in YARDSTICK_STEPS:
                    if k in fd:
                        ratios[k].append(fd[k] / best)
        g["yardstick"] = {k: stats(v) for k, v in ratios.items()}
        groups.append(g)
    return groups


def _means(group, metric="fd"):
    return {s: v["mean"] for s, v in group[metric].items() if v}


def check_goals(groups):
    def baseline(objective, images):  # the group of that objective at equal training length
        same = [g for g in groups if g["objective"] == objective and g["trained_images"] == images]
        return min(same, key=lambda g: g["name"] != objective) if same else None

    out = []
    for g in groups:
        if g["objective"] == "scfm":
            fm, sc = baseline("fm", g["trained_images"]), baseline("shortcut", g["trained_images"])
            for text, holds in SCFM_GOALS:
                try:
                    met = bool(holds(_means(g), _means(fm) if fm else {}, _means(sc) if sc else {}))
                except KeyError:  # an objective or step count was not run
                    met = None
                out.append({"run": g["name"], "goal": text, "met": met, "kind": "scfm"})
        if g["objective"] in JVP_FREE:
            fm = baseline("fm", g["trained_images"])
            for text, ratio, limit in FLOWMAP_GOALS:
                try:
                    value = ratio(g, fm) if fm else None
                except (KeyError, TypeError):  # a step count or the yardstick is missing
                    value = None
                out.append({"run": g["name"], "goal": text, "met": None if value is None else value <= limit,
                            "value": value, "kind": "flowmap"})
    return out


def fmt(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}"


def cell(s, digits=1):
    """'mean' for one seed, 'mean ± std' for several."""
    if not s:
        return "-"
    return fmt(s["mean"], digits) + (f" ± {fmt(s['std'], digits)}" if s.get("std") is not None else "")


def write_markdown(path, summary):
    groups, steps = summary["groups"], summary["steps"]
    seeds = sorted({s for g in groups for s in g["seeds"]})
    spread = " (mean ± standard deviation over seeds)" if len(seeds) > 1 else ""
    runs0 = summary["runs"][0]
    lines = [f"# Fashion-MNIST: quality against sampling steps, {' vs '.join(g['name'] for g in groups)}", "",
             f"Produced by `{summary['command']}` on {summary['date']} ({summary['machine']}, "
             f"commit {summary['commit']}). Lower FD/FID is better. Training seeds: {', '.join(map(str, seeds))}"
             f"{spread}.", "",
             f"## FD (classifier features, {summary['split']} split, {runs0['eval']['num_samples']} samples per cell)",
             "", "| objective | seeds | " + " | ".join(f"{s}" for s in steps) + " | 1-step / FM best | 2-step / FM best |",
             "|---|---:|" + "---:|" * (len(steps) + 2)]
    for g in groups:
        lines.append(f"| {g['name']} | {len(g['seeds'])} | " + " | ".join(cell(g["fd"].get(s)) for s in steps) + " | "
                     + " | ".join(cell(g["yardstick"].get(k), 2) for k in YARDSTICK_STEPS) + " |")
    lines += ["", "The last two columns are METHOD.md section 8's yardstick: FD at 1 (2) steps over the lowest FD "
                  "flow matching reaches at any step count, per seed, at the same number of trained images."]
    fid_steps = [s for s in steps if any(g["fid"].get(s) for g in groups)]
    if fid_steps:
        lines += ["", f"## FID (InceptionV3, first {runs0['eval']['fid_samples']} of the same samples, against "
                      f"{runs0['eval']['fid_reference_count']} {summary['split']} images)", "",
                  "| objective | " + " | ".join(map(str, fid_steps)) + " |", "|---|" + "---:|" * len(fid_steps)]
        for g in groups:
            lines.append(f"| {g['name']} | " + " | ".join(cell(g["fid"].get(s)) for s in fid_steps) + " |")
    lines += ["", "## Class accuracy (the classifier agrees with the requested class)", "",
              "| objective | " + " | ".join(map(str, steps)) + " |", "|---|" + "---:|" * len(steps)]
    for g in groups:
        lines.append(f"| {g['name']} | " + " | ".join(cell(g["class_accuracy"].get(s), 3) for s in steps) + " |")
    fm_flops = {g["trained_images"]: g["flops_per_image"] for g in groups if g["objective"] == "fm"}
    lines += ["", "## Training compute (seed means)", "",
              "| objective | model | params | images | objective overhead | GFLOP per image | x FM | img/s | "
              "train wall | eval wall |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for g in groups:
        members = [r for r in summary["runs"] if r["group"] == g["name"]]
        t = g["train"]
        ref = fm_flops.get(g["trained_images"])
        speeds = [r["train"]["train_img_per_s"] for r in members if r["train"]["train_img_per_s"]]
        lines.append(f"| {g['name']} | {t['model']} | {t['params_m']:.2f}M | {g['trained_images']} | "
                     f"+{t['objective_overhead']:.1%} | {g['flops_per_image'] / 1e9:.3f} | "
                     f"{fmt(g['flops_per_image'] / ref if ref else None, 2)} | "
                     f"{fmt(statistics.fmean(speeds) if speeds else None)} | "
                     f"{statistics.fmean(r['train']['wall_s'] for r in members) / 60:.1f} min | "
                     f"{statistics.fmean(r['eval_wall_s'] for r in members) / 60:.1f} min |")
    for kind, title in (("scfm", "Goals (METHOD.md section 6)"), ("flowmap", "Flow-map goals (issue 12, seed means)")):
        judged = [g for g in summary["goals"] if g["kind"] == kind]
        if not judged:
            continue
        lines += ["", f"## {title}", ""]
        for g in judged:
            if g["met"] is not None:
                goal = (g["goal"].replace("SCFM", g["run"], 1) if kind == "scfm"
                        else f"{g['run']}: {g['goal']} (measured {g['value']:.3f}x)")
                lines.append(f"- {'met' if g['met'] else 'MISSED'}: {goal}")
        unjudged = sum(g["met"] is None for g in judged)
        if unjudged:
            lines.append(f"- not judged: {unjudged} goal(s) whose run or step count is not on this page")
    if summary.get("notes"):
        lines += ["", summary["notes"].strip()]
    path.write_text("\n".join(lines) + "\n")


def plot(path, summary):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = summary["groups"]
    metrics = [m for m in ("fd", "fid") if any(g[m].get(s) for g in groups for s in g[m])]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for i, g in enumerate(groups):
            pts = [(s, v) for s, v in sorted(g[metric].items()) if v]
            # past ten groups the colour cycle repeats: the marker and line style tell them apart
            ax.errorbar([p[0] for p in pts], [p[1]["mean"] for p in pts], marker="os^D"[i // 10 % 4], capsize=3,
                        linestyle=("-", "--", ":", "-.")[i // 10 % 4], label=g["name"], color=f"C{i % 10}",
                        yerr=[p[1]["std"] or 0 for p in pts])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(summary["steps"], [str(s) for s in summary["steps"]])
        ax.set_xlabel("sampling steps (Euler)")
        ax.set_ylabel(metric.upper() + " (lower is better)")
        ax.set_title(f"Fashion-MNIST {summary['split']}, {metric.upper()}")
        ax.grid(True, which="both", alpha=0.3)
        many = len(groups) > 4
        ax.legend(fontsize="x-small" if many else None, ncol=2 if many else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
