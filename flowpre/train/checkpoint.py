"""Checkpoints that are complete or absent, and resume from the latest complete one.

Layout: RUN/checkpoints/step000000100/ holds DeepSpeed's files (module, optimizer and
scheduler state, partitioned by ZeRO stage), `flowpre_shared.pt` (EMAs, step, the
model config) and one `flowpre_rank00000.pt` per rank (that rank's RNG states and data
position). Everything is written under a temporary name `.tmp-step...` and the folder
is renamed only after every rank finished writing: a crash at any point leaves the
previous checkpoint untouched and the half-written one invisible to `resume=auto`. A write
that fails (a full disk, a permission lost) stops the run on every rank with a
CheckpointWriteError naming the file and the free space, after the half-written folder is
removed; the previous checkpoint is never touched before the new one is complete.
"""
import errno
import io
import json
import os
import re
import shutil
import signal
from pathlib import Path

import torch

from flowpre import strict_json
from flowpre.atomic import write_text

from .distributed import barrier, gather_objects
from .integrity import DamagedCheckpoint, check, manifest, newest_intact

FINAL = re.compile(r"^step(\d{9})$")
# Fault injection for tests: SIGKILL this process while writing the checkpoint of this step.
KILL_ENV = "FLOWPRE_FAULT_KILL_AT_CHECKPOINT"
# ... or make this step's checkpoint write fail half way with ENOSPC ("STEP" or "STEP:RANK")
WRITE_FAIL_ENV = "FLOWPRE_FAULT_WRITE_FAIL_AT_CHECKPOINT"


