"""Process-group set-up: one place that knows about ranks, devices and launchers.

torchrun and the deepspeed launcher export RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR
and MASTER_PORT; SLURM exports SLURM_PROCID and friends. With none of them, flowpre
makes a world of one so the same code path (DeepSpeed included) runs in one process.
The global rank picks data shards and seeds; the local rank picks the GPU.
"""
import os
import socket
from dataclasses import dataclass

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


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_environment():
    """Fill in the launcher variables when missing; must run before importing deepspeed."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        # srun with one task per GPU and no torchrun in between
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
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


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...]: small picklable objects only."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        out = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, obj)
        return out
    return [obj]
