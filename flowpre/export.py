"""`flowpre export`: a run's checkpoint to one weights file (its format: weights.py) or to a
model folder (model_folder.py: the weights, config.json, the training config, a sample
grid and a model card).

Any ZeRO stage's checkpoint, the slow or fast EMA or the student; the newest complete
checkpoint whose files verify unless one is named.
"""
from pathlib import Path

from flowpre.train.checkpoint import EMA_CHOICES, checkpoint_weights, complete_checkpoints, resolve_resume
from flowpre.weights import save_weights

FORMATS = ("file", "folder")
__all__ = ["EMA_CHOICES", "FORMATS", "export", "pick_checkpoint"]


def pick_checkpoint(run_dir, checkpoint=None, verify=True):
    """`checkpoint`, else the run's newest complete checkpoint that verifies."""
    if checkpoint is None:
        if not complete_checkpoints(run_dir):
            raise FileNotFoundError(f"no complete checkpoint under {Path(run_dir) / 'checkpoints'}")
        return resolve_resume("auto", run_dir, verify=verify)
    return resolve_resume(str(checkpoint), run_dir, verify=verify)


def export(run_dir=None, out="model.safetensors", ema="slow", checkpoint=None, verify=True, format="file",
           eval_file=None, license=None):
    """A run's checkpoint (`checkpoint`, else the newest complete one that verifies) to the
    weights file or model folder `out`; returns (path, step)."""
    if ema not in EMA_CHOICES:
        raise ValueError(f"--ema must be one of {EMA_CHOICES}, got {ema!r}")
    if format not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {format!r}")
    if format == "file" and (eval_file or license):
        raise ValueError("--eval and --license describe a model card: give --format folder")
    ckpt = pick_checkpoint(run_dir, checkpoint, verify)
    state, meta, which = checkpoint_weights(ckpt, ema)
    if format == "folder":
        from flowpre.model_folder import write_model_folder
        return write_model_folder(out, state, meta, which, run_dir, eval_file=eval_file, license=license), meta["step"]
    return save_weights(state, out, meta, which), meta["step"]
