"""Process-group set-up: one place that knows about ranks, devices and launchers.

torchrun and the deepspeed launcher export RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR
and MASTER_PORT; SLURM exports SLURM_PROCID and friends. With none of them, flowpre
makes a world of one so the same code path (DeepSpeed included) runs in one process.
The global rank picks data shards and seeds; the local rank picks the GPU.
"""
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STALE_BUILD_LOCK_S = 900  # DeepSpeed's CPU op builds in 1-2 minutes; a lock this old has no builder


def remove_stale_build_locks(root=None, stale_after_s=STALE_BUILD_LOCK_S):
    """torch's extension builder (DeepSpeed's JIT ops) waits, silently and forever, on the
    lock file of a build that was killed (Ctrl-C during a first run's build): every later
    run would hang at start-up. Such locks are removed with a warning naming the file."""
    if root is None:
        from torch.utils.cpp_extension import get_default_build_root

        root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    removed = []
    # TORCH_EXTENSIONS_DIR/<op>/lock, or <default root>/py311_cpu/<op>/lock
    for lock in [*Path(root).glob("*/lock"), *Path(root).glob("*/*/lock")]:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:  # another rank removed it first
            continue
        if age > stale_after_s:
            warnings.warn(f"removing {lock}: a JIT build lock left {age / 60:.0f} min ago by a build that "
                          "was killed; torch would wait on it forever")
            lock.unlink(missing_ok=True)
            removed.append(lock)
    return removed


def prepare_environment():
    """Fill in the launcher variables when missing; must run before importing deepspeed."""
    remove_stale_build_locks()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        # srun with one task per GPU and no torchrun in between
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
    os.environ.setdefault("LOCAL_RANK", "0")


def init_distributed() -> Dist:
    prepare_environment()
    import deepspeed

    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return Dist(rank, local_rank, world, device)


def barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_sum(t):
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t)
    return t


def broadcast_from_main(obj):
    """Rank 0's `obj` (picklable) on every rank: a decision only rank 0 can make, such as whether
    the run folder may be used, reaches all ranks, so they fail or go on together."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj):
    """Every rank's `obj`, in rank order, on every rank."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out
