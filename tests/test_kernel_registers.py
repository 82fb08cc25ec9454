"""Registers, spills and occupancy of the adaLN kernels, compiled offline for sm_90.

No GPU is needed: triton's wheel carries ptxas. The compile runs in a subprocess
because this process has the interpreter on, and interpreted kernels cannot be compiled.
These are the properties the tiling in flowpre/kernels/adaln.py is chosen for, so a Triton
upgrade or a kernel edit that breaks them fails here rather than only on a GPU.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from flowpre.kernels import registers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# DiT-S/B/L/XL widths, and Flux's 3072, at DiT token counts
SHAPES = [(256, 64, 384), (256, 256, 768), (64, 256, 1024), (32, 1024, 1152), (8, 1024, 3072)]

needs_ptxas = pytest.mark.skipif(not registers.available(), reason="this triton wheel bundles no ptxas")


def _compiled(args, timeout=600, returncode=0):
    """Run python with `args` in the repo with the interpreter off (kernels compiled, not
    interpreted); returns the finished process after checking its exit status."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == returncode, done.stderr[-3000:]
    return done


def _last_json(done):
    return json.loads(done.stdout.strip().splitlines()[-1])


def _compile_report(shapes):
    script = f"""
import json, sys
sys.path.insert(0, {os.path.join(ROOT, 'benchmarks')!r})
import adaln_sweep
from flowpre.kernels import adaln
out = []
for B, N, C in {shapes!r}:
    for gated in (True, False):
        for backward in (True, False):
            launch = adaln.launch_config(C, N, backward=backward)
            res = adaln_sweep.static((B, N, C), launch, gated, backward=backward)
            out.append(dict(C=C, gated=gated, backward=backward, launch=launch._asdict(), **res))
# what the backward's grid sizing reads from a kernel compiled on the GPU
from flowpre.kernels import registers
import triton.language as tl
B, N, C = {shapes[-2]!r}
launch = adaln.launch_config(C, N, backward=True)
n_chunks, per = adaln.backward_grid(B, N, launch.rows, 396)
compiled = registers.compile_offline(adaln._adaln_bwd_kernel, dict(
    X="*bf16", Y="*bf16", GATE="*bf16", SCALE="*bf16", MEAN="*fp32", RSTD="*fp32", DH="*bf16", DOUT="*bf16",
    DX="*bf16", DY="*bf16", PART="*fp32", N=N, C=C, n_chunks=n_chunks, tiles_per_prog=per),
    dict(RESIDUAL=True, ACC=tl.float32, PREFETCH=launch.prefetch, **launch.constexprs()), launch.num_warps)
out.append(dict(resident=registers.resident_programs(compiled, launch.num_warps)))
print(json.dumps(out))
"""
    return _last_json(_compiled(["-c", script]))


@needs_ptxas
def test_adaln_tilings_do_not_spill_and_backward_keeps_occupancy():
    report = _compile_report(SHAPES)
    assert len(report) == 4 * len(SHAPES) + 1
    resident = report.pop()["resident"]
    for r in report:
        what = f"C={r['C']} gated={r['gated']} backward={r['backward']} {r['launch']}"
        assert r["stack_bytes"] == 0, f"register spill: {what}: {r}"
        assert 0 < r["registers"] <= 255, what
    xl = {(r["gated"], r["backward"]): r for r in report if r["C"] == 1152}
    # the reason for split columns: the gated backward at DiT-XL width keeps three
    # programs per SM with two tiles in flight (the padded tiling fits two, with one)
    assert xl[True, True]["launch"]["prefetch"] == 2
    assert xl[True, True]["blocks_per_sm"] >= 3, xl[True, True]
    assert resident == xl[True, True]["blocks_per_sm"]  # the runtime's reading agrees
    # and the 1024-column block loads 16 bytes per thread: Triton proved the alignment
    assert "16" in xl[True, True]["global_loads_by_bytes"], xl[True, True]


def test_specialisation_follows_the_jit():
    sig, consts, attrs = registers._specialise(_FakeFn(), dict(P="*bf16", n=1024, m=33, one=1, eps=1e-6), {"K": 4})
    assert sig == {"P": "*bf16", "n": "i32", "m": "i32", "one": "constexpr", "eps": "fp32", "K": "constexpr"}
    assert consts == {"K": 4, "one": 1}
    assert attrs == {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]]}
    with pytest.raises(ValueError, match=r"missing arguments \['m'\].*unknown \['bogus'\]"):
        registers._specialise(_FakeFn(), dict(P="*bf16", n=16, one=1, eps=0.5, bogus=3), {"K": 4})


def test_interpreted_kernel_is_refused_with_a_reason():
    try:
        from flowpre.kernels import adaln
    except ImportError:
        from flowpre.kernels import adaln
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("kernels are compiled in this process (CUDA run)")
    with pytest.raises(TypeError, match="TRITON_INTERPRET"):
        registers.resources(adaln._adaln_fwd_kernel, {}, {}, 4)


