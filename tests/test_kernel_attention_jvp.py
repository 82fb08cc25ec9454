"""Forward-mode flash attention (flowpre/kernels/attention_jvp.py) against torch.func.jvp.

On a machine without CUDA the kernel runs through the Triton interpreter (conftest.py
switches it on), so sizes stay small. The reference is torch.func.jvp of
scaled_dot_product_attention on its math path, in float64, from the very inputs the
kernel saw (16-bit inputs are rounded first, then upcast). Error measure, for the
output and for its tangent separately:
    rel_err(a, ref) = max|a - ref| / max|ref|
Bounds, per dtype:
- fp64 1e-12 under the interpreter (float64 throughout, the scale included); 1e-6
  compiled, where Triton passes the float scale as fp32 (a 6e-8 relative error in
  every score).
- fp32 2e-5 (measured: ~5e-7). Sums run over up to 200 keys, and the tangent is the
  difference (acc_t - mu acc_o) / l of two terms of similar size, which can cost a
  digit to cancellation; on a GPU the products are ieee fp32 or 3xTF32.
- fp16/bf16 2e-2, the plain attention tests' bound (~5 bf16 ulps). Rounding the
  result alone costs up to 2^-8 = 3.9e-3 (the interpreter rounds toward zero); on a
  GPU P and P o tS also enter the tensor-core products rounded to 16 bits (2^-9 each,
  partly averaging out over keys) and the cancellation above can magnify that.
"""
import importlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

jvp = importlib.import_module("flowpre.kernels.attention_jvp")
attn = importlib.import_module("flowpre.kernels.attention")
registers = importlib.import_module("flowpre.kernels.registers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
TOL = {torch.float64: 1e-12 if INTERPRETED else 1e-6, torch.float32: 2e-5,
       torch.float16: 2e-2, torch.bfloat16: 2e-2}


def rel_err(a, ref, denom=None):
    a, ref = a.detach().double(), ref.detach().double()
    assert torch.isfinite(a).all(), "non-finite values in kernel output"
    return ((a - ref).abs().max() / (ref.abs().max() if denom is None else denom)).item()


def rand(shape, dtype, device, gen):
    """Standard normal, generated in fp32 on the CPU then rounded and moved."""
    return torch.randn(shape, generator=gen, device="cpu").to(device=device, dtype=dtype)


def func_jvp64(q, k, v, tq, tk, tv, scale):
    """torch.func.jvp through SDPA's math path in float64; None tangents are zeros."""
    primals = tuple(t.detach().double() for t in (q, k, v))
    tangents = tuple(torch.zeros_like(p) if t is None else t.detach().double()
                     for t, p in zip((tq, tk, tv), primals))
    with sdpa_kernel([SDPBackend.MATH]):  # the fused kernels refuse forward-mode AD
        return torch.func.jvp(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, scale=scale),
                              primals, tangents)


def check(q, k, v, tq, tk, tv, scale, out, tangent_out, tol):
    ref_out, ref_t = func_jvp64(q, k, v, tq, tk, tv, scale)
    assert out.shape == tangent_out.shape == q.shape and out.dtype == tangent_out.dtype == q.dtype
    # Some tangents are exactly zero (one key and no tv: the softmax is constant); measure
    # those against the output's scale rather than their own zero maximum.
    t_denom = ref_out.abs().max().item() if ref_t.abs().max().item() < 1e-12 else None
    errs = {"out": rel_err(out, ref_out), "tangent_out": rel_err(tangent_out, ref_t, t_denom)}
    bad = {name: e for name, e in errs.items() if not e < tol}
    assert not bad, f"relative errors over {tol}: {bad} (all: {errs})"
    return errs


