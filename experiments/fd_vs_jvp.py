"""How far is the finite-difference MeanFlow target from the JVP one, on a trained model?

    python experiments/fd_vs_jvp.py --weights runs/experiments/meanflow/model.safetensors \
        --deltas 2e-2,5e-3,1e-3,2e-4 --out docs/results/fd_vs_jvp.json

Draws one batch of real training images, builds MeanFlow targets for it twice with the same
random draws, once with du/dt from torch.func.jvp and once from the central difference at
each gap, and reports the relative error of the jump samples' du/dt term, (t - r) du/dt,
in fp32 and in float64. The DiT embeds 1000 * sigma with sinusoids up to 1000 rad per unit
sigma, so a gap of 5e-3 spans most of a period of the fastest features: this measures how
much that matters once the network has learnt which features to use.
"""
import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch


def targets(model, x, cond, name, delta, seed):
    from flowpre.config import ObjectiveConfig
    from flowpre.objectives import Nets, build

    cfg = dataclasses.replace(ObjectiveConfig(name=name), fd_delta=delta, cond_drop_prob=0.0, fm_fraction=0.0)
    return build(cfg, time_inputs=2)({"x": x, "cond": cond}, Nets(student=model, null_cond=model.null_class),
                                     torch.Generator().manual_seed(seed))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True)
    p.add_argument("--data", default="data/fashion-mnist/train-*.tar")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--deltas", default="2e-2,5e-3,1e-3,2e-4,5e-5")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from flowpre.data.pipeline import ShardLoader, resolve_shards
    from flowpre.weights import load_model

    model, meta = load_model(args.weights, kernels="torch")
    if model.time_inputs != 2:
        sys.exit(f"{args.weights} is a one-time model: the MeanFlow target needs model.time_inputs=2")
    batch = next(iter(ShardLoader(resolve_shards(args.data), batch_size=args.batch, rank=0, world_size=1,
                                  num_workers=0, seed=args.seed, hflip=False, shuffle_buffer=0)))
    rows = []
    for dtype in (torch.float32, torch.float64):
        m = model.to(dtype)
        x, cond = batch["x"].to(dtype), batch["cond"]
        with torch.no_grad():
            ref = targets(m, x, cond, "meanflow", 0.0, args.seed)
        t = ref.sigma.view(-1, 1, 1, 1)
        v = (ref.x - (1 - t) * x) / t - x  # eps - x, recovered from z_t
        term_ref = v - ref.target  # (t - r) du/dt from the JVP
        for delta in [float(d) for d in args.deltas.split(",")]:
            fd = targets(m, x, cond, "meanflow_fd", delta, args.seed)  # the same draws: same z, t, r
            term_fd = v - fd.target
            err = (term_fd - term_ref).flatten(1).norm(dim=1) / term_ref.flatten(1).norm(dim=1).clamp(min=1e-12)
            rows.append({"dtype": str(dtype).removeprefix("torch."), "delta": delta,
                         "median_rel_error": float(err.median()), "mean_rel_error": float(err.mean()),
                         "p90_rel_error": float(err.quantile(0.9)),
                         "term_rms": float(term_ref.pow(2).mean().sqrt())})
            print(f"{rows[-1]['dtype']:8s} delta {delta:8.1e}: relative error of (t - r) du/dt: median "
                  f"{rows[-1]['median_rel_error']:.4f}, p90 {rows[-1]['p90_rel_error']:.4f} "
                  f"(term rms {rows[-1]['term_rms']:.3f})", flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        Path(args.out).write_text(json.dumps({"weights": args.weights, "step": meta["step"], "batch": args.batch,
                                              "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
