"""Side-by-side kernel benchmarks on one CUDA device: `python -m flowpre.kernels.bench --out FILE [--quick]`.

Every number in a run comes from the same device and process, so the ratios are the
result; absolute figures always travel with the device name. A kernel that fails
records its error text in its row and the run goes on.

Conventions
- Attention: bf16, non-causal, H = 16 heads and B = 2**16 // N, so B*H*N = 2**20
  token-heads at every N. FLOPs 4*B*H*N^2*D forward, 2.5x that backward (3.5x for
  forward+backward). The baseline is F.scaled_dot_product_attention with the flash
  backend forced, or PyTorch's own choice where flash refuses (recorded per row).
- Memory-bound kernels: bf16. Bandwidth counts the minimal bytes, each input read
  once and each output written once (R = B*N rows, s = 2 bytes):
    adaln_modulate        fwd (2RC + 2BC) s          fwd+bwd (5RC + 5BC) s
    gated_residual_adaln  fwd (4RC + 3BC) s          fwd+bwd (10RC + 8BC) s
    flow_loss             fwd 2Ms                    fwd+bwd 5Ms      (M = numel)
  Forward is timed with inputs that require grad (the training forward); fwd+bwd
  calls torch.autograd.grad with random output grads. The same byte count divides
  every implementation's time: eager is the PyTorch reference, compiled is
  torch.compile(reference, dynamic=False).
- Memory-bound rows carry two timings. Plain (fwd, fwd_bwd): triton's do_bench,
  wall time per call with an L2 flush before each, so the host's launch cost shows
  whenever it exceeds the GPU time (it does for small shapes, and the autograd
  engine's thread hand-off adds to every backward). Graph (fwd_graph,
  fwd_bwd_graph): the same calls captured in a CUDA graph after an L2 flush each,
  minus the flushes alone: GPU time only, the figure to hold against HBM peak.
  flow_loss has no graph timing: its reference's bincount syncs with the host.
- Reported against the HBM peak of the device (table below) and against a
  device-to-device copy measured in the same run.
- --rehearse runs every row's code on the CPU (TRITON_INTERPRET=1, set before python
  starts) at one tiny shape per kernel, wall-clock timed, with torch.compile's eager
  backend: it checks the script before GPU time is spent on it, and measures nothing.
  Only the CUDA graph capture and the L2 flush have no CPU stand-in.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from .adaln import adaln_modulate, adaln_modulate_reference, gated_residual_adaln, gated_residual_adaln_reference
from .attention import attention
from .backend import interpreter_on
from .loss import flow_loss, flow_loss_reference

DEVICE = "cuda"  # module constants so that a rehearsal (--rehearse) can point them at the CPU
COMPILE_BACKEND = "inductor"
TOKEN_HEADS = 2**20  # B*H*N of every attention row
REHEARSAL_NOTE = ("rehearsal on the CPU: Triton interpreter, one tiny shape per kernel, wall clock, "
                  "torch.compile's eager backend; these times are not performance figures")
NO_GPU = "flowpre bench kernels needs a CUDA GPU; nothing measured"
# bytes/s, matched against the device name in order (the PCIe and NVL parts differ)
HBM_PEAK = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "H100": 3.35e12, "A100": 2.04e12}

ATTN_FULL = [(n, d) for n in (256, 1024, 4096) for d in (64, 72, 128)]
# Text cross-attention: DiT image tokens against 77 CLIP tokens (M, N, D).
ATTN_CROSS = [(256, 77, 72), (1024, 77, 72), (4096, 77, 128)]
ATTN_QUICK = [(1024, 72), (4096, 128)]
ADALN_FULL = [(64, 256, 1152), (32, 1024, 1152), (256, 256, 768), (256, 64, 384), (128, 256, 1024)]
ADALN_QUICK = [(32, 1024, 1152)]
LOSS_FULL = [(256, 4, 32, 32), (256, 4, 64, 64), (64, 16, 128, 128)]
LOSS_QUICK = [(256, 4, 64, 64)]
ATTN_REHEARSAL, ADALN_REHEARSAL, LOSS_REHEARSAL = [(64, 32)], [(2, 16, 64)], [(2, 4, 8, 8)]


def _git_commit():
    if os.environ.get("FLOWPRE_COMMIT"):
        return os.environ["FLOWPRE_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _hbm_peak(name):
    for key, peak in HBM_PEAK.items():
        if key in name:
            return peak
    return None


def _err(e):
    return f"{type(e).__name__}: {e}"[:800]


class _Timer:
    def __init__(self, quick):
        import triton.testing
        self._do_bench = triton.testing.do_bench
        self.warmup, self.rep = (10, 40) if quick else (25, 100)

    def __call__(self, fn):
        fn()  # compile / autotune outside the timed region
        torch.cuda.synchronize()
        return self._do_bench(fn, warmup=self.warmup, rep=self.rep, return_mode="median")

    def graph(self, fn, reps=20):
        """GPU time of fn with the host's launch cost taken out: fn captured `reps` times
        into one CUDA graph, each call after an L2 flush, minus a graph of the flushes."""
        flush = torch.empty(2**28, device=DEVICE, dtype=torch.int8)

        def captured(body):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # autograd wants its warm-up off the default stream
                for _ in range(2):
                    body()
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(reps):
                    body()
            return g

        def replay_ms(g):
            times = []
            for _ in range(5):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                g.replay()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            return sorted(times)[2]

        with_fn = replay_ms(captured(lambda: (flush.zero_(), fn())))
        alone = replay_ms(captured(flush.zero_))
        return max(with_fn - alone, 1e-6) / reps


class _WallTimer:
    """The rehearsal's timer: one call's wall time after a warm-up call. A CPU has neither
    CUDA events nor graphs, so `graph` times the same way."""

    def __call__(self, fn):
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    def graph(self, fn):
        return self(fn)


def _compile(fn):
    return torch.compile(fn, dynamic=False, backend=COMPILE_BACKEND)


def _copy_bandwidth(timer, numel=2**28):
    src = torch.empty(numel, device=DEVICE, dtype=torch.float16)  # 512 MiB each way on a GPU
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def _as_tuple(outs):
    return outs if isinstance(outs, tuple) else (outs,)


def _fwd_bwd(fn, inputs, grads):
    """fn(*inputs), then the grads of the inputs that require grad. Fresh leaves each
    call: a leaf's accumulate node takes the stream it was made on, and one made on the
    default stream breaks CUDA graph capture on a side stream."""
    def run():
        ins = [t.detach().requires_grad_() if t.requires_grad else t for t in inputs]
        outs = _as_tuple(fn(*ins))
        outs, gs = zip(*[(o, g) for o, g in zip(outs, grads) if g is not None])
        return torch.autograd.grad(outs, [t for t in ins if t.requires_grad], gs)
    return run


# ----------------------------------------------------------------------------- attention

def _sdpa_choice(q, k, v):
    """A callable running SDPA, flash forced where it applies, and its name."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def flash(q, k, v):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v)
    try:
        flash(q, k, v).sum().backward()
        q.grad = k.grad = v.grad = None
        return flash, "flash"
    except RuntimeError as e:
        return F.scaled_dot_product_attention, f"pytorch default (flash refused: {_err(e)[:200]})"