# (M, N, D): odd sizes; several query and key blocks with a ragged last one; D = 72 (the
# DiT-XL head, 64 + 16 columns), D = 33 (32 + 16, not a multiple of 16), D = 100
# (one padded 128 chunk); cross-attention both ways; one query; one key; and an N that
# divides the key block (the unmasked EVEN_N path).
SHAPES = [(77, 77, 72), (130, 67, 33), (1, 77, 72), (50, 1, 100), (64, 128, 64)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M,N,D", SHAPES, ids=[f"M{m}-N{n}-D{d}" for m, n, d in SHAPES])
def test_jvp_matches_torch_func_jvp(kernel_device, M, N, D, dtype):
    gen = torch.Generator().manual_seed(M * 1000 + N * 10 + D)
    B, H = 2, 2
    q, tq = (rand((B, H, M, D), dtype, kernel_device, gen) for _ in range(2))
    k, v, tk, tv = (rand((B, H, N, D), dtype, kernel_device, gen) for _ in range(4))
    scale = 1.0 / math.sqrt(D)
    out, tangent_out = jvp.attention_jvp_forward(q, k, v, tq, tk, tv)
    check(q, k, v, tq, tk, tv, scale, out, tangent_out, TOL[dtype])


@pytest.mark.parametrize("M,N,D", [(77, 77, 72), (33, 130, 40)])
def test_jvp_fp16(kernel_device, M, N, D):
    gen = torch.Generator().manual_seed(16 + M + N)
    q, tq = (rand((1, 3, M, D), torch.float16, kernel_device, gen) for _ in range(2))
    k, v, tk, tv = (rand((1, 3, N, D), torch.float16, kernel_device, gen) for _ in range(4))
    out, tangent_out = jvp.attention_jvp_forward(q, k, v, tq, tk, tv, 0.2)
    check(q, k, v, tq, tk, tv, 0.2, out, tangent_out, TOL[torch.float16])


SUBSETS = ["q", "k", "v", "qk", ""]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("which", SUBSETS, ids=[f"tangent-{w or 'none'}" for w in SUBSETS])
def test_tangent_in_some_inputs_only(kernel_device, which, dtype):
    """A tangent only in q, only in k, only in v, in q and k, or none: passed as None
    (the kernel leaves the products out) and as explicit zeros (it computes them), the
    two must agree with each other and with torch.func.jvp."""
    gen = torch.Generator().manual_seed(len(which) * 7 + 3)
    B, H, M, N, D = 1, 2, 70, 77, 72
    q = rand((B, H, M, D), dtype, kernel_device, gen)
    k, v = (rand((B, H, N, D), dtype, kernel_device, gen) for _ in range(2))
    tangents = {name: rand(t.shape, dtype, kernel_device, gen) if name in which else None
                for name, t in (("q", q), ("k", k), ("v", v))}
    as_none = [tangents[n] for n in "qkv"]
    as_zeros = [torch.zeros_like(p) if t is None else t for t, p in zip(as_none, (q, k, v))]
    out, t_none = jvp.attention_jvp_forward(q, k, v, *as_none)
    out_z, t_zeros = jvp.attention_jvp_forward(q, k, v, *as_zeros)
    scale = 1.0 / math.sqrt(D)
    check(q, k, v, *as_none, scale, out, t_none, TOL[dtype])
    assert torch.equal(out, out_z)
    if not which:
        assert torch.equal(t_none, torch.zeros_like(t_none)) and torch.equal(t_zeros, t_none)
    else:
        assert rel_err(t_none, t_zeros) < (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_reference_matches_torch_func_jvp(dtype):
    """The PyTorch fallback: explicit formulas, 16-bit computed in fp32."""
    gen = torch.Generator().manual_seed(5)
    q, tq = (rand((2, 2, 9, 24), dtype, "cpu", gen) for _ in range(2))
    k, v, tk, tv = (rand((2, 2, 13, 24), dtype, "cpu", gen) for _ in range(4))
    for tangents in ((tq, tk, tv), (None, tk, None), (tq, None, None), (None, None, tv)):
        out, tangent_out = jvp.attention_jvp_reference(q, k, v, *tangents, scale=0.3)
        check(q, k, v, *tangents, 0.3, out, tangent_out, TOL[dtype] if dtype != torch.float64 else 1e-12)


def test_packed_strided_inputs_and_buffers(kernel_device):
    """q, k, v and their tangents as views of packed (B, N, 3, H, D) projections, as a
    DiT block makes them; a tangent without unit stride in D (copied); NaN-poisoned
    out, tangent_out and lse buffers that must be fully overwritten. out and lse must
    agree with the plain forward's."""
    gen = torch.Generator().manual_seed(11)
    B, N, H, D, dtype = 2, 70, 3, 40, torch.bfloat16
    qkv, tqkv = (rand((B, N, 3, H, D), dtype, kernel_device, gen) for _ in range(2))
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    tq, tk, tv = (t.transpose(1, 2) for t in tqkv.unbind(2))
    tv = tv.contiguous().mT.contiguous().mT  # same values, stride 1 along N, not D
    assert not q.is_contiguous() and tv.stride(-1) != 1
    nan = lambda shape, dt=dtype: torch.full(shape, float("nan"), dtype=dt, device=kernel_device)  # noqa: E731
    out, tangent_out, lse = nan((B, H, N, D)), nan((B, H, N, D)), nan((B, H, N), torch.float32)
    got = jvp.attention_jvp_forward(q, k, v, tq, tk, tv, out=out, tangent_out=tangent_out, lse=lse)
    assert got[0] is out and got[1] is tangent_out
    check(q, k, v, tq, tk, tv, 1.0 / math.sqrt(D), out, tangent_out, TOL[dtype])
    plain_out, plain_lse = attn.attention_forward(q, k, v)
    assert rel_err(out, plain_out) < 1e-2 and rel_err(lse, plain_lse) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_head_dim_256_and_custom_scale(kernel_device, dtype):
    gen = torch.Generator().manual_seed(256)
    q, k, v, tq, tk, tv = (rand((1, 2, 70, 256), dtype, kernel_device, gen) for _ in range(6))
    out, tangent_out = jvp.attention_jvp_forward(q, k, v, tq, tk, tv, scale=0.1)
    check(q, k, v, tq, tk, tv, 0.1, out, tangent_out, TOL[dtype])


@pytest.mark.parametrize("shape", [(1, 2, 0, 16), (0, 2, 5, 16)])
def test_empty_queries_or_batch(kernel_device, shape):
    q = torch.randn(*shape, device=kernel_device)
    k = torch.randn(shape[0], 2, 5, 16, device=kernel_device)
    out, tangent_out = jvp.attention_jvp_forward(q, k, k, q, k, k)
    assert out.shape == tangent_out.shape == q.shape


def test_backend_dispatch(kernel_device):
    gen = torch.Generator().manual_seed(2)
    q, k, v, tq, tk, tv = (rand((1, 2, 20, 16), torch.float32, kernel_device, gen) for _ in range(6))
    ref = jvp.attention_jvp(q, k, v, tq, tk, tv, backend="torch")
    fused = jvp.attention_jvp(q, k, v, tq, tk, tv, backend="triton")
    for a, r in zip(fused, ref):
        assert rel_err(a, r) < TOL[torch.float32]
    big = torch.randn(1, 1, 4, 300, device=kernel_device)
    with pytest.raises(ValueError, match="head dim"):
        jvp.attention_jvp(big, big, big, big, None, None, backend="triton")
    if kernel_device.type == "cpu":  # "auto" runs the reference off CUDA, and takes any head dim
        assert jvp.attention_jvp(big, big, big, big, None, None)[1].shape == big.shape


def test_bad_inputs_raise_value_error(kernel_device):
    q = torch.randn(1, 2, 8, 16, device=kernel_device)
    k = torch.randn(1, 2, 9, 16, device=kernel_device)
    with pytest.raises(ValueError, match=r"tangent tk must match k: \(1, 2, 9, 16\)"):
        jvp.attention_jvp_forward(q, k, k, None, q, None)  # tk shaped like q, not like k
    with pytest.raises(ValueError, match="tangent tq must match q"):
        jvp.attention_jvp_forward(q, k, k, q[..., :8], None, None)
    with pytest.raises(ValueError, match="tangent tv must match v.*float64"):
        jvp.attention_jvp_forward(q, k, k, None, None, k.double())
    with pytest.raises(ValueError, match="tangent tq must be a tensor or None"):
        jvp.attention_jvp_forward(q, k, k, 0.0, None, None)
    with pytest.raises(ValueError, match="shapes must match"):  # primal errors are attention's
        jvp.attention_jvp_forward(q, k, q, None, None, None)
    with pytest.raises(ValueError, match="tangent_out must be"):
        jvp.attention_jvp_forward(q, k, k, q, k, k, tangent_out=torch.empty(1, 2, 8, 15, device=kernel_device))
    with pytest.raises(ValueError, match="lse must be"):
        jvp.attention_jvp_forward(q, k, k, q, k, k, lse=torch.empty(1, 2, 8, dtype=torch.float64,
                                                                      device=kernel_device))


# ----------------------------------------------------------------------------- GPU builds

needs_ptxas = pytest.mark.skipif(not registers.available(), reason="this triton wheel bundles no ptxas")


@needs_ptxas
def test_gpu_builds_fit_registers_and_shared_memory():
    """The kernel as a GPU would compile it (16-bit tiles on tensor cores, a path the
    interpreter never takes), offline with the ptxas in triton's wheel, all tangents
    present: every config of the bf16 pool at the DiT-XL head (D = 72) on sm_90, and
    the untuned first config at D = 64 and 128 on sm_90 and at D = 64 and 72 on sm_80,
    must not spill and must fit shared memory. The fp32 and fp64 first configs must
    compile (some ieee-fp32 builds abort inside LLVM on sm_90; see attention_jvp.py)."""
    script = """
import importlib, json, torch
A = importlib.import_module("flowpre.kernels.attention")
J = importlib.import_module("flowpre.kernels.attention_jvp")
K = importlib.import_module("flowpre.kernels.attention_jvp_kernels")
from flowpre.kernels import registers
small = K.JVP_TABLES["small"]
cases = [(72, torch.bfloat16, 90, cfg) for cfg in small]
cases += [(d, torch.bfloat16, arch, small[0]) for d, arch in ((64, 90), (128, 90), (64, 80), (72, 80))]
cases += [(72, torch.float32, 90, K.JVP_TABLES["fp32"][0]), (72, torch.float64, 90, K.JVP_TABLES["fp64"][0])]
types = {torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64"}
out = []
for D, dtype, arch, (bm, bn, warps, stages) in cases:
    q = torch.empty(4, 16, 1024, D, dtype=dtype, device="meta")
    meta, align = J._gpu_meta(q), A._align(q)
    strides = A._strides(q, align)
    consts = dict(meta, ALIGN=align, BLOCK_M=bm, BLOCK_N=bn, EVEN_N=True, HAS_TQ=True, HAS_TK=True,
                  HAS_TV=True, STORE_LSE=True)
    args = dict(H=16, M=1024, N=1024, M_BUCKET=1024, N_BUCKET=1024, qk_scale=0.1, scale=0.1)
    for arg in K._jvp_fwd_kernel.arg_names:
        if arg not in consts and arg not in args:  # a pointer (upper case) or a b/h/n stride
            args[arg] = ("*fp32" if arg == "LSE" else types[dtype]) if arg.isupper() else strides["bhn".index(arg[-1])]
    res = registers.resources(K._jvp_fwd_kernel, args, consts, warps, arch=arch, num_stages=stages)
    out.append(dict(D=D, dtype=str(dtype), arch=arch, cfg=[bm, bn, warps, stages],
                    shared_limit=registers.SM_LIMITS[arch]["shared"], **res))
print(json.dumps(out))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(report) == 11
    for r in report:
        assert r["registers"] > 0 and r["shared_bytes"] <= r["shared_limit"], r
        if "bfloat16" in r["dtype"]:
            assert r["stack_bytes"] == 0, f"register spill: {r}"


@pytest.mark.skipif(not INTERPRETED, reason="the CPU smoke path of the benchmark")
def test_benchmark_smoke(tmp_path):
    """benchmarks/attention_jvp.py on CPU: one tiny shape through the interpreter, JSON out."""
    out = tmp_path / "jvp.json"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "attention_jvp.py"), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["status"] == "smoke" and "smoke" in done.stdout
    (row,) = report["rows"]
    assert row["results"]["triton_jvp"]["tangent_rel_err_vs_func_jvp"] < 2e-2, row


def test_tuning_pools_by_dtype_and_width():
    """The pool a launch tunes over, and its untuned first entry for short sequences."""
    K = importlib.import_module(jvp.__package__ + ".attention_jvp_kernels")
    assert [K.pool_name(2, w) for w in (80, 128, 256)] == ["small", "small", "wide16"]
    assert [K.pool_name(4, w) for w in (80, 256)] == ["fp32", "fp32_wide"]
    assert [K.pool_name(8, w) for w in (80, 128)] == ["fp64", "fp64_wide"]
    configs, prune = K._configs()
    q = torch.empty(1, device="meta", dtype=torch.bfloat16)
    short = prune(configs, dict(Q=q, M_BUCKET=128, N_BUCKET=64), DL=64, DH=16)
    long = prune(configs, dict(Q=q, M_BUCKET=1024, N_BUCKET=64), DL=64, DH=16)
    rows = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in long]
    assert rows == K.JVP_TABLES["small"] and short == long[:1]
