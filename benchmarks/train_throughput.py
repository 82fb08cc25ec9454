"""Training-step throughput of the DiT: img/s and MFU, Triton kernels vs PyTorch references.

    python benchmarks/train_throughput.py --models DiT-B/2 --batch 64 --out results.json

Measures the student's step as the training loop runs it (bf16 autocast, fp32 master
weights, AdamW, the fused flow loss) on random 32x32x4 latents, side by side for
`model.kernels` = triton and torch in one process. DeepSpeed is left out on purpose:
on one GPU it adds no compute, and this isolates what the kernels change.
MFU = img/s x 3 x forward FLOPs / peak bf16 FLOP/s (TARGETS.md convention).
"""
import argparse
import os
import subprocess
import sys
import time
from datetime import datetime, timezone

import torch

from flowpre import strict_json
from flowpre import kernels as K
from flowpre.models.dit import build_dit
from flowpre.train.metrics import peak_flops


def step_fn(model, opt, batch, kernels):
    x = torch.randn(batch, 4, 32, 32, device="cuda")
    sigma = torch.rand(batch, device="cuda")
    cond = torch.randint(0, 1000, (batch,), device="cuda")
    target = torch.randn_like(x)
    weight = torch.ones(batch, device="cuda")
    group = torch.zeros(batch, dtype=torch.long, device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            pred = model(x, sigma, cond)
        loss, _ = K.flow_loss(pred, target, weight, group, 2, backend=kernels)  # bf16 pred read in place, as the loop does
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def measure(name, batch, kernels, warmup, iters):
    torch.manual_seed(0)
    model = build_dit(name, 4, 32, 1000, kernels=kernels).cuda()
    for p in model.parameters():  # leave adaLN-Zero's zeros: they would skip no work but hide bugs
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    step = step_fn(model, opt, batch, kernels)
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(iters):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / iters
    flops = 3 * model.forward_flops()
    peak = peak_flops(torch.device("cuda"))
    return {"model": name, "batch": batch, "kernels": kernels, "step_ms": dt * 1e3, "img_per_s": batch / dt,
            "mfu": batch / dt * flops / peak if peak else None, "train_tflop_per_img": flops / 1e12,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "loss_finite": bool(torch.isfinite(loss))}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="DiT-B/2,DiT-XL/2")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default="benchmarks/results/train_throughput.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("train_throughput needs a CUDA GPU; nothing measured")
        return 0
    rows = []
    for name in args.models.split(","):
        for kernels in ("torch", "triton"):
            try:
                rows.append(measure(name, args.batch, kernels, args.warmup, args.iters))
            except Exception as e:  # record and go on: one failure must not lose the other numbers
                rows.append({"model": name, "batch": args.batch, "kernels": kernels, "error": repr(e)[:2000]})
            r = rows[-1]
            print(f"{name:10s} batch {args.batch:4d} {kernels:7s} " + (
                f"{r['step_ms']:8.1f} ms/step {r['img_per_s']:8.1f} img/s MFU {r['mfu'] or 0:6.1%} "
                f"mem {r['peak_mem_gib']:.1f} GiB" if "error" not in r else f"ERROR {r['error'][:200]}"), flush=True)
            torch.cuda.empty_cache()
    for name in args.models.split(","):
        by = {r["kernels"]: r for r in rows if r["model"] == name and "error" not in r}
        if len(by) == 2:
            print(f"{name}: triton / torch img/s = {by['triton']['img_per_s'] / by['torch']['img_per_s']:.3f}")
    commit = os.environ.get("FLOWPRE_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        except OSError:
            pass
    commit = commit or "unknown"
    import triton
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "commit": commit, "time": datetime.now(timezone.utc).isoformat(), "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(strict_json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
