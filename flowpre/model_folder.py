"""A model folder as the Hub lays one out: `flowpre export --run RUN --out DIR --format folder`.

    DIR/model.safetensors     the weights: the same file `flowpre export` writes (metadata included),
                              so the folder and the file load the same way (weights.weights_file)
    DIR/config.json           model, dataset, objective, step, time-embedding scales, text encoder
    DIR/training_config.yaml  the run's resolved training config
    DIR/samples.png           a grid at 1, 2 and 4 steps (one column per class or prompt, seed 0)
    DIR/README.md             the model card (model_card.py)

Not diffusers' ModelMixin/ConfigMixin: from_pretrained/save_pretrained would make diffusers
a hard dependency (it is optional, for VAEs only), ask the DiT to register every constructor
argument with its config decorator, and still know nothing of what sampling needs (one or two
time inputs, the step-size level, the null condition, the text encoder, the VAE), which the
weights' metadata carries. config.json is written from that metadata for people and the Hub;
loading reads the weights file, so the folder cannot disagree with itself.

The folder is written under a temporary name beside DIR and renamed at the end: an
interrupted export leaves DIR as it was. An existing DIR is replaced only when it is a model
folder (holds model.safetensors) or empty: anything else is refused, never overwritten.
"""
import json
import os
import shutil
from pathlib import Path

import torch

from flowpre import __version__, strict_json
from flowpre.weights import WEIGHTS_NAME, WeightsError, save_weights

CONFIG_NAME, TRAINING_CONFIG, SAMPLES, CARD = "config.json", "training_config.yaml", "samples.png", "README.md"
GRID_STEPS = (1, 2, 4)
FORMAT_VERSION = 1


def folder_config(meta, which):
    """config.json: what the weights' metadata says, in one readable object."""
    from flowpre.models.dit import upgrade_config

    model = upgrade_config(meta["model"])
    return {"library_name": "flowpre", "flowpre_version": __version__, "format": FORMAT_VERSION,
            "weights": WEIGHTS_NAME, "weights_set": which, "step": meta["step"],
            "objective": meta.get("objective", ""), "conditioning": "text" if model.get("text_dim") else "class",
            "time_inputs": model["time_inputs"],
            "time_embedding": {"sigma_scale": model["sigma_scale"],
                               **({"jump_scale": model["jump_scale"]} if model["time_inputs"] == 2 else {})},
            "model": model, "dataset": meta.get("dataset", {}), "text_encoder": meta.get("text_encoder")}


def read_eval(path, meta):
    """A `flowpre eval --out` JSON, checked to be of this model."""
    from flowpre.models.dit import upgrade_config

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--eval: {path} not found")
    try:
        evaluation = json.loads(path.read_text())
    except ValueError as e:
        raise WeightsError(f"--eval: {path} is not JSON ({e})") from None
    if not isinstance(evaluation, dict) or not isinstance(evaluation.get("results"), dict) or not evaluation["results"]:
        raise WeightsError(f"--eval: {path} has no 'results': not a `flowpre eval --out` file")
    if "model" in evaluation and upgrade_config(evaluation["model"]) != upgrade_config(meta["model"]):
        raise WeightsError(f"--eval: {path} evaluated another architecture than this checkpoint's")
    if evaluation.get("model_step") not in (None, meta["step"]):
        raise WeightsError(f"--eval: {path} evaluated the weights of step {evaluation['model_step']}, "
                           f"the export is of step {meta['step']}")
    return evaluation


def _grid_columns(pipe, run_config):
    """(conditions, column labels) of the card's sample grid."""
    from flowpre.images import class_columns

    if not pipe.model.text_dim:
        ids, names = class_columns(pipe.model.num_classes, pipe.class_names)
        return ids, names
    prompts = list(run_config.get("sample", {}).get("prompts") or [])
    if not prompts:
        from types import SimpleNamespace

        from flowpre.data.pipeline import resolve_shards
        from flowpre.train.loop import sample_prompts
        try:
            shards = resolve_shards(run_config["data"]["shards"])
            prompts = sample_prompts(SimpleNamespace(sample=SimpleNamespace(prompts=[])), shards)
        except (OSError, ValueError, KeyError):
            prompts = []
    if not prompts:
        raise WeightsError("export --format folder: no prompts for the sample grid: the run config has no "
                           "sample.prompts and its shards' captions cannot be read")
    return prompts, prompts


def write_sample_grid(weights, out, run_config, name):
    from flowpre.images import save_labeled_grid, steps_label
    from flowpre.pipeline import load
    from flowpre.sampling import seeded_noise

    pipe = load(weights, dtype=torch.float32, source=name)
    conditions, labels = _grid_columns(pipe, run_config)
    m = pipe.model
    noise = seeded_noise((len(conditions), m.in_channels, m.image_size, m.image_size), 0, pipe.device)
    sample = run_config.get("sample", {})
    cfg, shift = float(sample.get("cfg_scale", 1.0)), float(sample.get("shift", 1.0))
    rows = [pipe.denoise(noise, conditions, s, cfg, shift) for s in GRID_STEPS]
    save_labeled_grid(out, rows, labels, [steps_label(s) for s in GRID_STEPS],
                      title=f"{name} (step {pipe.config['step']}): cfg {cfg:g}, shift {shift:g}, seed 0")


def _check_destination(out):
    if out.is_file() or out.is_symlink():
        raise WeightsError(f"--out {out} is a file: a model folder needs a folder path (or use --format file)")
    if out.is_dir() and any(out.iterdir()) and not (out / WEIGHTS_NAME).is_file():
        raise WeightsError(f"--out {out} is a folder that is not a flowpre model folder (no {WEIGHTS_NAME}); "
                           "not overwriting it: give a new or empty folder")


def write_model_folder(out, state, meta, which, run_dir, eval_file=None, license=None):
    """The folder `out` (see the module docstring) for a checkpoint's `state` and `meta`."""
    from flowpre.model_card import model_card, read_metrics

    out = Path(out).expanduser().absolute()
    _check_destination(out)
    evaluation = read_eval(eval_file, meta) if eval_file else None  # before any heavy work
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"--run: {run_dir} has no config.yaml (the resolved training config)")
    import yaml

    run_config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_weights(state, tmp / WEIGHTS_NAME, meta, which)
        (tmp / CONFIG_NAME).write_text(strict_json.dumps(folder_config(meta, which), indent=2) + "\n")
        shutil.copyfile(run_dir / "config.yaml", tmp / TRAINING_CONFIG)
        write_sample_grid(tmp / WEIGHTS_NAME, tmp / SAMPLES, run_config, out.name)
        params = sum(v.numel() for v in state.values())
        card = model_card(out.name, meta, which, params, run_config, read_metrics(run_dir), evaluation, license,
                          sample_grid=SAMPLES)
        (tmp / CARD).write_text(str(card) + "\n")
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace(tmp, out):
    """Move the finished folder into place; an older model folder there goes only once the new one is in."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
