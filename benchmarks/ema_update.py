"""The dual EMA's update: both EMAs in one multi-tensor op (DualEma.update today) against
the two calls it replaced (one _foreach_lerp_ per EMA), side by side on one machine.

    python benchmarks/ema_update.py --models DiT-S/2,DiT-B/2 --out benchmarks/results/ema_update_cpu.json

Interleaved rounds, median of each; the student in fp32 (flowpre's case: fp32 master
weights under autocast) and in bf16. The results are checked equal before timing.
"""
import argparse
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from flowpre import strict_json  # noqa: E402
from flowpre.models.dit import build_dit  # noqa: E402
from flowpre.train.ema import DualEma  # noqa: E402


@torch.no_grad()
def two_calls(ema, student):
    """The update before: one _foreach_lerp_ per EMA over the student's fp32 parameters."""
    src = [p.data.float() for p in student.parameters()]
    for key, decay in ema.decays.items():
        torch._foreach_lerp_([p.data for p in ema.nets[key].parameters()], src, 1.0 - decay)


def timed(fn, sync):
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def measure(model, dtype, rounds, device):
    torch.manual_seed(0)
    student = build_dit(model, 4, 32, 1000, kernels="torch").to(device, dtype)
    ema_one, ema_two = DualEma(student, 0.99, 0.999), DualEma(student, 0.99, 0.999)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    ema_one.update(student, 1)
    two_calls(ema_two, student)
    same = all(torch.equal(a, b) for k in ema_one.nets for a, b in zip(ema_one.nets[k].parameters(),
                                                                         ema_two.nets[k].parameters()))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {"one_op": [], "two_calls": []}
    for step in range(2, rounds + 2):  # interleaved: drift on a shared machine hits both alike
        times["one_op"].append(timed(lambda: ema_one.update(student, step), sync))
        times["two_calls"].append(timed(lambda: two_calls(ema_two, student), sync))
    one, two = (statistics.median(times[k]) for k in ("one_op", "two_calls"))
    params = sum(p.numel() for p in student.parameters())
    return {"model": model, "student_dtype": str(dtype).replace("torch.", ""), "params": params,
            "tensors": len(list(student.parameters())), "results_equal": same,
            "one_op_ms": one * 1e3, "two_calls_ms": two * 1e3, "speedup": two / one,
            "one_op_gbps": 5 * 4 * params / one / 1e9}  # student read once + 2 EMAs read and written


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="DiT-S/2,DiT-B/2")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "host": platform.node(),
              "load_avg_at_start": os.getloadavg(), "time": datetime.now(timezone.utc).isoformat(),
              "rounds": args.rounds, "rows": []}
    for model in args.models.split(","):
        for dtype in args.dtypes.split(","):
            row = measure(model, getattr(torch, dtype), args.rounds, device)
            report["rows"].append(row)
            print(f"{model:9s} student {row['student_dtype']:8s} {row['params'] / 1e6:6.1f}M params: one op "
                  f"{row['one_op_ms']:8.2f} ms, two calls {row['two_calls_ms']:8.2f} ms ({row['speedup']:.2f}x), "
                  f"equal {row['results_equal']}", flush=True)
    report["load_avg_at_end"] = os.getloadavg()
    if args.out:
        with open(args.out, "w") as f:
            f.write(strict_json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
