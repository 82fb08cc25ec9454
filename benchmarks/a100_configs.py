"""Every launch configuration of every Triton kernel, compiled offline for an A100 (sm_80).

    python benchmarks/a100_configs.py --out benchmarks/results/a100_configs.json [--arch 80]

Attention (forward, delta, dK/dV, dQ): every row of every autotuning pool in
flowpre/kernels/attention_kernels.py, at the head widths that pool serves (its narrowest DiT case
and its widest), both EVEN_N variants where the kernel has them. adaLN (forward and
backward, gated and plain): the tiling launch_config picks at every DiT width and token
count. Loss: every block size _block can pick, and the finishing kernel at every group
block. Each is compiled as a bf16 launch would be (flowpre/kernels/registers.py: ptxas from
triton's wheel, no GPU) and its registers, spills and shared memory read from the cubin.

A config fits when it spills nothing (no stack frame) and its shared memory is within the
A100's 163 KB per block (164 KB per SM; what cudaDevAttrMaxSharedMemoryPerBlockOptin
reports, and what Triton checks at launch). The JSON lists every row and, per kernel,
what an A100 would run: the untuned first entry of a pool for short sequences, and the
pool's fitting configs for the autotuner to time on longer ones; adaLN and the loss have
no tuning, so their rows are what runs.

`cases()` is cheap (no compile): tests compare it with the JSON, so a config added to a
kernel without re-running this script fails there.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from flowpre import strict_json  # noqa: E402

# per block, in bytes: the opt-in maximum of dynamic shared memory a launch may ask for
SHARED_PER_BLOCK = {80: 163 * 1024, 90: 227 * 1024}
# (dtype, head dim) per attention pool: the DiT head (72 = 64 + 16 columns), the widest two-chunk
# head (96 = 64 + 32) and the widest the pool serves (fp64 rows, for gradcheck only, are left out)
ATTENTION_WIDTHS = {"small": [("bf16", 72), ("bf16", 96), ("bf16", 128)], "large": [("bf16", 256), ("fp32", 128)],
                    "huge": [("fp32", 256)]}
# adaLN: (B, N, C) at DiT-S/B/L/XL widths and Flux's 3072, DiT token counts
ADALN_SHAPES = [(256, 64, 384), (256, 256, 768), (64, 256, 1024), (32, 1024, 1152), (8, 1024, 3072),
                (256, 256, 1152), (256, 64, 1152)]


def cases(arch=80):
    """Every (kernel, config, specialisation) a GPU of sm_`arch` can launch, as JSON-able dicts."""
    from flowpre.kernels import adaln, loss
    from flowpre.kernels.attention_kernels import _TABLES, _TABLES_SM80
    import triton
    tables = _TABLES_SM80 if arch < 90 else _TABLES
    out = []
    for table, kernels in (("fwd", ("attention_fwd",)), ("bwd", ("attention_dkdv", "attention_dq"))):
        for pool, rows in tables[table].items():
            for first, (a, b, warps, stages) in enumerate(rows):
                for kernel in kernels:
                    for dtype, D in ATTENTION_WIDTHS[pool]:
                        for even_n in ((True, False) if kernel != "attention_dkdv" else (None,)):
                            out.append(dict(kernel=kernel, pool=pool, config=[a, b, warps, stages],
                                            untuned_default=first == 0, dtype=dtype, D=D, even_n=even_n))
    for dtype, D in sorted({w for widths in ATTENTION_WIDTHS.values() for w in widths}):
        block_d = max(16, triton.next_power_of_2(D))
        out.append(dict(kernel="attention_delta", dtype=dtype, D=D, block_d=block_d,
                        block_m=64 if block_d <= 128 else 32, num_warps=4))
    seen = set()
    for B, N, C in ADALN_SHAPES:
        for backward in (False, True):
            launch = adaln.launch_config(C, N, backward=backward)
            for gated in (True, False):
                key = (backward, gated, C, launch)
                if key not in seen:
                    seen.add(key)
                    out.append(dict(kernel="adaln_bwd" if backward else "adaln_fwd", gated=gated, shape=[B, N, C],
                                    launch=launch._asdict()))
    blocks = sorted({loss._block(M) for M in (2 ** k for k in range(0, 24))})
    for block, warps in blocks:
        for kernel in ("loss_sq_err", "loss_bwd"):
            out.append(dict(kernel=kernel, block=block, num_warps=warps))
    # flow_loss_forward's finishing launch: every group block with every chunk block it can pick
    block_gs = [2 ** k for k in range(loss.MAX_GROUPS.bit_length())]
    block_ks = sorted({_finish_block_k(n) for n in range(1, 4097)})
    for block_g in block_gs:
        for block_k in block_ks:
            out.append(dict(kernel="loss_finish", block_g=block_g, block_b=max(1, min(128, 4096 // block_g)),
                            block_k=block_k, num_warps=4))
    return out


def _finish_block_k(n_chunks):
    """BLOCK_K of flow_loss_forward's finishing launch, read off its source so the two cannot drift."""
    import inspect
    import re
    from flowpre.kernels import loss
    cap = int(re.search(r"BLOCK_K=min\((\d+), triton\.next_power_of_2\(n_chunks\)\)",
                        inspect.getsource(loss)).group(1))
    return min(cap, 1 << (n_chunks - 1).bit_length())


