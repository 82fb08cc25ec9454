"""`flowpre export`: a run's checkpoint to one weights file (its format: weights.py).

Any ZeRO stage's checkpoint, the slow or fast EMA or the student; the newest complete
checkpoint whose files verify unless one is named.
"""
import json
from pathlib import Path

import torch

from flowpre.train.checkpoint import complete_checkpoints, resolve_resume
from flowpre.weights import save_weights

EMA_CHOICES = ("slow", "fast", "none")


def student_state_dict(ckpt):
    """The student's full fp32 weights from a DeepSpeed checkpoint of any ZeRO stage."""
    meta = json.loads((ckpt / "meta.json").read_text())
    if meta["zero_stage"] == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    # stages 0-2 keep full fp32 parameters on every rank (bf16 is autocast only)
    return torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]


def export(run_dir=None, out="model.safetensors", ema="slow", checkpoint=None, verify=True):
    """A run's checkpoint (`checkpoint`, else the newest complete one that verifies) to the
    weights file `out`; returns (path, step)."""
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
    return save_weights(state, out, meta, "student" if ema == "none" else f"ema_{ema}"), meta["step"]
