"""Resume on another world size: W ranks wrote the checkpoint, W' ranks continue.

What carries over, and how:
- Model, AdamW state, LR scheduler and DeepSpeed's step, ZeRO stages 1-3: DeepSpeed's
  universal checkpoint. Rank 0 converts the checkpoint with
  `deepspeed.checkpoint.ds_to_universal` (into a hidden folder beside it, deleted once
  every rank has loaded) and every rank loads it with `load_universal`, which
  re-partitions the fp32 weights and both Adam moments for the new world size. Checked
  on CPU with gloo: the state after a 2 -> 1 load equals the 2-rank state exactly.
- ZeRO-0: nothing is partitioned (the optimizer state is whole in the model-states file),
  so DeepSpeed's ordinary load works on any world size.
- Both EMAs are saved in full and every rank keeps what it needs (all of them, or its
  ZeRO-3 partition): nothing to do here.
- The data position is the global sample count; see `data_position`.
- Per-rank random generators cannot be carried over (there are W of them and W' ranks
  need one each): each rank reseeds from (seed, rank, step). This is why a world-size
  change is not bitwise equal to an uninterrupted run, while the samples seen are.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from flowpre.config import ConfigError

from .distributed import barrier


def global_samples(meta, ckpt):
    """Samples of the global stream consumed at this checkpoint (older checkpoints lack
    the count; every rank consumed the same number of micro batches)."""
    if "samples" in meta:
        return meta["samples"]
    rank0 = torch.load(Path(ckpt) / "flowpre_rank00000.pt", map_location="cpu", weights_only=False)
    return rank0["batches"] * meta["micro_batch"] * meta["world_size"]


def data_position(ckpt, global_batch, world_size, micro_batch):
    """None when this run splits batches as the checkpoint's did (the per-rank state then
    resumes exactly); else this run's per-rank batch index at the checkpoint's global
    sample count. Checked before anything is loaded or converted: a run that cannot
    continue fails in seconds, naming the key."""
    meta = json.loads((Path(ckpt) / "meta.json").read_text())
    if meta["world_size"] == world_size and meta["micro_batch"] == micro_batch:
        return None
    if meta.get("global_batch", global_batch) != global_batch:
        raise ConfigError(f"train.batch_size: checkpoint {ckpt} trained with a global batch of "
                          f"{meta['global_batch']}, this run sets {global_batch}; keep it (the micro batch and "
                          f"train.grad_accum adapt to the world size)")
    samples, per_batch = global_samples(meta, ckpt), world_size * micro_batch
    if samples % per_batch:
        raise ConfigError(f"checkpoint {ckpt} stopped after {samples} samples, which is not a multiple of this "
                          f"run's {world_size} ranks x micro batch {micro_batch}: set train.batch_size and "
                          f"train.grad_accum so that the micro batch divides the checkpoint's position")
    return samples // per_batch


def reseed(seed, rank, step):
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def _convert(path, out):
    """ds_to_universal in a subprocess (it runs its own worker pools)."""
    shutil.rmtree(out.parent, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path),
           "--output_folder", str(out), "--num_extract_workers", "1", "--num_merge_workers", "1",
           "--inject_missing_state"]  # flowpre's client state has no universal_checkpoint_info
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if r.returncode != 0:
        return f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return None


def load_other_world_size(engine, path, dist, meta, zero_stage):
    """Load a checkpoint written by meta['world_size'] ranks into this engine."""
    path = Path(path)
    if meta["zero_stage"] != zero_stage:
        raise RuntimeError(f"checkpoint {path} was written at ZeRO {meta['zero_stage']} by {meta['world_size']} "
                           f"ranks; this run has deepspeed.zero_stage={zero_stage} and {dist.world_size} ranks. "
                           f"Change one at a time: keep deepspeed.zero_stage={meta['zero_stage']}")
    if zero_stage == 0:
        load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
        return
    out = path.parent / f".universal-{path.name}" / path.name
    error = _convert(path, out) if dist.is_main else None
    if torch.distributed.is_initialized():
        box = [error]
        torch.distributed.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise RuntimeError(f"checkpoint {path}: converting to a universal checkpoint for {dist.world_size} ranks "
                           f"failed: {error}")
    config = engine._config  # load_universal is read from the config at load time only
    config.load_universal_checkpoint = True
    try:
        load_path, _ = engine.load_checkpoint(str(out.parent), tag=path.name)
    finally:
        config.load_universal_checkpoint = False
    barrier()
    if dist.is_main:
        shutil.rmtree(out.parent, ignore_errors=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the universal checkpoint made from {path}")
