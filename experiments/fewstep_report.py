"""Tables, goals and plots of experiments/fashion_fewstep.py, over training seeds.

A run is one (name, seed); a group is a name over its seeds. Every number on the page is
the mean over the group's seeds, with the sample standard deviation beside it when there
is more than one seed. The flow-map yardstick (METHOD.md section 8) is computed per seed,
against flow matching of the same seed and the same number of trained images, before
averaging: FD at k steps / the best FD that flow matching reaches at any step count (and, when
flow matching was scored over sampler CFG scales, at the scale picked per step count on the
train split: the lowest FD of any flow-matching row over step counts and CFG).
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
# issue 23 (round 2), against the CFG-tuned flow-matching best; the compute trend is judged apart
ROUND2_GOALS = [
    ("1-step FD <= 1.2 x FM's best FD", lambda g, f: g["yardstick"][1]["mean"], 1.2),
    ("2-step FD <= 1.0 x FM's best FD", lambda g, f: g["yardstick"][2]["mean"], 1.0),
    ("128-step FD <= 1.05 x FM's 128-step FD", lambda g, f: g["fd"][128]["mean"] / f["fd"][128]["mean"], 1.05),
    ("training FLOPs per image <= 1.5 x FM's", lambda g, f: g["flops_per_image"] / f["flops_per_image"], 1.5),
]
GOAL_SETS = {"issue12": FLOWMAP_GOALS, "round2": ROUND2_GOALS}
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
        for metric in ("fd", "fid", "class_accuracy", "recall"):
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


def trend_stem(name):
    """A group's name without its length suffix (`pick_3k`, `pick_12k` -> `pick`): groups of one
    stem are the same configuration trained for different lengths."""
    head, _, tail = name.rpartition("_")
    return head if head and tail.endswith("k") and tail[:-1].replace(".", "", 1).isdigit() else name


def trends(groups):
    """{stem: [groups by trained images]} for stems trained at more than one length."""
    by = {}
    for g in groups:
        by.setdefault(trend_stem(g["name"]), []).append(g)
    return {k: sorted(v, key=lambda g: g["trained_images"]) for k, v in by.items()
            if len({g["trained_images"] for g in v}) > 1}


def check_goals(groups, goal_set="issue12"):
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
            for text, ratio, limit in GOAL_SETS[goal_set]:
                try:
                    value = ratio(g, fm) if fm else None
                except (KeyError, TypeError):  # a step count or the yardstick is missing
                    value = None
                out.append({"run": g["name"], "goal": text, "met": None if value is None else value <= limit,
                            "value": value, "limit": limit, "kind": "flowmap"})
    if goal_set == "round2":  # the 1-step ratio may not grow with training
        for stem, chain in trends(groups).items():
            if chain[0]["objective"] in JVP_FREE and all(g["yardstick"].get(1) for g in (chain[0], chain[-1])):
                short, long = chain[0]["yardstick"][1]["mean"], chain[-1]["yardstick"][1]["mean"]
                out.append({"run": chain[-1]["name"], "goal": f"1-step ratio at {chain[-1]['trained_images']} images "
                            f"<= at {chain[0]['trained_images']} ({short:.3f}x)", "met": long <= short, "value": long,
                            "kind": "flowmap"})
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
             "", "| objective | seeds | sampler CFG | " + " | ".join(f"{s}" for s in steps)
             + " | 1-step / FM best | 2-step / FM best |", "|---|---:|---|" + "---:|" * (len(steps) + 2)]
    for g in groups:
        lines.append(f"| {g['name']} | {len(g['seeds'])} | {cfg_label(g, summary['runs'], steps)} | "
                     + " | ".join(cell(g["fd"].get(s)) for s in steps) + " | "
                     + " | ".join(cell(g["yardstick"].get(k), 2) for k in YARDSTICK_STEPS) + " |")
    lines += ["", "The last two columns are METHOD.md section 8's yardstick: FD at 1 (2) steps over the lowest FD "
                  "flow matching reaches at any step count (and CFG scale, where it was swept), per seed, at the "
                  "same number of trained images. Sampler CFG: the scale each row was sampled at; one value per "
                  "step count (in the order of the columns) where it was picked per step count on the train split, "
                  "and 'w in target' for a model trained with guidance in its target, sampled at cfg 1 with one "
                  "forward per step."]
    chains = trends(groups)
    if chains:
        lines += ["", "## The yardstick against training length", "",
                  "| configuration | " + " | ".join(f"{k}-step / FM best at {g['trained_images']} images"
                                                   for g in next(iter(chains.values())) for k in YARDSTICK_STEPS) + " |",
                  "|---|" + "---:|" * (len(YARDSTICK_STEPS) * len(next(iter(chains.values()))))]
        for stem, chain in chains.items():
            lines.append(f"| {stem} | " + " | ".join(cell(g["yardstick"].get(k), 2) for g in chain
                                                     for k in YARDSTICK_STEPS) + " |")
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
    # guidance (in the sampler or the target) buys FD and class accuracy with diversity: recall shows the price
    if any(g["recall"].get(s) for g in groups for s in steps):
        lines += ["", f"## Recall (k-NN, classifier features: the share of {summary['split']} images inside the "
                      "samples' k-NN balls)", "",
                  "| objective | " + " | ".join(map(str, steps)) + " |", "|---|" + "---:|" * len(steps)]
        for g in groups:
            lines.append(f"| {g['name']} | " + " | ".join(cell(g["recall"].get(s), 3) for s in steps) + " |")
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
    flowmap_title = ("Flow-map goals (issue 23, seed means, against the CFG-tuned FM best)"
                     if summary.get("goal_set") == "round2" else "Flow-map goals (issue 12, seed means)")
    for kind, title in (("scfm", "Goals (METHOD.md section 6)"), ("flowmap", flowmap_title)):
        judged = [g for g in summary["goals"] if g["kind"] == kind]
        if not judged:
            continue
        lines += ["", f"## {title}", ""]
        for g in judged:
            if g["met"] is not None:
                goal = (g["goal"].replace("SCFM", g["run"], 1) if kind == "scfm"
                        else f"{g['run']}: {g['goal']} (measured {g['value']:.3f}x"
                        + (f", by {g['value'] - g['limit']:.3f}" if not g["met"] and "limit" in g else "") + ")")
                lines.append(f"- {'met' if g['met'] else 'MISSED'}: {goal}")
        unjudged = sum(g["met"] is None for g in judged)
        if unjudged:
            lines.append(f"- not judged: {unjudged} goal(s) whose run or step count is not on this page")
    if summary.get("notes"):
        lines += ["", summary["notes"].strip()]
    path.write_text("\n".join(lines) + "\n")


def cfg_label(group, runs, steps):
    """How a group was sampled: `1`, the per-step picks `3/3/2/...`, or the guidance in its target."""
    members = [r for r in runs if r["group"] == group["name"]]
    scales = [r["eval"].get("cfg", 1.0) for r in members]
    picks = {str(s): v for c in scales if isinstance(c, dict) for s, v in c.items()}
    trained = members[0]["eval"].get("target_guidance") or 1.0
    label = "/".join(f"{picks.get(str(s), 1.0):g}" for s in steps) if len(set(picks.values()) - {1.0}) else "1"
    return label + (f" (w {trained:g} in target)" if trained != 1.0 else "")


def plot_trend(path, summary):
    """The yardstick against images seen for every configuration trained at several lengths;
    False (no file) when there is none."""
    chains = trends(summary["groups"])
    if not chains:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for i, (stem, chain) in enumerate(chains.items()):
        for k, style in zip(YARDSTICK_STEPS, ("-", "--")):
            pts = [(g["trained_images"], g["yardstick"].get(k)) for g in chain if g["yardstick"].get(k)]
            ax.errorbar([p[0] for p in pts], [p[1]["mean"] for p in pts], yerr=[p[1]["std"] or 0 for p in pts],
                        marker="o", capsize=3, linestyle=style, color=f"C{i % 10}", label=f"{stem}, {k} step")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training images seen")
    ax.set_ylabel("FD / flow matching's best FD")
    ax.set_title("Few-step yardstick against training length")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


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
