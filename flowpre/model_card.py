"""A model folder's README.md: Hub metadata (YAML front matter) and what a reader of the card
needs to trust the model: what it was trained on and how, on what hardware at what
throughput, how good it is at 1, 2, 4 ... steps, and the five lines that use it.

The front matter is built with huggingface_hub's ModelCardData (license, library_name,
pipeline_tag, tags, datasets, metrics and, with an eval file, a model-index of the scores),
so the card is what the Hub parses; nothing here talks to the network.
Class-conditional models carry pipeline_tag unconditional-image-generation: the Hub has no
class-conditional task, and that is the task its DiT checkpoints are listed under.
"""
import json
import statistics
from pathlib import Path

# What flowpre knows about its built-in sources: the license their images come under (the
# card's default license, which --license overrides) and their Hub dataset id.
SOURCES = {
    "fashion-mnist": {"license": "mit", "hub": "zalando-datasets/fashion_mnist",
                      "about": "Fashion-MNIST (Zalando Research): 28x28 grayscale photos of clothing, 10 classes"},
    "digits": {"license": "other", "about": "scikit-learn's digits (UCI optical digits): 8x8 grayscale, 10 classes"},
    "twemoji": {"license": "cc-by-4.0", "about": "Twemoji (Twitter, graphics CC-BY 4.0): 72x72 color emoji"},
    "twemoji-subgroups": {"license": "cc-by-4.0",
                          "about": "Twemoji (Twitter, graphics CC-BY 4.0), labelled by Unicode emoji subgroup"},
}
OBJECTIVES = {
    "fm": "flow matching (velocity regression on the straight noise-data path)",
    "scfm": "flow matching with velocity self-distillation (SCFM): few-step jumps taught by the fast EMA",
    "shortcut": "Shortcut Models: flow matching plus step-size-conditioned self-consistency",
    "meanflow": "MeanFlow: the average velocity of a jump, its target through a JVP",
    "meanflow_fd": "MeanFlow with a finite-difference target (no JVP)",
}
NOT_SCORES = ("seconds", "nonfinite_samples")