def _attention_launch(case):
    import torch
    A = __import__("flowpre.kernels.attention", fromlist=["_meta"])
    K = __import__("flowpre.kernels.attention_kernels", fromlist=["_fwd_kernel"])
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[case["dtype"]]
    q = torch.empty(4, 16, 1024, case["D"], dtype=dtype, device="meta")
    meta, align = A._meta(q), A._align(q)
    strides = A._strides(q, align)
    ptr = "*" + case["dtype"]
    if case["kernel"] == "attention_delta":
        args = dict(O=ptr, DO=ptr, DELTA="*fp32", sob=strides[0], soh=strides[1], son=strides[2], sdb=strides[0],
                    sdh=strides[1], sdn=strides[2], H=16, M=1024)
        consts = dict(D=case["D"], BLOCK_D=case["block_d"], ALIGN=align, ACC=meta["ACC"], BLOCK_M=case["block_m"])
        return K._bwd_delta_kernel, args, consts, case["num_warps"], 3
    a, b, warps, stages = case["config"]
    kernel = {"attention_fwd": K._fwd_kernel, "attention_dkdv": K._bwd_dkdv_kernel,
              "attention_dq": K._bwd_dq_kernel}[case["kernel"]]
    outer_is_m = case["kernel"] != "attention_dkdv"
    consts = dict(meta, ALIGN=align, BLOCK_M=a if outer_is_m else b, BLOCK_N=b if outer_is_m else a)
    if case["even_n"] is not None:
        consts["EVEN_N"] = case["even_n"]
    args = dict(H=16, M=1024, N=1024, M_BUCKET=1024, N_BUCKET=1024, qk_scale=0.1, scale=0.1)
    args = {k: v for k, v in args.items() if k in kernel.arg_names}
    for arg in kernel.arg_names:
        if arg in consts or arg in args:
            continue
        if arg in ("LSE", "DELTA"):
            args[arg] = "*fp32"
        elif arg.isupper():
            args[arg] = ptr
        else:  # a stride: b, h or n by its last letter
            args[arg] = strides["bhn".index(arg[-1])]
    return kernel, args, consts, warps, stages


def _adaln_launch(case):
    import triton.language as tl
    from flowpre.kernels import adaln
    B, N, C = case["shape"]
    launch = adaln.Launch(**case["launch"])
    consts = dict(RESIDUAL=case["gated"], ACC=tl.float32, **launch.constexprs())
    bf16, fp32 = "*bf16", "*fp32"
    if case["kernel"] == "adaln_bwd":
        n_chunks, per = adaln.backward_grid(B, N, launch.rows, 4 * 108)  # A100: 108 SMs
        args = dict(X=bf16, Y=bf16, GATE=bf16, SCALE=bf16, MEAN=fp32, RSTD=fp32, DH=bf16, DOUT=bf16, DX=bf16,
                    DY=bf16, PART=fp32, N=N, C=C, n_chunks=n_chunks, tiles_per_prog=per)
        consts["PREFETCH"] = launch.prefetch
        return adaln._adaln_bwd_kernel, args, consts, launch.num_warps, 3
    args = dict(X=bf16, Y=bf16, GATE=bf16, SHIFT=bf16, SCALE=bf16, H=bf16, OUT=bf16, MEAN=fp32, RSTD=fp32,
                N=N, C=C, eps=1e-6)
    return adaln._adaln_fwd_kernel, args, consts, launch.num_warps, 3


def _loss_launch(case):
    import triton.language as tl
    from flowpre.kernels import loss as L
    M, B = 4 * 32 * 32, 256  # a DiT latent batch; the block is the config
    if case["kernel"] == "loss_sq_err":
        args = dict(P="*bf16", T="*bf16", PART="*fp32", M=M, n_chunks=5, tiles_per_prog=3)
        return L._sq_err_kernel, args, dict(BLOCK=case["block"], ACC=tl.float32), case["num_warps"], 3
    if case["kernel"] == "loss_bwd":
        args = dict(P="*bf16", T="*bf16", WEIGHT="*fp32", GRAD="*fp32", DPRED="*bf16", B=B, M=M)
        return L._loss_bwd_kernel, args, dict(BLOCK=case["block"], ACC=tl.float32), case["num_warps"], 3
    args = dict(PART="*fp32", WEIGHT="*fp32", GROUP="*i64", TOTAL="*fp32", GROUPS="*fp32", MEANS="*fp32",
                B=B, M=M, n_chunks=40, G=case["block_g"])
    consts = dict(BLOCK_B=case["block_b"], BLOCK_K=case["block_k"], BLOCK_G=case["block_g"], ACC=tl.float32)
    return L._finish_kernel, args, consts, case["num_warps"], 3