def test_load_widths_from_ptx():
    ptx = """
    @%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
    @%p2 ld.global.b16 { %rs1 }, [ %rd2 + 0 ];
    ld.global.L1::evict_last.v2.b32 { %r5, %r6 }, [ %rd3 + 0 ];
    @%p2 ld.global.b16 { %rs2 }, [ %rd4 + 0 ];
    st.global.v4.b32 [ %rd5 + 0 ], { %r1, %r2, %r3, %r4 };
    """
    assert registers._load_widths(ptx) == {2: 2, 8: 1, 16: 1}


def test_occupancy_limits():
    assert registers.occupancy(255, 1024, 4) == 2  # registers bind
    assert registers.occupancy(32, 0, 4) == 16  # warps bind (64 per SM)
    assert registers.occupancy(32, 100 * 1024, 1) == 2  # shared memory binds
    assert registers.occupancy(16, 0, 1, arch=80) == 32  # the block limit


class _FakeFn:
    __name__ = "fake"
    arg_names = ["P", "n", "m", "one", "eps", "K"]


@needs_ptxas
def test_sweep_offline_reports_every_candidate(tmp_path):
    out = tmp_path / "sweep.json"
    _compiled(["benchmarks/adaln_sweep.py", "--offline", "--widths", "384", "--kinds", "plain", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["timed"] is False and "nothing timed" in report["device"]
    rows = report["rows"]
    assert rows[0]["today"] and not any(r["today"] for r in rows[1:])
    assert len({json.dumps(r["launch"], sort_keys=True) for r in rows}) == len(rows) >= 20
    for r in rows:
        assert "error" not in r, r
        assert r["kernel"] == "adaln_modulate" and r["shape"] == [256, 64, 384]
        assert r["registers"] > 0 and r["loads_in_flight_kb"] > 0
    bad = _compiled(["benchmarks/adaln_sweep.py", "--widths", "999"], timeout=120, returncode=2)
    assert "--widths 999" in bad.stderr


@needs_ptxas
def test_backward_reads_its_occupancy_from_a_real_compile():
    """adaln_backward's own warmup call, compiled for sm_90 under a stand-in CUDA driver
    (no GPU here), yields the occupancy the grid is sized by: 3 programs on each of 132 SMs
    for the gated backward at DiT-XL width."""
    script = """
import sys, types, torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

class StandInCuda:  # what JITFunction.warmup asks of a driver; nothing is launched
    def get_current_device(self): return 0
    def get_current_stream(self, device=None): return 0
    def get_current_target(self): return GPUTarget("cuda", 90, 32)
    def get_active_torch_device(self): return torch.device("cpu")
driver.set_active(StandInCuda())
from flowpre.kernels import adaln
torch.cuda.get_device_properties = lambda d: types.SimpleNamespace(multi_processor_count=132)
real = adaln._backward_slots

class Stop(Exception):
    pass

def on_gpu(device, *rest):
    raise Stop(real(torch.device("cuda", 0), *rest))
adaln._backward_slots = on_gpu
B, N, C = 32, 1024, 1152
g = torch.Generator().manual_seed(0)
h, y, dh, dout = (torch.randn(B, N, C, generator=g).bfloat16() for _ in range(4))
gate, scale = (torch.randn(B, C, generator=g).bfloat16() for _ in range(2))
mean, rstd = torch.randn(B, N), torch.rand(B, N)
try:
    adaln.adaln_backward(h, scale, mean, rstd, dout, y=y, gate=gate, dh=dh)
except Stop as stop:
    print("slots", stop.args[0])
"""
    done = _compiled(["-c", script])
    assert "occupancy unknown" not in done.stderr, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "slots 396", done.stdout


@needs_ptxas
def test_attention_gpu_path_compiles_for_sm90():
    """The interpreter runs attention with fp32 tiles; on a GPU the tiles are 16-bit and go
    to tensor cores, a path only a GPU compile exercises. Each kernel's untuned config (the
    first of its pool) is compiled here as the launcher would for a bf16 DiT head (D = 72)
    and a wide fp16 head (D = 200); at DiT shapes it must not spill."""
    script = """
import importlib, json, torch
A = importlib.import_module("flowpre.kernels.attention")
K = importlib.import_module("flowpre.kernels.attention_kernels")
from flowpre.kernels import registers
out = []
for D, dtype in ((72, torch.bfloat16), (200, torch.float16)):
    q = torch.empty(4, 16, 1024, D, dtype=dtype, device="meta")
    meta, align = A._meta(q), A._align(q)
    strides = A._strides(q, align)
    width = meta["DL"] + meta["DH"]
    pool = "small" if width <= 128 else "large"
    tp = "*bf16" if dtype == torch.bfloat16 else "*fp16"
    for name, kernel, table, outer_is_m in (("fwd", K._fwd_kernel, "fwd", True),
                                            ("dkdv", K._bwd_dkdv_kernel, "bwd", False),
                                            ("dq", K._bwd_dq_kernel, "bwd", True)):
        a, b, warps, stages = K._TABLES[table][pool][0]
        consts = dict(meta, ALIGN=align, BLOCK_M=a if outer_is_m else b, BLOCK_N=b if outer_is_m else a)
        args = dict(H=16, M=1024, N=1024, M_BUCKET=1024, N_BUCKET=1024, qk_scale=0.1)
        for arg in kernel.arg_names:
            if arg in consts or arg in args:
                continue
            if arg == "EVEN_N":
                consts[arg] = True
            elif arg == "scale":
                args[arg] = 0.1
            elif arg in ("LSE", "DELTA"):
                args[arg] = "*fp32"
            elif arg.isupper():
                args[arg] = tp
            else:  # a stride: b, h or n by its last letter
                args[arg] = strides["bhn".index(arg[-1])]
        res = registers.resources(kernel, args, consts, warps, num_stages=stages)
        out.append(dict(D=D, kernel=name, pool=pool, stack=res["stack_bytes"], registers=res["registers"]))
print(json.dumps(out))
"""
    report = _last_json(_compiled(["-c", script], timeout=900))
    assert {(r["D"], r["kernel"]) for r in report} == {(d, k) for d in (72, 200) for k in ("fwd", "dkdv", "dq")}
    for r in report:
        assert r["registers"] > 0, r
        if r["pool"] == "small":  # the DiT head dims: no spills
            assert r["stack"] == 0, r


@needs_ptxas
def test_loss_and_attention_delta_kernels_compile_for_sm90():
    """The remaining kernels' GPU builds (bf16, a DiT-XL/2 latent batch), none spilling."""
    script = """
import importlib, json
import triton.language as tl
K = importlib.import_module("flowpre.kernels.attention_kernels")
L = importlib.import_module("flowpre.kernels.loss")
from flowpre.kernels import registers
M, B = 4 * 32 * 32, 256
block, warps = L._block(M)
cases = [
    (L._sq_err_kernel, dict(P="*bf16", T="*bf16", PART="*fp32", M=M, n_chunks=5, tiles_per_prog=3),
     dict(BLOCK=block, ACC=tl.float32), warps),
    (L._finish_kernel, dict(PART="*fp32", WEIGHT="*fp32", GROUP="*i64", TOTAL="*fp32", GROUPS="*fp32",
                            MEANS="*fp32", B=B, M=M, n_chunks=5, G=8),
     dict(BLOCK_B=128, BLOCK_K=8, BLOCK_G=8, ACC=tl.float32), 4),
    (L._loss_bwd_kernel, dict(P="*bf16", T="*bf16", WEIGHT="*fp32", GRAD="*fp32", DPRED="*bf16", B=B, M=M),
     dict(BLOCK=block, ACC=tl.float32), warps),
    (K._bwd_delta_kernel, dict(O="*bf16", DO="*bf16", DELTA="*fp32", sob=147456, soh=9216, son=9, sdb=147456,
                               sdh=9216, sdn=9, H=16, M=1024),
     dict(D=72, BLOCK_D=128, ALIGN=8, ACC=tl.float32, BLOCK_M=64), 4),
]
print(json.dumps([dict(name=k.fn.__name__ if hasattr(k, "fn") else k.__name__, **registers.resources(k, a, c, w))
                  for k, a, c, w in cases]))
"""
    report = _last_json(_compiled(["-c", script]))
    assert len(report) == 4
    for r in report:
        assert r["registers"] > 0 and r["stack_bytes"] == 0, r


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), reason="needs the interpreter (CPU run)")
def test_sweep_timing_path_runs_with_stand_ins(tmp_path, monkeypatch):
    """The sweep's GPU branch (timing, ratios, % of peak), driven on CPU: CUDA queries and the
    timer are stand-ins and the kernels run in the interpreter at a small shape."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("adaln_sweep", os.path.join(ROOT, "benchmarks", "adaln_sweep.py"))
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    calls = []

    class Timer:
        def __init__(self, quick):
            pass

        def graph(self, fn):
            fn()  # one real forward+backward through the interpreter
            calls.append(1)
            return 0.5

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(sweep.bench, "DEVICE", "cpu")
    monkeypatch.setattr(sweep.bench, "_Timer", Timer)
    monkeypatch.setattr(sweep.bench, "_copy_bandwidth", lambda timer: 3.0e12)
    out = tmp_path / "sweep.json"
    # compiled=False: Dynamo would ask the stand-in CUDA for its RNG state
    report = sweep.sweep(str(out), [(2, 9, 40)], offline=False, kinds=[True], compiled=False)
    assert report["timed"] and report["arch"] == "sm_90" and report["copy_gbps"] == 3000
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == len(sweep.candidates(40, 9)) == len(calls)
    for r in rows:
        assert "error" in r  # interpreted kernels cannot be compiled for sm_90 in this process
        assert "timing_error" not in r, r["timing_error"]
        assert r["fwd_bwd_ms"] == 0.5 and r["pct_hbm_peak"] > 0 and r["pct_copy"] > 0
        assert r["pct_copy"] == pytest.approx(r["pct_hbm_peak"] * 3.35 / 3.0)  # H100 SXM peak 3.35 TB/s
