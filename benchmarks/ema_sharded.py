"""Replicated vs ZeRO-3-sharded dual EMA on R ranks: bytes per rank, update time, forward
time (one SCFM-style no-grad forward of an EMA), full state_dict gather, and the largest
difference between the two forwards.

    torchrun --nproc_per_node 2 benchmarks/ema_sharded.py --model DiT-6x192x3/4 --out results.json

The student is a ZeRO-3 partitioned module (deepspeed.zero.Init), as under the engine.
"""
import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone

import torch

from flowpre import strict_json
from flowpre.models.dit import build_dit
from flowpre.train.distributed import barrier, init_distributed
from flowpre.train.ema import DualEma


def timed(fn, repeat):
    times = []
    for _ in range(repeat):
        torch.distributed.barrier()
        t = time.perf_counter()
        fn()
        torch.distributed.barrier()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="DiT-6x192x3/4")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import deepspeed
    dist = init_distributed()
    torch.manual_seed(0)
    student = build_dit(args.model, 1, 28, 10, kernels="torch")
    emas = {"replicated": DualEma(student, 0.9, 0.99), "sharded": DualEma(student, 0.9, 0.99, sharded=True)}
    deepspeed.zero.Init(module=student, config_dict_or_path={"train_batch_size": dist.world_size,
                                                             "train_micro_batch_size_per_gpu": 1,
                                                             "zero_optimization": {"stage": 3}})
    g = torch.Generator().manual_seed(1)
    x, sigma = torch.randn(args.batch, 1, 28, 28, generator=g), torch.rand(args.batch, generator=g)
    cond = torch.randint(0, 10, (args.batch,), generator=g)
    params = sum(p.ds_numel for p in student.parameters())
    result, outputs = {}, {}
    for name, ema in emas.items():
        if name == "replicated":  # the gathered update that ZeRO-3 needed before
            update = lambda: _gathered_update(ema, student)  # noqa: E731
        else:
            update = lambda: ema.update(student, 1, zero3=True)  # noqa: E731
        with torch.no_grad():
            outputs[name] = ema.slow(x, sigma, cond)
        result[name] = {
            "ema_bytes_per_rank": ema.local_bytes(),
            "update_s": timed(update, args.repeat),
            "forward_s": timed(lambda: ema.slow(x, sigma, cond), args.repeat),
            "state_dict_s": timed(ema.state_dict, 2),
        }
    result["max_forward_diff"] = float((outputs["sharded"] - outputs["replicated"]).abs().max())
    result.update(model=args.model, params=params, ranks=dist.world_size, batch=args.batch, device=str(dist.device),
                  host=platform.node(), cpu_threads=torch.get_num_threads(),
                  date=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    if dist.is_main:
        print(json.dumps(result, indent=1))
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                f.write(strict_json.dumps(result, indent=1) + "\n")
    barrier()


@torch.no_grad()
def _gathered_update(ema, student):
    """The replicated EMA's update under ZeRO-3: gather each top-level child, lerp."""
    import deepspeed
    targets = {k: dict(net.named_parameters()) for k, net in ema.nets.items()}
    for prefix, child in student.named_children():
        named = list(child.named_parameters())
        if not named:
            continue
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            for key, decay in ema.decays.items():
                dst = [targets[key][f"{prefix}.{n}"] for n, _ in named]
                torch._foreach_lerp_(dst, [p.detach().float() for _, p in named], 1.0 - decay)


if __name__ == "__main__":
    main()