def read_metrics(run_dir):
    """The logged records of metrics.jsonl (an unreadable line is left out: a card is a summary)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def training_summary(meta, records, train_cfg):
    """Rows (what, value) of the training table."""
    samples = meta.get("samples") or meta["step"] * train_cfg.get("batch_size", 0)
    speeds = [r["samples_per_s"] for r in records if isinstance(r.get("samples_per_s"), (int, float))]
    mfus = [r["mfu"] for r in records if isinstance(r.get("mfu"), (int, float))]
    world = meta.get("world_size")
    device = meta.get("device")
    hardware = f"{world} x {device}" if world and device else \
        (f"{world} rank(s), device not recorded" if world else "not recorded")
    rows = [("steps", f"{meta['step']:,}"), ("images seen", f"{samples:,}"),
            ("global batch", str(meta.get("global_batch", train_cfg.get("batch_size", "?")))),
            ("learning rate", f"{train_cfg.get('lr', '?')}"), ("hardware", hardware),
            ("ZeRO stage", str(meta.get("zero_stage", "?")))]
    if speeds:
        rows.append(("throughput", f"{statistics.median(speeds):,.1f} img/s (median of {len(speeds)} logged steps)"))
    if mfus:
        rows.append(("MFU", f"{statistics.median(mfus):.1%} (median)"))
    if records and isinstance(records[-1].get("loss"), (int, float)):
        rows.append(("final loss", f"{records[-1]['loss']:.4f} (step {records[-1].get('step', '?')})"))
    return rows


def eval_columns(evaluation):
    first = next(iter(evaluation["results"].values()))
    return [k for k, v in first.items() if k not in NOT_SCORES and isinstance(v, (int, float))]


def eval_table(evaluation):
    columns = eval_columns(evaluation)
    lines = ["| steps | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for steps, scores in evaluation["results"].items():
        lines.append(f"| {steps} | " + " | ".join(f"{scores[c]:.4f}" for c in columns) + " |")
    return "\n".join(lines)


def card_data(meta, evaluation, license, name):
    from huggingface_hub import EvalResult, ModelCardData

    dataset = meta.get("dataset") or {}
    facts = SOURCES.get(dataset.get("name"), {})
    text = bool(meta["model"].get("text_dim"))
    task = "text-to-image" if text else "unconditional-image-generation"
    tags = ["flowpre", "flow-matching", "diffusion-transformer", "dit", "few-step",
            "text-to-image" if text else "class-conditional-image-generation", meta.get("objective") or "fm"]
    if dataset.get("latent"):
        tags.append("latent-diffusion")
    results = []
    if evaluation:
        for steps, scores in evaluation["results"].items():
            for column in eval_columns(evaluation):
                results.append(EvalResult(
                    task_type=task, dataset_type=facts.get("hub") or evaluation.get("reference") or "unknown",
                    dataset_name=evaluation.get("reference") or dataset.get("name") or "unknown",
                    dataset_split=evaluation.get("reference_split"), metric_type=column,
                    metric_name=f"{column} at {steps} step{'s' if steps != '1' else ''}",
                    metric_value=round(float(scores[column]), 6), metric_config=f"steps={steps}"))
    return ModelCardData(
        license=license or facts.get("license") or "other", library_name="flowpre", pipeline_tag=task, tags=tags,
        datasets=[facts["hub"]] if facts.get("hub") else None, model_name=name,
        metrics=sorted({r.metric_type for r in results}) or None, eval_results=results or None)


def model_card(name, meta, which, params, run_config, records, evaluation=None, license=None, sample_grid=None):
    """The README.md text: front matter from card_data, then the body."""
    from huggingface_hub import ModelCard

    data = card_data(meta, evaluation, license, name)
    dataset = meta.get("dataset") or {}
    m, train_cfg = meta["model"], run_config.get("train", {})
    facts = SOURCES.get(dataset.get("name"), {})
    text = bool(m.get("text_dim"))
    shape = f"{dataset.get('channels', m['in_channels'])}x{dataset.get('height', m['image_size'])}x" \
            f"{dataset.get('width', m['image_size'])}"
    latent = dataset.get("latent")
    names = dataset.get("class_names") or []
    data_lines = [f"- source: {facts.get('about') or dataset.get('name') or 'not recorded'}",
                  f"- shards: `{run_config.get('data', {}).get('shards', '?')}`",
                  f"- model input: {shape}" + (f" latents of {latent['vae']} (pixels "
                                               f"{dataset['pixel']['channels']}x{dataset['pixel']['height']}x"
                                               f"{dataset['pixel']['width']})" if latent else " pixels")]
    if text:
        enc = meta.get("text_encoder") or {}
        data_lines.append(f"- conditioning: captions through the frozen text encoder `{enc.get('path')}` "
                          f"({enc.get('kind')}, {enc.get('dim')}-d, {enc.get('max_length')} tokens)")
    else:
        data_lines.append(f"- conditioning: {m['num_classes']} classes" + (f": {', '.join(names)}" if names else ""))
    objective = meta.get("objective") or "fm"
    objective_cfg = run_config.get("objective", {})
    time_inputs = ("two times (where each jump starts and ends)" if m.get("time_inputs") == 2 else
                   "a step-size level" if m.get("step_levels") else "one time")
    arch = (f"DiT, depth {m['depth']}, hidden {m['hidden']}, {m['heads']} heads, patch {m['patch']}, "
            f"{params / 1e6:.1f}M parameters; takes {time_inputs}")
    labels = f"pipe.get_label_ids({names[:2]!r})" if names and not text else "[0, 1]"
    call = ('pipe(prompt="a red heart", num_inference_steps=1, generator=torch.Generator().manual_seed(0))'
            if text else f"pipe(class_labels={labels}, num_inference_steps=1, "
                         "generator=torch.Generator().manual_seed(0))")
    body = [f"# {name}", "",
            f"A few-step flow-matching {'text-to-image' if text else 'class-conditional'} image model trained "
            f"from scratch with flowpre ({objective}: {OBJECTIVES.get(objective, objective)}).",
            "", "## Use", "", "```python", "import flowpre, torch", "", 'pipe = flowpre.load("PATH_TO_THIS_FOLDER")',
            f"images = {call}.images", 'images[0].save("sample.png")', "```", "",
            "or `flowpre sample --weights PATH_TO_THIS_FOLDER --steps 1,2,4`.", ""]
    if sample_grid:
        body += ["## Samples", "", f"![samples at 1, 2 and 4 steps]({sample_grid})", "",
                 "One row per step count, from the same noise (seed 0).", ""]
    body += ["## Training data", "", *data_lines, "", "## Training", "",
             "| | |", "|---|---|", f"| model | {arch} |", f"| objective | {objective}: "
             f"{OBJECTIVES.get(objective, objective)} |",
             *(f"| {what} | {value} |" for what, value in training_summary(meta, records, train_cfg)),
             f"| weights | {which} |", "",
             "Objective settings:", "", "```yaml",
             *(f"{k}: {json.dumps(v)}" for k, v in objective_cfg.items()), "```", "",
             "The full resolved training config is `training_config.yaml`.", ""]
    body += ["## Evaluation", ""]
    if evaluation:
        body += [f"`flowpre eval` with {evaluation.get('num_samples')} samples per step count against "
                 f"{evaluation.get('reference')} ({evaluation.get('reference_split')} split), seed "
                 f"{evaluation.get('seed')}, guidance {evaluation.get('cfg')}:", "", eval_table(evaluation), ""]
    else:
        body += ["Not evaluated when this folder was written "
                 "(`flowpre export --format folder --eval FILE` adds a `flowpre eval` table).", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))
