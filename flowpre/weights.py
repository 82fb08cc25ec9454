"""The exported weights file, in one place for everything that writes or reads it.

One safetensors file of plain fp32 tensors whose metadata holds the model config (and the
dataset's shape and class names), so `flowpre sample` needs nothing else; text models
record their frozen encoder's local path and max length, and need that folder too.
`target_guidance` is the CFG scale a model was trained with inside its target
(objective.guidance_scale; 1 = none): such a model samples guided at sampler cfg 1, one
forward per step, and a sampler cfg above 1 guides it a second time.
`flowpre export` writes it from a checkpoint (export.py); sampling, evaluation and
training (`model.init`, `objective.teacher`) read it back here.

A model folder (`flowpre export --format folder`, model_folder.py) holds that same file as
WEIGHTS_NAME beside its config.json and model card, so every reader takes either: the
folder is resolved to its weights file here, and nothing else needs to know the layout.
"""
import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from flowpre.atomic import atomic_path
from flowpre.strict_json import dumps
from flowpre.models.dit import DiT


WEIGHTS_NAME = "model.safetensors"  # the weights file inside a model folder (the Hub's usual name)


class WeightsError(ValueError):
    """An exported weights file that cannot be read; the message names the file."""


def weights_file(path, source=""):
    """The weights file of `path`: the file itself, or a model folder's WEIGHTS_NAME."""
    where = f"{source}: " if source else ""
    path = Path(path).expanduser()
    if path.is_dir():
        inside = path / WEIGHTS_NAME
        if not inside.is_file():
            raise WeightsError(f"{where}{path} is a folder without {WEIGHTS_NAME}: not a flowpre model folder "
                               "(flowpre export --format folder writes one)")
        return inside
    if not path.is_file():
        raise FileNotFoundError(f"{where}weights file {path} not found")
    return path


def save_weights(state, out, meta, weights):
    """Write `state` (a model state dict) to `out` with the checkpoint's `meta` (model, dataset,
    objective, step, text encoder); `weights` says which set: "student", "ema_slow", "ema_fast"."""
    tensors = {k: v.detach().float().contiguous() for k, v in state.items()}
    metadata = {"flowpre.model": dumps(meta["model"]), "flowpre.dataset": dumps(meta.get("dataset", {})),
                "flowpre.objective": meta.get("objective", ""), "flowpre.step": str(meta["step"]),
                "flowpre.weights": weights, "flowpre.text_encoder": dumps(meta.get("text_encoder")),
                "flowpre.target_guidance": str(float(meta.get("target_guidance", 1.0)))}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:  # a failed write leaves an earlier export at `out` intact
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(out)


def read_metadata(path, source=""):
    where = f"{source}: " if source else ""
    path = weights_file(path, source)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"{where}{path} is not a readable .safetensors file ({e}); "
                           "is it truncated or not a flowpre export?") from None
    if "flowpre.model" not in meta:
        raise WeightsError(f"{where}{path} is not a flowpre export (no 'flowpre.model' metadata)")
    return {"model": json.loads(meta["flowpre.model"]), "dataset": json.loads(meta.get("flowpre.dataset", "{}")),
            "step": int(meta.get("flowpre.step", 0)), "weights": meta.get("flowpre.weights", ""),
            "objective": meta.get("flowpre.objective", ""),
            "target_guidance": float(meta.get("flowpre.target_guidance", "1.0")),  # files before the key: none
            "text_encoder": json.loads(meta.get("flowpre.text_encoder", "null"))}  # text models: path, max_length


def load_model(path, device="cpu", kernels="auto", source=""):
    """(DiT in eval mode, metadata) from an exported file or model folder; `source` (a config key,
    a flag) prefixes errors."""
    path = weights_file(path, source)
    meta = read_metadata(path, source)
    model = DiT(**meta["model"], kernels=kernels)
    try:
        model.load_state_dict(load_file(str(path)))
    except (SafetensorError, OSError, RuntimeError) as e:  # truncated data, or tensors unlike the metadata
        where = f"{source}: " if source else ""
        raise WeightsError(f"{where}{path}: cannot load its tensors ({str(e).splitlines()[0]}); "
                           "the file is damaged or was not written by flowpre export") from None
    return model.to(device).eval(), meta
