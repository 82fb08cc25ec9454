"""Export a run's weights to one safetensors file, and load such a file back.

The file holds plain fp32 tensors and, in its metadata, the model config (and the
dataset's shape and class names), so `flowpre sample` needs nothing else; text models
record their frozen encoder's local path and max length, and need that folder too.
"""
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from flowpre.models.dit import DiT
from flowpre.train.checkpoint import complete_checkpoints, resolve_resume

EMA_CHOICES = ("slow", "fast", "none")


class WeightsError(ValueError):
    """An exported weights file that cannot be read; the message names the file."""


def student_state_dict(ckpt):
    """The student's full fp32 weights from a DeepSpeed checkpoint of any ZeRO stage."""
    meta = json.loads((ckpt / "meta.json").read_text())
    if meta["zero_stage"] == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    # stages 0-2 keep full fp32 parameters on every rank (bf16 is autocast only)
    return torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]


def export(run_dir=None, out="model.safetensors", ema="slow", checkpoint=None, verify=True):
    if ema not in EMA_CHOICES:
        raise ValueError(f"--ema must be one of {EMA_CHOICES}, got {ema!r}")
    if checkpoint is None:  # the newest complete checkpoint that verifies
        if not complete_checkpoints(run_dir):
            raise FileNotFoundError(f"no complete checkpoint under {Path(run_dir) / 'checkpoints'}")
        ckpt = resolve_resume("auto", run_dir, verify=verify)
    else:
        ckpt = resolve_resume(str(checkpoint), run_dir, verify=verify)
    meta = json.loads((ckpt / "meta.json").read_text())
    if ema == "none":
        state = student_state_dict(ckpt)
    else:
        shared = torch.load(ckpt / "flowpre_shared.pt", map_location="cpu", weights_only=True)
        state = shared["ema"][ema]
    tensors = {k: v.detach().float().contiguous() for k, v in state.items()}
    metadata = {"flowpre.model": json.dumps(meta["model"]), "flowpre.dataset": json.dumps(meta.get("dataset", {})),
                "flowpre.objective": meta.get("objective", ""), "flowpre.step": str(meta["step"]),
                "flowpre.weights": "student" if ema == "none" else f"ema_{ema}",
                "flowpre.text_encoder": json.dumps(meta.get("text_encoder"))}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=metadata)
    return Path(out), meta["step"]


def read_metadata(path, source=""):
    where = f"{source}: " if source else ""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{where}weights file {path} not found")
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
            "text_encoder": json.loads(meta.get("flowpre.text_encoder", "null"))}  # text models: path, max_length


def load_model(path, device="cpu", kernels="auto", source=""):
    """(DiT in eval mode, metadata) from an exported file; `source` (a config key, a flag) prefixes errors."""
    meta = read_metadata(path, source)
    model = DiT(**meta["model"], kernels=kernels)
    try:
        model.load_state_dict(load_file(str(path)))
    except (SafetensorError, OSError, RuntimeError) as e:  # truncated data, or tensors unlike the metadata
        where = f"{source}: " if source else ""
        raise WeightsError(f"{where}{path}: cannot load its tensors ({str(e).splitlines()[0]}); "
                           "the file is damaged or was not written by flowpre export") from None
    return model.to(device).eval(), meta