def checkpoints_root(run_dir):
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir):
    """[(step, path)] of complete checkpoints, oldest first."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = FINAL.match(p.name)
        if m and (p / "meta.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def resolve_resume(resume, run_dir, dist=None, verify=True):
    """`train.resume` -> a checkpoint folder or None. auto: the newest complete one whose files match
    their checksums (a damaged one is warned about and skipped); a path: that one, or an error naming
    the damaged file. Collective when `dist` is given (the ranks share the hashing)."""
    if resume in ("none", "", None):
        return None
    if resume == "auto":
        found = complete_checkpoints(run_dir)
        if not found or not verify:
            return found[-1][1] if found else None
        path = newest_intact(found, dist)
        if path is None:
            raise DamagedCheckpoint(f"train.resume=auto: every checkpoint under {checkpoints_root(run_dir)} is damaged "
                               "(see the warnings above); not starting over on top of them")
        return path
    path = Path(resume)
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"train.resume: {path} is not a complete flowpre checkpoint (no meta.json)")
    if verify:
        check(path, dist)
    return path


class CheckpointWriteError(RuntimeError):
    """A checkpoint that could not be written (disk full, permission lost); names the path and the
    free space, and says that the previous checkpoint is intact."""


def _free_space(folder):
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB free there"
    except OSError:
        return "free space unknown"


def _failed_write(e, path):
    """One line for a failed write: the file (from the OSError, or the one being written) and why."""
    where = getattr(e, "filename", None) or path
    why = getattr(e, "strerror", None) or (str(e).splitlines()[0] if str(e) else type(e).__name__)
    return f"{where}: {why}"


def _save(obj, path, step, rank):
    """torch.save; FLOWPRE_FAULT_WRITE_FAIL_AT_CHECKPOINT=STEP[:RANK] makes it fail half way into the
    file with ENOSPC, as a full disk does (tests)."""
    fault = os.environ.get(WRITE_FAIL_ENV, "")
    at, _, who = fault.partition(":")
    if at and int(at) == step and (not who or int(who) == rank):
        buf = io.BytesIO()
        torch.save(obj, buf)
        with open(path, "wb") as f:
            f.write(buf.getvalue()[: buf.tell() // 2])
        raise OSError(errno.ENOSPC, "No space left on device (injected by " + WRITE_FAIL_ENV + ")", str(path))
    torch.save(obj, path)


def _agree(error, tmp, dist, previous):
    """Collective: when any rank failed to write, every rank raises the same CheckpointWriteError
    (after rank 0 removed the half-written folder, so that it does not fill the disk further)."""
    errors = [e for e in gather_objects(error) if e]
    if not errors:
        return
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    kept = f"the previous checkpoint {previous} is intact" if previous else "there is no earlier checkpoint"
    raise CheckpointWriteError(f"checkpoint not written: {errors[0]} ({_free_space(tmp.parent)}); the half-written "
                               f"{tmp.name} was removed and {kept}. Free space (or move run.dir) and continue "
                               "with train.resume=auto")


def save_checkpoint(engine, run_dir, step, shared_state, rank_state, dist, meta, keep=2):
    root = checkpoints_root(run_dir)
    tag = f".tmp-step{step:09d}"
    tmp, final = root / tag, root / f"step{step:09d}"
    previous = (complete_checkpoints(run_dir) or [(0, None)])[-1][1]
    if dist.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    error = None
    try:
        engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    except (OSError, RuntimeError) as e:  # torch's writer reports a full disk as a RuntimeError
        error = _failed_write(e, tmp)
        barrier()  # the one DeepSpeed's other ranks wait in after their writes
    if error is None:
        ours = [(rank_state, tmp / f"flowpre_rank{dist.rank:05d}.pt")]
        ours += [(shared_state, tmp / "flowpre_shared.pt")] if dist.is_main else []
        for obj, path in ours:
            try:
                _save(obj, path, step, dist.rank)
            except (OSError, RuntimeError) as e:
                error = _failed_write(e, path)
                break
    if os.environ.get(KILL_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
    _agree(error, tmp, dist, previous)
    meta = {**meta, "files": manifest(tmp, dist)}  # every rank hashes a share of the files
    if dist.is_main:
        try:
            write_text(tmp / "meta.json", strict_json.dumps(meta, indent=1))
            if final.exists():  # the same step saved again after a resume
                shutil.rmtree(final)
            os.replace(tmp, final)
        except OSError as e:
            error = _failed_write(e, tmp / "meta.json")
    _agree(error, tmp, dist, previous)
    if dist.is_main:
        _prune(root, keep)
    barrier()
    return final


def _prune(root, keep):
    complete = sorted(p for p in root.iterdir() if FINAL.match(p.name))
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step*"):  # left by a crash; never complete
        shutil.rmtree(stale, ignore_errors=True)


def _describe(model):
    return f"DiT-{model.get('depth')}x{model.get('hidden')}x{model.get('heads')}/{model.get('patch')}"


def check_same_model(path, model_config, model_name):
    """Before DeepSpeed loads tensors into the wrong shapes: a ConfigError naming both models."""
    from flowpre.config import ConfigError
    from flowpre.models.dit import upgrade_config

    meta = json.loads((Path(path) / "meta.json").read_text())
    saved = meta.get("model")
    if saved is None:
        return
    saved, model_config = upgrade_config(saved), upgrade_config(model_config)
    if saved == model_config:
        return
    keys = [k for k in sorted(set(saved) | set(model_config)) if saved.get(k) != model_config.get(k)]
    differ = ", ".join(f"{k} {saved.get(k)} (checkpoint) vs {model_config.get(k)} (config)" for k in keys)
    if set(keys) <= {"sigma_scale", "jump_scale"}:  # same shapes, other time embedding (e.g. an auto default moved)
        raise ConfigError(f"train.resume: checkpoint {path} was trained with other time-embedding frequencies: "
                          f"{differ}; resume with " + " ".join(f"model.{k}={saved[k]:g}" for k in keys))
    ckpt_name = meta.get("model_name") or _describe(saved)
    raise ConfigError(f"train.resume: checkpoint {path} holds a {ckpt_name} model ({_describe(saved)}), but "
                      f"model.name={model_name} builds {_describe(model_config)}; they differ in {differ}. Resume "
                      f"with model.name={ckpt_name} (and the same objective), or start a new run.dir")


def load_checkpoint(engine, path, dist):
    """(meta, shared state, this rank's state). On another world size than the
    checkpoint's, the engine state is re-partitioned (reshard.py) and the rank state,
    which has no meaning there, is None."""
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    rank_state = None
    if meta["world_size"] != dist.world_size:
        from .reshard import load_other_world_size
        load_other_world_size(engine, path, dist, meta, engine.zero_optimization_stage())
    else:
        load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
        # flowpre's own files hold only tensors, numbers and strings: no unpickling of arbitrary objects
        rank_state = torch.load(path / f"flowpre_rank{dist.rank:05d}.pt", map_location="cpu", weights_only=True)
    shared = torch.load(path / "flowpre_shared.pt", map_location="cpu", weights_only=True)
    return meta, shared, rank_state


EMA_CHOICES = ("slow", "fast", "none")  # which weights a checkpoint gives out: an EMA, or the student


def student_state_dict(ckpt):
    """The student's full fp32 weights from a DeepSpeed checkpoint of any ZeRO stage."""
    meta = json.loads((Path(ckpt) / "meta.json").read_text())
    if meta["zero_stage"] == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        return get_fp32_state_dict_from_zero_checkpoint(str(Path(ckpt).parent), tag=Path(ckpt).name)
    # stages 0-2 keep full fp32 parameters on every rank (bf16 is autocast only)
    return torch.load(Path(ckpt) / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]


def checkpoint_weights(ckpt, ema="slow"):
    """(state dict, checkpoint meta, which) of one checkpoint folder: the slow or fast EMA, or
    the student (ema="none"); `which` names the set as the weights file records it."""
    if ema not in EMA_CHOICES:
        raise ValueError(f"--ema must be one of {EMA_CHOICES}, got {ema!r}")
    meta = json.loads((Path(ckpt) / "meta.json").read_text())
    if ema == "none":
        return student_state_dict(ckpt), meta, "student"
    shared = torch.load(Path(ckpt) / "flowpre_shared.pt", map_location="cpu", weights_only=True)
    return shared["ema"][ema], meta, f"ema_{ema}"
