"""Fused forward-mode attention against torch.func.jvp: `python benchmarks/attention_jvp.py --out FILE`.

On CUDA, at the DiT attention shapes of flowpre/kernels/bench.py (bf16, H = 16, B = 2**16 // N,
N in 256/1024/4096, D in 64/72/128; --cross adds the text cross-attention shapes),
each row times, with the same timer as flowpre/kernels/bench.py (triton's do_bench, median):
  triton_jvp     attention_jvp_forward: out and tangent_out in one pass
  func_jvp_math  torch.func.jvp of scaled_dot_product_attention on its math path
                 (PyTorch's fused SDPA kernels refuse forward-mode AD); materialises
                 P and tP, so the largest shapes may run out of memory (recorded)
  triton_fwd     the plain Triton forward alone, the floor a fused JVP is held to
FLOPs counted for the JVP: 12*B*H*M*N*D (S, tS's two halves, P v, (P o tS) v and
P tv; the plain forward's count is 4*B*H*M*N*D). Each implementation's tangent is
compared with the fp32 func.jvp of the same bf16 inputs (relative max error, first
batch entry).

Without CUDA this is a smoke check only: one tiny shape through the Triton
interpreter, wall-clock timed, to show the script runs; its times are not
performance figures. The real numbers come from a GPU run.
Prints a table and writes JSON (after every row, so a cut-off run keeps what it has).
"""
import argparse
import datetime
import os
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

import torch  # noqa: E402

if not torch.cuda.is_available():  # read when the kernels are decorated, so before the import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from flowpre.kernels import bench  # noqa: E402
from flowpre.kernels.attention import attention_forward  # noqa: E402
from flowpre.kernels.attention_jvp import attention_jvp_forward  # noqa: E402
from flowpre import strict_json  # noqa: E402

SMOKE_SHAPE = (1, 2, 64, 64, 72)  # B, H, M, N, D
SMOKE_NOTE = ("no CUDA: smoke check only, one tiny shape through the Triton interpreter; "
              "these times are not performance numbers")


def func_jvp_math(q, k, v, tq, tk, tv):
    with sdpa_kernel([SDPBackend.MATH]):
        return torch.func.jvp(F.scaled_dot_product_attention, (q, k, v), (tq, tk, tv))


def _rel(a, ref):
    return ((a.float() - ref).abs().max() / ref.abs().max()).item()


def _row(shape, timer, device):
    B, H, M, N, D = shape
    row = {"kernel": "attention_jvp", "shape": [B, H, M, D], "kv_len": N, "dtype": "bf16", "results": {}}
    flops = 12 * B * H * M * N * D
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        mk = lambda n: torch.randn(B, H, n, D, device=device, dtype=torch.bfloat16, generator=gen)  # noqa: E731
        q, k, v, tq, tk, tv = mk(M), mk(N), mk(N), mk(M), mk(N), mk(N)
        with torch.no_grad():  # the first batch entry only: fp32 P and tP at N = 4096 are 2 GB each per entry
            _, ref_t = func_jvp_math(*(t[:1].float() for t in (q, k, v, tq, tk, tv)))
    except Exception as e:  # noqa: BLE001 - a row's failure must not end the run
        row["error"] = bench._err(e)
        return row
    impls = {"triton_jvp": lambda: attention_jvp_forward(q, k, v, tq, tk, tv),
             "func_jvp_math": lambda: func_jvp_math(q, k, v, tq, tk, tv),
             "triton_fwd": lambda: attention_forward(q, k, v)}
    for name, fn in impls.items():
        res = row["results"][name] = {}
        try:
            with torch.no_grad():
                got = fn()
                if name != "triton_fwd":
                    res["tangent_rel_err_vs_func_jvp"] = _rel(got[1][:1], ref_t)
                res["ms"] = timer(fn)
            if name != "triton_fwd":
                res["tflops"] = flops / (res["ms"] * 1e-3) / 1e12
        except Exception as e:  # noqa: BLE001
            res["error"] = bench._err(e)
        if device == "cuda":
            torch.cuda.empty_cache()
    t, m, f = (row["results"][n].get("ms") for n in ("triton_jvp", "func_jvp_math", "triton_fwd"))
    if t and m:
        row["speedup_vs_func_jvp"] = m / t
    if t and f:
        row["jvp_over_fwd"] = t / f
    return row


def _wall_timer(fn, reps=1):
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e3


def _print(row):
    shape = "x".join(map(str, row["shape"])) + f" kv{row['kv_len']}"
    if "error" in row:
        print(f"{shape:20s} ERROR {row['error'][:120]}")
        return
    cells = []
    for name, res in row["results"].items():
        if "error" in res:
            cells.append(f"{name} ERROR({res['error'][:60]})")
        elif "ms" in res:
            extra = f" {res['tflops']:.0f}TF/s" if "tflops" in res and res["tflops"] >= 1 else ""
            err = f" err {res['tangent_rel_err_vs_func_jvp']:.1e}" if "tangent_rel_err_vs_func_jvp" in res else ""
            cells.append(f"{name} {res['ms']:.3f}ms{extra}{err}")
    ratios = "".join(f"  {k}={row[k]:.2f}x" for k in ("speedup_vs_func_jvp", "jvp_over_fwd") if k in row)
    print(f"{shape:20s} " + " | ".join(cells) + ratios)


def run(out_path=None, quick=False, cross=False):
    cuda = torch.cuda.is_available()
    import triton
    report = {"device": torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)",
              "status": "ok" if cuda else "smoke", "torch": torch.__version__, "triton": triton.__version__,
              "git_commit": bench._git_commit(),
              "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "conventions": __doc__.split("\n\n", 1)[1].strip(), "rows": []}
    if cuda:
        timer = bench._Timer(quick)
        selfs = bench.ATTN_QUICK if quick else bench.ATTN_FULL
        shapes = [(2**16 // n, 16, n, n, d) for n, d in selfs]
        if cross:
            shapes += [(2**16 // m, 16, m, n, d) for m, n, d in bench.ATTN_CROSS]
    else:
        print(SMOKE_NOTE)
        report["note"] = SMOKE_NOTE
        timer, shapes = _wall_timer, [SMOKE_SHAPE]
    print(f"device {report['device']}  torch {report['torch']}  triton {report['triton']}  "
          f"commit {report['git_commit'][:12]}")
    for shape in shapes:
        row = _row(shape, timer, "cuda" if cuda else "cpu")
        _print(row)
        report["rows"].append(row)
        if out_path:
            with open(out_path, "w") as f:
                f.write(strict_json.dumps(report, indent=1) + "\n")
    if out_path:
        print(f"wrote {out_path}")
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="write the JSON report here")
    parser.add_argument("--quick", action="store_true", help="two shapes and shorter timing")
    parser.add_argument("--cross", action="store_true", help="add the text cross-attention shapes")
    args = parser.parse_args(argv)
    run(args.out, args.quick, args.cross)
    return 0


if __name__ == "__main__":
    sys.exit(main())
