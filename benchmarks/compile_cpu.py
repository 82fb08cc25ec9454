"""Training-step time with train.compile=true (each DiT block torch.compiled) against eager.

    python benchmarks/compile_cpu.py --model DiT-4x192x3/4 --batch 16 --out results.json

One step as the loop runs it (flow-matching targets, student forward + backward, the
flow loss, AdamW step, dual EMA update), without DeepSpeed and data loading, so only the
compilation differs. Both models are built from one seed and timed in interleaved rounds,
keeping the median, which keeps the ratio fair on a shared, noisy machine; the load
average before and after goes into the JSON. The first step of each mode (which includes
compilation for the compiled one) is reported apart.
On CPU the model runs the PyTorch references (model.kernels=auto), fp32: the kernel-side
savings of issue 14 item 3 (bf16 adaLN output under autocast, the bf16 prediction read by
the loss in place) act on the CUDA bf16 path and are invisible here.
"""
import argparse
import os
import platform
import statistics
import time
from datetime import datetime, timezone

import torch

from flowpre import strict_json
from flowpre import kernels as K
from flowpre.config import ObjectiveConfig
from flowpre.models.dit import build_dit
from flowpre.objectives import Nets, build
from flowpre.train.ema import DualEma
from flowpre.train.engine import compile_blocks

MODES = ("eager", "compiled")


def make_step(mode, args):
    torch.manual_seed(0)
    objective = build(ObjectiveConfig(name="fm"), 1)
    model = build_dit(args.model, args.channels, args.size, args.classes, kernels=args.kernels)
    model.activation_checkpointing = args.activation_checkpointing
    ema = DualEma(model)  # before compiling, as in the loop (the EMAs stay eager)
    if mode == "compiled":
        compile_blocks(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    nets = Nets(student=model, ema_fast=ema.fast, ema_slow=ema.slow, null_cond=model.null_class)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, args.channels, args.size, args.size) * 2 - 1
    cond = torch.randint(0, args.classes, (args.batch,))
    count = [0]

    def step():
        t = objective({"x": x, "cond": cond}, nets, gen)
        pred = model(t.x, t.sigma, t.cond, **t.extra_inputs)
        loss, _ = K.flow_loss(pred, t.target, t.loss_weight(pred), t.group, len(objective.groups),
                              backend=args.kernels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        count[0] += 1
        ema.update(model, count[0])
        return loss.item()
    return step


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="DiT-4x192x3/4")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--kernels", default="auto", choices=("auto", "torch"))  # the interpreter would time Python
    ap.add_argument("--activation-checkpointing", action="store_true")
    # a shared 2-core machine: two OpenMP threads contending with other work ran a 256x256
    # matmul 40x slower than one thread did, so one thread is the default
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps-per-round", type=int, default=3)
    ap.add_argument("--note", default="", help="free text for the JSON (e.g. what else loads the machine)")
    ap.add_argument("--out", default="benchmarks/results/compile_cpu.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    steps = {m: make_step(m, args) for m in MODES}
    first_step_s, losses = {}, {}
    for m in MODES:
        t = time.perf_counter()
        losses[m] = steps[m]()
        first_step_s[m] = time.perf_counter() - t
        for _ in range(args.warmup - 1):
            steps[m]()
    times = {m: [] for m in MODES}
    for _ in range(args.rounds):
        for m in MODES:
            t = time.perf_counter()
            for _ in range(args.steps_per_round):
                steps[m]()
            times[m].append((time.perf_counter() - t) / args.steps_per_round)
    load_after = os.getloadavg()
    med = {m: statistics.median(v) for m, v in times.items()}
    rows = [{"mode": m, "median_step_s": med[m], "min_step_s": min(times[m]), "max_step_s": max(times[m]),
             "img_per_s": args.batch / med[m], "first_step_s": first_step_s[m], "first_loss": losses[m],
             "speedup_vs_eager": med["eager"] / med[m]} for m in MODES]
    print(f"{args.model} batch {args.batch}, {args.size}x{args.size}x{args.channels}, kernels={args.kernels}"
          + (", activation checkpointing" if args.activation_checkpointing else "")
          + f"; load average {load_before[0]:.1f} -> {load_after[0]:.1f}")
    print(f"{'mode':9s} {'median s/step':>14s} {'min':>7s} {'max':>7s} {'img/s':>7s} {'first step s':>13s} {'x eager':>8s}")
    for r in rows:
        print(f"{r['mode']:9s} {r['median_step_s']:14.4f} {r['min_step_s']:7.4f} {r['max_step_s']:7.4f} "
              f"{r['img_per_s']:7.1f} {r['first_step_s']:13.2f} {r['speedup_vs_eager']:8.3f}")
    out = {"device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
           "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "model": args.model,
           "batch": args.batch, "image": [args.channels, args.size, args.size], "kernels": args.kernels,
           "activation_checkpointing": args.activation_checkpointing, "rounds": args.rounds,
           "steps_per_round": args.steps_per_round, "load_average_before": load_before,
           "load_average_after": load_after, "note": args.note,
           "time": datetime.now(timezone.utc).isoformat(), "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(strict_json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
