"""Training-step throughput of the DiT: img/s and MFU, Triton kernels vs PyTorch references.

    python benchmarks/train_throughput.py --models DiT-B/2 --batch 64 --out results.json

Measures the student's step as the training loop runs it (bf16 autocast, fp32 master
weights, AdamW, the fused flow loss) on random 32x32x4 latents, side by side for
`model.kernels` = triton and torch in one process. DeepSpeed is left out on purpose:
on one GPU it adds no compute, and this isolates what the kernels change.
MFU = img/s x 3 x forward FLOPs / peak bf16 FLOP/s (TARGETS.md convention).
--rehearse runs the same step on the CPU (TRITON_INTERPRET=1 set before python starts, so
that model.kernels=triton runs), one warm-up and one timed step at the smallest shapes, to
check the script before GPU time is spent on it: its figures are not performance numbers.
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
from flowpre.kernels.backend import interpreter_on
from flowpre.models.dit import build_dit
from flowpre.train.metrics import peak_flops


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def step_fn(model, opt, batch, kernels, device, size):
    x = torch.randn(batch, 4, size, size, device=device)
    sigma = torch.rand(batch, device=device)
    cond = torch.randint(0, 1000, (batch,), device=device)
    target = torch.randn_like(x)
    weight = torch.ones(batch, device=device)
    group = torch.zeros(batch, dtype=torch.long, device=device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            pred = model(x, sigma, cond)
        loss, _ = K.flow_loss(pred, target, weight, group, 2, backend=kernels)  # bf16 pred read in place, as the loop does
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def measure(name, batch, kernels, warmup, iters, device="cuda", size=32):
    torch.manual_seed(0)
    model = build_dit(name, 4, size, 1000, kernels=kernels).to(device)
    for p in model.parameters():  # leave adaLN-Zero's zeros: they would skip no work but hide bugs
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    step = step_fn(model, opt, batch, kernels, device, size)
    for _ in range(warmup):
        step()
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(iters):
        loss = step()
    _sync(device)
    dt = (time.perf_counter() - t) / iters
    flops = 3 * model.forward_flops()
    peak = peak_flops(torch.device(device))
    memory = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"model": name, "batch": batch, "kernels": kernels, "step_ms": dt * 1e3, "img_per_s": batch / dt,
            "mfu": batch / dt * flops / peak if peak else None, "train_tflop_per_img": flops / 1e12,
            "peak_mem_gib": memory, "loss_finite": bool(torch.isfinite(loss))}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="DiT-B/2,DiT-XL/2")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--size", type=int, default=32, help="latent height and width (4 x size x size)")
    ap.add_argument("--out", default="benchmarks/results/train_throughput.json")
    ap.add_argument("--rehearse", action="store_true",
                    help="on the CPU, one warm-up and one timed step (needs TRITON_INTERPRET=1); measures nothing")
    args = ap.parse_args(argv)
    if args.rehearse:
        if not interpreter_on():
            raise SystemExit("--rehearse runs model.kernels=triton through the Triton interpreter: "
                             "start python with TRITON_INTERPRET=1")
        device, args.warmup, args.iters = "cpu", 1, 1
    elif torch.cuda.is_available():
        device = "cuda"
    else:
        print("train_throughput needs a CUDA GPU; nothing measured")
        return 0
    rows = []
    for name in args.models.split(","):
        for kernels in ("torch", "triton"):
            try:
                rows.append(measure(name, args.batch, kernels, args.warmup, args.iters, device, args.size))
            except Exception as e:  # record and go on: one failure must not lose the other numbers
                rows.append({"model": name, "batch": args.batch, "kernels": kernels, "error": repr(e)[:2000]})
            r = rows[-1]
            print(f"{name:10s} batch {args.batch:4d} {kernels:7s} " + (
                f"{r['step_ms']:8.1f} ms/step {r['img_per_s']:8.1f} img/s MFU {r['mfu'] or 0:6.1%} "
                f"mem {r['peak_mem_gib'] or 0:.1f} GiB" if "error" not in r else f"ERROR {r['error'][:200]}"),
                flush=True)
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
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (rehearsal)",
           "torch": torch.__version__, "triton": triton.__version__, "commit": commit,
           "time": datetime.now(timezone.utc).isoformat(), "latent": [4, args.size, args.size], "rows": rows}
    if args.rehearse:
        out["note"] = "rehearsal on the CPU through the Triton interpreter: not performance figures"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(strict_json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