def compile_case(case, arch=80):
    """Registers, spills, shared memory and occupancy of one case compiled for sm_`arch`."""
    from flowpre.kernels import registers
    kind = case["kernel"].split("_")[0]
    kernel, args, consts, warps, stages = {"attention": _attention_launch, "adaln": _adaln_launch,
                                           "loss": _loss_launch}[kind](case)
    res = registers.resources(kernel, args, consts, warps, arch=arch, num_stages=stages)
    res.pop("global_loads_by_bytes")
    reasons = []
    if res["stack_bytes"]:
        reasons.append(f"spills {res['stack_bytes']} bytes")
    if res["shared_bytes"] > SHARED_PER_BLOCK[arch]:
        reasons.append(f"shared {res['shared_bytes']} > {SHARED_PER_BLOCK[arch]}")
    return {**res, "fits": not reasons, "why_not": "; ".join(reasons) or None}


def picks(rows):
    """What an A100 runs, per kernel and pool: the untuned default and the tuning candidates."""
    out = {}
    for r in rows:
        if not r["kernel"].startswith("attention_") or r["kernel"] == "attention_delta":
            continue
        key = f"{r['kernel']} {r['pool']} {r['dtype']} D={r['D']}"
        entry = out.setdefault(key, {"untuned": None, "autotune_candidates": [], "left_out": []})
        cfg = tuple(r["config"])
        if r["untuned_default"]:
            entry["untuned"] = list(cfg)
        fits = all(x["fits"] for x in rows if x["kernel"] == r["kernel"] and x.get("pool") == r["pool"]
                   and x.get("dtype") == r["dtype"] and x.get("D") == r["D"] and tuple(x["config"]) == cfg)
        target = entry["autotune_candidates"] if fits else entry["left_out"]
        if list(cfg) not in target:
            target.append(list(cfg))
    return out


def summary(rows):
    """Per kernel: configurations, how many fit, and the largest registers, shared memory and spill."""
    out = {}
    for r in rows:
        e = out.setdefault(r["kernel"], {"configs": 0, "fit": 0, "max_registers": 0, "max_shared_bytes": 0,
                                         "max_spill_bytes": 0, "min_blocks_per_sm": 32})
        e["configs"] += 1
        e["fit"] += r["fits"]
        e["max_registers"] = max(e["max_registers"], r["registers"])
        e["max_shared_bytes"] = max(e["max_shared_bytes"], r["shared_bytes"])
        e["max_spill_bytes"] = max(e["max_spill_bytes"], r["stack_bytes"])
        e["min_blocks_per_sm"] = min(e["min_blocks_per_sm"], r["blocks_per_sm"])
    return out


def _compile_all(todo, arch):
    """Compile in a child with the interpreter off (interpreted kernels cannot be compiled)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = ("import json, sys; sys.path.insert(0, %r); import a100_configs as a; "
              "[print(json.dumps(a.compile_case(c, %d)), flush=True) for c in json.loads(sys.stdin.read())]"
              % (os.path.dirname(os.path.abspath(__file__)), arch))
    done = subprocess.run([sys.executable, "-c", script], input=json.dumps(todo), cwd=ROOT, env=env,
                          capture_output=True, text=True, check=True)
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/a100_configs.json")
    ap.add_argument("--arch", type=int, default=80, choices=sorted(SHARED_PER_BLOCK))
    args = ap.parse_args(argv)
    from flowpre.kernels import registers
    import triton
    if not registers.available():
        print("this triton install bundles no ptxas/cuobjdump; cannot compile offline")
        return 1
    todo = cases(args.arch)
    print(f"compiling {len(todo)} kernel configurations for sm_{args.arch} ...", flush=True)
    rows = [{**case, **res} for case, res in zip(todo, _compile_all(todo, args.arch))]
    report = {"arch": f"sm_{args.arch}", "shared_per_block_limit": SHARED_PER_BLOCK[args.arch],
              "triton": triton.__version__, "time": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "all_fit": all(r["fits"] for r in rows), "summary": summary(rows), "a100_runs": picks(rows),
              "rows": rows}
    bad = [r for r in rows if not r["fits"]]
    for r in bad:
        print("DOES NOT FIT:", {k: v for k, v in r.items() if k not in ("fits",)})
    print(f"{len(rows) - len(bad)} of {len(rows)} fit sm_{args.arch}")
    with open(args.out, "w") as f:
        f.write(strict_json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0 if not bad else 3


if __name__ == "__main__":
    sys.exit(main())