def _attention_rows(timer, configs):
    """configs: (N, D) for self-attention, (M, N, D) for M queries against N keys."""
    rows = []
    for cfg in configs:
        m, n, d = cfg if len(cfg) == 3 else (cfg[0], *cfg)
        heads = 16
        batch = max(1, TOKEN_HEADS // (heads * m))
        row = {"kernel": "attention", "shape": [batch, heads, m, d], "dtype": "bf16", "results": {}}
        if n != m:
            row["kv_len"] = n
        flops = 4 * batch * heads * m * n * d
        try:
            q = torch.randn(batch, heads, m, d, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
            k, v = (torch.randn(batch, heads, n, d, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
                    for _ in range(2))
            do = torch.randn_like(q)
            sdpa, row["sdpa_backend"] = _sdpa_choice(q, k, v)
            impls = {"triton": lambda *a: attention(*a, backend="triton"), "sdpa": sdpa}
            with torch.no_grad():
                ref = sdpa(q, k, v).float()
        except Exception as e:  # noqa: BLE001 - a row's failure must not end the run
            row["error"] = _err(e)
            rows.append(row)
            continue
        for name, fn in impls.items():
            res = row["results"][name] = {}
            try:
                with torch.no_grad():
                    res["max_abs_err_vs_sdpa"] = (fn(q, k, v).float() - ref).abs().max().item()
                res["fwd_ms"] = timer(lambda: fn(q, k, v))
                res["fwd_tflops"] = flops / (res["fwd_ms"] * 1e-3) / 1e12
                res["fwd_bwd_ms"] = timer(_fwd_bwd(fn, (q, k, v), (do,)))
                res["fwd_bwd_tflops"] = 3.5 * flops / (res["fwd_bwd_ms"] * 1e-3) / 1e12
            except Exception as e:  # noqa: BLE001
                res["error"] = _err(e)
        t, s = row["results"].get("triton", {}), row["results"].get("sdpa", {})
        for mode in ("fwd_ms", "fwd_bwd_ms"):
            if mode in t and mode in s:
                row[f"speedup_vs_sdpa_{mode[:-3]}"] = s[mode] / t[mode]
        rows.append(row)
        q = k = v = do = ref = None  # free this shape's tensors before the next
        torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- memory-bound

def _adaln_case(shape, gated):
    b, n, c = shape
    mk = lambda *s: torch.randn(*s, device=DEVICE, dtype=torch.bfloat16).requires_grad_()  # noqa: E731
    x, shift, scale = mk(b, n, c), mk(b, c), mk(b, c)
    if gated:
        y, gate = mk(b, n, c), mk(b, c)
        inputs = (x, y, gate, shift, scale)
        grads = (torch.randn_like(x), torch.randn_like(x))
        impls = {"triton": lambda *a: gated_residual_adaln(*a, backend="triton"),
                 "eager": gated_residual_adaln_reference,
                 "compiled": _compile(gated_residual_adaln_reference)}
        fwd_bytes, bwd_bytes = (4 * b * n * c + 3 * b * c) * 2, (10 * b * n * c + 8 * b * c) * 2
    else:
        inputs = (x, shift, scale)
        grads = (torch.randn_like(x),)
        impls = {"triton": lambda *a: adaln_modulate(*a, backend="triton"),
                 "eager": adaln_modulate_reference,
                 "compiled": _compile(adaln_modulate_reference)}
        fwd_bytes, bwd_bytes = (2 * b * n * c + 2 * b * c) * 2, (5 * b * n * c + 5 * b * c) * 2
    return inputs, grads, impls, fwd_bytes, bwd_bytes


def _loss_case(shape):
    b = shape[0]
    pred = torch.randn(*shape, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randn(*shape, device=DEVICE, dtype=torch.bfloat16)
    weight = torch.rand(b, device=DEVICE) + 0.5
    groups = 8
    group = torch.randint(0, groups, (b,), device=DEVICE)
    compiled = _compile(flow_loss_reference)
    impls = {"triton": lambda p, t, w, g: flow_loss(p, t, w, g, groups, backend="triton"),
             "eager": lambda p, t, w, g: flow_loss_reference(p, t, w, g, groups),
             "compiled": lambda p, t, w, g: compiled(p, t, w, g, groups)}
    m = pred.numel() * 2
    return (pred, target, weight, group), (torch.ones((), device=DEVICE), None), impls, 2 * m, 5 * m


def _memory_rows(timer, kernel, shapes, make, peak, copy_bw, graph=True):
    rows = []
    for shape in shapes:
        torch._dynamo.reset()  # a fresh compile per shape, never the recompile limit's eager fallback
        row = {"kernel": kernel, "shape": list(shape), "dtype": "bf16", "results": {}}
        try:
            inputs, grads, impls, fwd_bytes, fb_bytes = make(shape)
            row["bytes_fwd"], row["bytes_fwd_bwd"] = fwd_bytes, fb_bytes
            with torch.no_grad():
                ref = _as_tuple(impls["eager"](*inputs))
        except Exception as e:  # noqa: BLE001
            row["error"] = _err(e)
            rows.append(row)
            continue
        for name, fn in impls.items():
            res = row["results"][name] = {}
            try:
                out = _as_tuple(fn(*inputs))  # with grad on: no separate inference compile
                res["max_abs_err_vs_eager"] = max((o.float() - r.float()).abs().max().item()
                                                  for o, r in zip(out, ref) if o.numel() > 0)
                calls = (("fwd", fwd_bytes, lambda: fn(*inputs)), ("fwd_bwd", fb_bytes, _fwd_bwd(fn, inputs, grads)))
                for mode, nbytes, call in calls:
                    for key, how in ((mode, timer), (f"{mode}_graph", timer.graph))[:2 if graph else 1]:
                        try:
                            ms = how(call)
                        except Exception as e:  # noqa: BLE001 - e.g. a path that cannot be captured
                            res[f"{key}_error"] = _err(e)
                            continue
                        bw = nbytes / (ms * 1e-3)
                        res[f"{key}_ms"], res[f"{key}_gbps"] = ms, bw / 1e9
                        res[f"{key}_pct_copy"] = 100 * bw / copy_bw
                        if peak:
                            res[f"{key}_pct_hbm_peak"] = 100 * bw / peak
            except Exception as e:  # noqa: BLE001
                res["error"] = _err(e)
        t = row["results"].get("triton", {})
        for other in ("eager", "compiled"):
            o = row["results"].get(other, {})
            for mode in ("fwd", "fwd_bwd", "fwd_graph", "fwd_bwd_graph"):
                if f"{mode}_ms" in t and f"{mode}_ms" in o:
                    row[f"speedup_vs_{other}_{mode}"] = o[f"{mode}_ms"] / t[f"{mode}_ms"]
        rows.append(row)
        inputs = grads = impls = ref = None  # free this shape's tensors before the next
        torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- report

def _print_header(report):
    print(f"device {report['device']}  torch {report['torch']}  triton {report['triton']}  "
          f"commit {report['git_commit'][:12]}  copy {report['copy_gbps']:.0f} GB/s  "
          f"HBM peak {report['hbm_peak_gbps'] or 'unknown'} GB/s")


def _print_rows(rows):
    for row in rows:
        shape = "x".join(map(str, row["shape"])) + (f" kv{row['kv_len']}" if "kv_len" in row else "")
        if "error" in row:
            print(f"{row['kernel']:22s} {shape:18s} ERROR {row['error'][:100]}")
            continue
        unit, label = ("tflops", "TF/s") if row["kernel"] == "attention" else ("gbps", "GB/s")
        modes = ("fwd", "fwd_graph", "fwd_bwd", "fwd_bwd_graph")
        for mode in modes:
            cells = []
            for name, res in row["results"].items():
                err = res.get("error" if mode == "fwd" else "") or res.get(f"{mode}_error")
                if err:
                    cells.append(f"{name} ERROR({err[:60]})")
                elif f"{mode}_ms" in res:
                    extra = f" {res[f'{mode}_pct_hbm_peak']:.0f}%pk" if f"{mode}_pct_hbm_peak" in res else ""
                    cells.append(f"{name} {res[f'{mode}_ms']:.3f}ms {res[f'{mode}_{unit}']:.0f}{label}{extra}")
            if not cells:
                continue
            ratios = " ".join(f"{k[8:-len(mode) - 1]}={v:.2f}x" for k, v in row.items()
                              if k.startswith("speedup_") and k.endswith("_" + mode))
            print(f"{row['kernel']:22s} {shape:18s} {mode:13s} " + " | ".join(cells) + f"  {ratios}")


def _rehearse_on_cpu():
    """Points the rows at the CPU; the kernels run only if the interpreter was on at import."""
    global DEVICE, COMPILE_BACKEND, TOKEN_HEADS
    if not interpreter_on():
        raise SystemExit("--rehearse runs the kernels through the Triton interpreter: "
                         "start python with TRITON_INTERPRET=1")
    DEVICE, COMPILE_BACKEND, TOKEN_HEADS = "cpu", "eager", 16 * ATTN_REHEARSAL[0][0]


def run_benchmarks(out_path=None, quick=False, rehearse=False):
    """Measure every kernel against its baselines; returns the report (also written to out_path).
    rehearse: the same rows on the CPU at one tiny shape each (see the module's notes)."""
    if rehearse:
        _rehearse_on_cpu()
        timer, name, peak = _WallTimer(), "cpu (rehearsal)", None
        copy_bw = _copy_bandwidth(timer, numel=2**20)
    elif not torch.cuda.is_available():
        print(NO_GPU)
        return {"status": "skipped", "reason": NO_GPU}
    else:
        timer = _Timer(quick)
        name = torch.cuda.get_device_name()
        peak = _hbm_peak(name)
        copy_bw = _copy_bandwidth(timer)
    import triton

    report = {"status": "rehearsal" if rehearse else "ok", "device": name, "torch": torch.__version__,
              "triton": triton.__version__, "git_commit": _git_commit(),
              "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "quick": quick, "hbm_peak_gbps": peak / 1e9 if peak else None, "copy_gbps": copy_bw / 1e9,
              "conventions": __doc__.split("Conventions", 1)[1].strip(), "rows": []}
    if rehearse:
        report["note"] = REHEARSAL_NOTE
        print(REHEARSAL_NOTE)
    pick = lambda full, fast, tiny: tiny if rehearse else fast if quick else full  # noqa: E731
    shapes = pick(ADALN_FULL, ADALN_QUICK, ADALN_REHEARSAL)
    attn = os.environ.get("FLOWPRE_BENCH_ATTN")  # e.g. "256:72,1024:77:64": N:D or M:N:D to time
    attn_shapes = [tuple(int(v) for v in p.split(":")) for p in attn.split(",")] if attn and not rehearse else None
    sections = [
        lambda: _memory_rows(timer, "gated_residual_adaln", shapes, lambda s: _adaln_case(s, True), peak, copy_bw),
        lambda: _memory_rows(timer, "adaln_modulate", shapes, lambda s: _adaln_case(s, False), peak, copy_bw),
        lambda: _attention_rows(timer, attn_shapes or pick(ATTN_FULL + ATTN_CROSS, ATTN_QUICK, ATTN_REHEARSAL)),
        # no graph timing for the loss: the reference's bincount syncs with the host, which
        # graph capture forbids (and a failed capture can poison the CUDA context)
        lambda: _memory_rows(timer, "flow_loss", pick(LOSS_FULL, LOSS_QUICK, LOSS_REHEARSAL), _loss_case, peak,
                             copy_bw, graph=False)]
    _print_header(report)
    for section in sections:  # printed and saved as each ends: a run cut off by a lease keeps what it measured
        rows = section()
        _print_rows(rows)
        report["rows"] += rows
        if out_path:
            with open(out_path, "w") as f:
                json.dump(report, f, indent=1)
    if out_path:
        print(f"wrote {out_path}")
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(prog="flowpre bench kernels", description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="write the JSON report here")
    parser.add_argument("--quick", action="store_true", help="a reduced set, under 2 minutes with compiles")
    parser.add_argument("--rehearse", action="store_true",
                        help="run every row on the CPU at one tiny shape (needs TRITON_INTERPRET=1); measures nothing")
    args = parser.parse_args(argv)
    run_benchmarks(args.out, args.quick, args.rehearse)
    return 0


if __name__ == "__main__":
    sys.exit(main())
