"""Sweep the adaLN kernels' tiling at DiT widths: `python benchmarks/adaln_sweep.py --out FILE`.

Every candidate tiling (column layout, rows per tile, warps, prefetch) is compiled for
the GPU and its registers, spills and occupancy read from the cubin (flowpre/kernels/registers.py).
On CUDA each candidate that does not spill is then timed side by side with the tiling
launch_config picks today and with torch.compile of the reference: forward+backward
of gated_residual_adaln and of adaln_modulate (bf16, CUDA graph, GPU time, L2 flushed),
in GB/s and % of HBM peak, bytes counted as in flowpre/kernels/bench.py.
Without CUDA (or with --offline) nothing is timed: the table is registers and
occupancy for sm_90 only, which is what can be checked before a change reaches a GPU.
With --rehearse (and TRITON_INTERPRET=1) the GPU path runs on the CPU, to check the
script before GPU time is spent on it: today's tiling only, at B = 2, N = 16 (C kept),
timed through the interpreter by wall clock (not performance figures), its registers
compiled offline by a child process (the interpreter cannot compile).
Prints a table and writes JSON (after every row, so a cut-off run keeps what it has).
"""
import argparse
import datetime
import itertools
import json
import os
import subprocess
import sys
import tempfile
from unittest import mock

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from flowpre.kernels import adaln, bench, registers  # noqa: E402
from flowpre.kernels.backend import interpreter_on  # noqa: E402
from flowpre import strict_json  # noqa: E402

# (B, N, C): DiT-XL/2 at 512 px, DiT-B/2 and DiT-S/2 at 256 px (as in flowpre/kernels/bench.py)
SHAPES = [(32, 1024, 1152), (256, 256, 768), (256, 64, 384)]
SMS = 132  # H100 SXM and H200: the backward's grid is sized by the SM count
BF16, FP32 = "*bf16", "*fp32"


def candidates(C, N):
    """Backward tilings to try (the forward stays at launch_config's choice), today's first."""
    today = adaln.launch_config(C, N, backward=True)
    found = [today]
    for split, rows, warps, prefetch in itertools.product((True, False), (1, 2), (4, 8), (0, 1, 2)):
        a, b = adaln.column_blocks(C, split)
        launch = adaln.Launch(min(rows, triton.next_power_of_2(N)), a, b, warps, prefetch)
        if launch not in found:
            found.append(launch)
    return found


def static(shape, launch, gated, backward=True, arch=90):
    """Registers, spills and occupancy of one tiling, compiled as a bf16 launch at `shape` would be."""
    B, N, C = shape
    consts = dict(RESIDUAL=gated, ACC=tl.float32, **launch.constexprs())
    if backward:
        n_chunks, tiles_per_prog = adaln.backward_grid(B, N, launch.rows, 3 * SMS)
        args = dict(X=BF16, Y=BF16, GATE=BF16, SCALE=BF16, MEAN=FP32, RSTD=FP32, DH=BF16, DOUT=BF16, DX=BF16,
                    DY=BF16, PART=FP32, N=N, C=C, n_chunks=n_chunks, tiles_per_prog=tiles_per_prog)
        consts["PREFETCH"] = launch.prefetch
        return registers.resources(adaln._adaln_bwd_kernel, args, consts, launch.num_warps, arch=arch)
    args = dict(X=BF16, Y=BF16, GATE=BF16, SHIFT=BF16, SCALE=BF16, H=BF16, OUT=BF16, MEAN=FP32, RSTD=FP32,
                N=N, C=C, eps=1e-6)
    return registers.resources(adaln._adaln_fwd_kernel, args, consts, launch.num_warps, arch=arch)


def describe(launch):
    cols = f"{launch.block_a}+{launch.block_b}" if launch.block_b else f"{launch.block_a}"
    return f"rows={launch.rows} cols={cols} warps={launch.num_warps} prefetch={int(launch.prefetch)}"


