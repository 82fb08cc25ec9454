"""Step time of each objective at the same model and batch, measured side by side.

    python benchmarks/objective_cost.py --model DiT-6x192x3/4 --batch 32 --out results.json

One training step as the loop runs it (targets, student forward + backward, fused
loss, AdamW step, dual EMA update), without DeepSpeed and data loading, so that only the
objective differs. Objectives are timed in interleaved rounds and the median is kept,
which makes the ratio robust to a noisy shared machine. METHOD.md predicts SCFM at
fm_fraction 0.75 costs about 1.17x a plain step (two no-grad forwards on a quarter).
The two-time objectives (`scfm2`: SCFM on the two-time DiT, `meanflow`: a JVP on the quarter
of jumps, `meanflow_fd`: two fp32 forwards there) run on a DiT with time_inputs=2. The
`FLOPs x fm` column is what the experiment pages charge (objective_overhead), beside the time.
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


# objectives that need the two-time DiT (METHOD.md section 8); `scfm2` is SCFM on that DiT
TWO_TIME = {"meanflow": "meanflow", "meanflow_fd": "meanflow_fd", "scfm2": "scfm"}


def make_step(name, model_name, batch, device, size, channels, classes):
    torch.manual_seed(0)
    time_inputs = 2 if name in TWO_TIME else 1
    objective = build(ObjectiveConfig(name=TWO_TIME.get(name, name)), time_inputs)
    model = build_dit(model_name, channels, size, classes, step_levels=objective.step_levels,
                      time_inputs=time_inputs).to(device)
    ema = DualEma(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    nets = Nets(student=model, ema_fast=ema.fast, ema_slow=ema.slow, null_cond=model.null_class)
    info = {}
    gen = torch.Generator(device).manual_seed(0)
    x = torch.rand(batch, channels, size, size, device=device) * 2 - 1
    cond = torch.randint(0, classes, (batch,), device=device)
    counter = [0]

    def step():
        t = objective({"x": x, "cond": cond}, nets, gen)
        pred = model(t.x, t.sigma, t.cond, **t.extra_inputs)
        loss, _ = K.flow_loss(pred, t.target, t.loss_weight(pred), t.group, len(objective.groups))
        info["overhead"] = float(t.info.get("extra_forward_images", 0)) / (3 * batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        counter[0] += 1
        ema.update(model, counter[0])
        if device.type == "cuda":
            torch.cuda.synchronize()
    step.info = info
    return step


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="DiT-6x192x3/4")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--objectives", default="fm,scfm,shortcut,scfm2,meanflow,meanflow_fd")
    ap.add_argument("--out", default="benchmarks/results/objective_cost_cpu.json")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = args.objectives.split(",")
    steps = {n: make_step(n, args.model, args.batch, device, args.size, args.channels, args.classes) for n in names}
    for n in names:  # warm-up
        steps[n]()
    times = {n: [] for n in names}
    for _ in range(args.rounds):
        for n in names:
            t = time.perf_counter()
            steps[n]()
            times[n].append(time.perf_counter() - t)
    med = {n: statistics.median(v) for n, v in times.items()}
    # counted FLOPs per trained image, relative to fm's 3 forwards: what the experiment pages charge
    rows = [{"objective": n, "median_step_s": med[n], "min_step_s": min(times[n]), "ratio_to_fm": med[n] / med["fm"],
             "counted_flops_ratio": 1 + steps[n].info["overhead"]} for n in names]
    print(f"{'objective':12s} {'median s/step':>14s} {'min s/step':>11s} {'x fm':>6s} {'FLOPs x fm':>11s}")
    for r in rows:
        print(f"{r['objective']:12s} {r['median_step_s']:14.3f} {r['min_step_s']:11.3f} {r['ratio_to_fm']:6.2f} "
              f"{r['counted_flops_ratio']:11.2f}")
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    out = {"device": device_name, "torch": torch.__version__, "model": args.model, "batch": args.batch,
           "rounds": args.rounds, "time": datetime.now(timezone.utc).isoformat(), "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(strict_json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