def time_candidate(timer, shape, gated, launch, nbytes, inputs, grads, fn):
    original = adaln.launch_config

    def patched(C, N, backward=False):
        return launch if backward else original(C, N)
    with mock.patch.object(adaln, "launch_config", patched):
        ms = timer.graph(bench._fwd_bwd(fn, inputs, grads))
    return ms, nbytes / (ms * 1e-3)


def compiled_offline(shapes, kinds, max_tilings):
    """Static rows of a child process that compiles for sm_90 without the interpreter:
    {(kernel, shape, launch as a tuple): row}."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "static.json")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        kind_names = ",".join("gated" if gated else "plain" for gated in kinds)
        (B, N), widths = shapes[0][:2], ",".join(str(s[2]) for s in shapes)
        subprocess.run([sys.executable, os.path.abspath(__file__), "--offline", "--out", out, "--candidates",
                        str(max_tilings), "--widths", widths, "--kinds", kind_names, "--batch-tokens", f"{B},{N}"],
                       env=env, check=True, stdout=subprocess.DEVNULL)
        with open(out) as f:
            rows = json.load(f)["rows"]
    return {(r["kernel"], tuple(r["shape"]), tuple(r["launch"].values())): r for r in rows}


STATIC_KEYS = ("registers", "stack_bytes", "shared_bytes", "blocks_per_sm", "warps_per_sm", "global_loads_by_bytes",
               "error")


def sweep(out_path, shapes, offline, kinds, compiled=True, max_tilings=None, rehearse=False):
    cuda = (torch.cuda.is_available() and not offline) or rehearse
    report = {"timed": cuda, "arch": "sm_90", "torch": torch.__version__, "triton": triton.__version__,
              "git_commit": bench._git_commit(),
              "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(), "rows": []}
    if rehearse:
        bench._rehearse_on_cpu()
        timer, peak = bench._WallTimer(), None
        report.update(device="cpu (rehearsal)", note=bench.REHEARSAL_NOTE, hbm_peak_gbps=None,
                      copy_gbps=bench._copy_bandwidth(timer, numel=2**20) / 1e9, rehearsal=True)
        static_rows = compiled_offline(shapes, kinds, max_tilings)
    elif cuda:
        timer = bench._Timer(quick=True)
        report["device"] = torch.cuda.get_device_name()
        peak = bench._hbm_peak(report["device"])
        report["hbm_peak_gbps"] = peak / 1e9 if peak else None
        report["copy_gbps"] = bench._copy_bandwidth(timer) / 1e9
        major, minor = torch.cuda.get_device_capability()
        report["arch"] = f"sm_{major}{minor}"
    else:
        report["device"] = "none: compiled offline for sm_90, nothing timed"
    arch = int(report["arch"][3:]) if report["arch"][3:] in ("80", "90") else 90
    print(f"device {report['device']}  triton {triton.__version__}  commit {report['git_commit'][:12]}")
    for shape, gated in itertools.product(shapes, kinds):
        B, N, C = shape
        kernel = "gated_residual_adaln" if gated else "adaln_modulate"
        if cuda:
            if compiled:
                torch._dynamo.reset()  # a fresh compile per shape, never the recompile limit's eager fallback
            inputs, grads, impls, _, nbytes = bench._adaln_case(shape, gated)
            compiled_ms = timer.graph(bench._fwd_bwd(impls["compiled"], inputs, grads)) if compiled else None
        for i, launch in enumerate(candidates(C, N)[:max_tilings]):
            row = {"kernel": kernel, "shape": list(shape), "launch": launch._asdict(), "today": i == 0}
            try:
                if rehearse:
                    found = static_rows[(kernel, tuple(shape), tuple(launch))]
                    row.update({k: found[k] for k in STATIC_KEYS if k in found})
                    if "error" in row:
                        raise RuntimeError(row.pop("error"))
                else:
                    row.update(static(shape, launch, gated, arch=arch))
                # the static figure of merit: input bytes in flight per SM (resident programs
                # times the tiles each keeps loading); streaming kernels need ~20-40 KB
                loads = (4 if gated else 2) * 2 * launch.rows * C * max(1, launch.prefetch)
                row["loads_in_flight_kb"] = row["blocks_per_sm"] * loads / 1024
            except Exception as e:  # noqa: BLE001 - a failed candidate is a result, not the end of the sweep
                row["error"] = bench._err(e)
            try:
                if cuda and row.get("stack_bytes", 0) == 0:  # spilling tilings are not worth the time
                    ms, bw = time_candidate(timer, shape, gated, launch, nbytes, inputs, grads, impls["triton"])
                    row.update(fwd_bwd_ms=ms, fwd_bwd_gbps=bw / 1e9, pct_copy=100 * bw / (report["copy_gbps"] * 1e9))
                    if compiled_ms:
                        row["vs_compiled"] = compiled_ms / ms
                    if peak:
                        row["pct_hbm_peak"] = 100 * bw / peak
            except Exception as e:  # noqa: BLE001
                row["timing_error"] = bench._err(e)
            report["rows"].append(row)
            timing = (f"  {row['fwd_bwd_gbps']:6.0f} GB/s {row.get('pct_hbm_peak', 0):4.0f}%pk "
                      f"{row['pct_copy']:4.0f}%copy" if "fwd_bwd_ms" in row else "")
            timing += f" {row['vs_compiled']:.2f}x compile" if "vs_compiled" in row else ""
            timing += f" timing failed: {row['timing_error'][:60]}" if "timing_error" in row else ""
            resources = row.get("error", "")[:60] or (f"regs {row['registers']:3d} stack {row['stack_bytes']:4d} "
                                                      f"warps/SM {row['warps_per_sm']:2d} "
                                                      f"in flight {row['loads_in_flight_kb']:3.0f} KB")
            print(f"{kernel:21s} {B}x{N}x{C:<5d} {'*' if i == 0 else ' '} {describe(launch):42s} {resources}{timing}")
            if out_path:
                with open(out_path, "w") as f:
                    f.write(strict_json.dumps(report, indent=1) + "\n")
        if cuda:
            inputs = grads = impls = None
            torch.cuda.empty_cache()
    print("* = today's launch_config" + (f"; wrote {out_path}" if out_path else ""))
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="write the JSON here")
    parser.add_argument("--offline", action="store_true", help="registers and occupancy only, even on a GPU")
    parser.add_argument("--widths", default=None, help="comma-separated C values to keep from the shape list")
    parser.add_argument("--kinds", default="gated,plain", help="gated (gated_residual_adaln), plain (adaln_modulate)")
    parser.add_argument("--no-compiled", action="store_true",
                        help="skip the torch.compile baseline (its compile takes tens of seconds; kernels.bench has it)")
    parser.add_argument("--candidates", type=int, default=None, help="only the first N tilings (today's first)")
    parser.add_argument("--batch-tokens", default=None, help="B,N: replace every shape's batch and tokens (C kept)")
    parser.add_argument("--rehearse", action="store_true",
                        help="the GPU path on the CPU, today's tiling at B,N = 2,16 (needs TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    if args.rehearse:
        args.candidates, args.batch_tokens = 1, args.batch_tokens or "2,16"
    elif interpreter_on():
        parser.error("TRITON_INTERPRET is set: the kernels must be compiled, not interpreted; unset it")
    if not registers.available():
        print("this triton install bundles no ptxas/cuobjdump; cannot compile offline")
        return 1
    shapes = SHAPES
    if args.widths:
        keep = {int(w) for w in args.widths.split(",")}
        shapes = [s for s in SHAPES if s[2] in keep]
        if not shapes:
            parser.error(f"--widths {args.widths}: none of {[s[2] for s in SHAPES]}")
    if args.batch_tokens:
        B, N = (int(v) for v in args.batch_tokens.split(","))
        shapes = [(B, N, C) for _, _, C in shapes]
    kinds = []
    for k in args.kinds.split(","):
        if k not in ("gated", "plain"):
            parser.error(f"--kinds: unknown kind {k!r}; use gated and/or plain")
        kinds.append(k == "gated")
    sweep(args.out, shapes, args.offline, kinds, compiled=not args.no_compiled, max_tilings=args.candidates,
          rehearse=args.rehearse)
    return 0


if __name__ == "__main__":
    sys.exit(main())
