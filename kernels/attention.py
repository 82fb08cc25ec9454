"""Flash attention: Triton forward/backward beside the PyTorch reference.

Shapes: q, k, v are (B, H, N, D); the output is (B, H, N, D). Non-causal, no mask.
Any N, any head dim D <= 256 (padded inside the kernels with masked loads and stores,
never in the caller's tensors), fp16/bf16/fp32 inputs with fp32 accumulation, and
fp64 with fp64 accumulation (for gradcheck).

Forward: online softmax over key blocks, saving the natural-log log-sum-exp (B, H, N).
Backward (FlashAttention-2): delta = rowsum(dO * O), then one kernel per key block
for dK/dV and one per query block for dQ; both recompute P from the LSE, so nothing
N x N is stored and no atomics are needed (so autotune may re-run any kernel safely).
"""
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .backend import interpreter_on, use_triton

# Read once, like @triton.jit does: kernels are compiled for one mode or the other.
_INTERPRET = interpreter_on()
# fp32 inputs use exact ("ieee") dots by default so fp32 matches torch to ~1e-6;
# set True to trade that for tf32 tensor-core speed.
ALLOW_TF32 = False
MAX_HEAD_DIM = 256
INTERPRET_BLOCK = 64  # query/key block under the interpreter (no autotuning there)
_LOG2E = 1.4426950408889634


def attention_reference(q, k, v, scale=None):
    """softmax(q k^T * scale) v, scale defaulting to 1/sqrt(D)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


# ----------------------------------------------------------------------------- kernels
# Head dim: D is covered by a power-of-two chunk of DL columns plus, when that saves
# work, a second chunk of DH columns (DL + DH < next power of two, 0 = no second
# chunk): D=72 runs as 64 + 16 = 80 columns of tensor-core work instead of 128, D=40 as
# 32 + 16. Columns past D are masked to zero on load and never stored.
# Row strides arrive divided by ALIGN (a power of two dividing every stride) and are
# multiplied back by the constexpr here: Triton then knows each row starts on an ALIGN
# boundary and can issue 16-byte loads even when the stride itself (72 for D=72) is not
# a multiple of 16, which is all Triton infers from a runtime integer.
# Head offsets are int64: B*H*N*D can pass 2**31 elements at DiT batch sizes.
# TILE is the dtype tiles are computed in: the input dtype on GPU, so tl.dot gets 16-bit
# operands (tensor cores) with ACC (fp32) accumulation; fp32 under the interpreter,
# which silently computes garbage on 16-bit floats (it stores them as raw uint16).
# Everything is written inline: under the interpreter each call of a nested @triton.jit
# helper costs milliseconds of patching, more than the tile arithmetic itself.

@triton.jit
def _fwd_kernel(Q, K, V, O, LSE,
                sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                H, N, N_BUCKET, qk_scale,
                D: tl.constexpr, DL: tl.constexpr, DH: tl.constexpr, ALIGN: tl.constexpr,
                TILE: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, EVEN_N: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, DL)
    d_ok = (offs_d < D)[None, :]
    m_ok = (offs_m < N)[:, None]
    q_rows = Q + (b * sqb + h * sqh) * ALIGN + (offs_m[:, None] * sqn) * ALIGN
    k_rows = K + (b * skb + h * skh) * ALIGN + (offs_n[:, None] * skn) * ALIGN
    v_rows = V + (b * svb + h * svh) * ALIGN + (offs_n[:, None] * svn) * ALIGN
    q = tl.load(q_rows + offs_d[None, :], mask=m_ok & d_ok, other=0.0).to(TILE)
    acc = tl.full([BLOCK_M, DL], 0.0, dtype=ACC)
    if DH > 0:
        offs_e = DL + tl.arange(0, DH)
        e_ok = (offs_e < D)[None, :]
        qe = tl.load(q_rows + offs_e[None, :], mask=m_ok & e_ok, other=0.0).to(TILE)
        acc_e = tl.full([BLOCK_M, DH], 0.0, dtype=ACC)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.full([BLOCK_M], 0.0, dtype=ACC)

    for start_n in range(0, N, BLOCK_N):
        n_ok = (start_n + offs_n < N)[:, None]
        k = tl.load(k_rows + offs_d[None, :], mask=n_ok & d_ok, other=0.0).to(TILE)
        v = tl.load(v_rows + offs_d[None, :], mask=n_ok & d_ok, other=0.0).to(TILE)
        s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC)
        if DH > 0:
            ke = tl.load(k_rows + offs_e[None, :], mask=n_ok & e_ok, other=0.0).to(TILE)
            ve = tl.load(v_rows + offs_e[None, :], mask=n_ok & e_ok, other=0.0).to(TILE)
            s = tl.dot(qe, tl.trans(ke), s, input_precision=PREC, out_dtype=ACC)
        # Scores in log2 units (qk_scale = scale * log2 e) so the softmax uses exp2.
        s = s * qk_scale
        if not EVEN_N:  # padded keys get zero weight; every block holds >= 1 real key
            s = tl.where((start_n + offs_n < N)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(TILE)
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision=PREC, out_dtype=ACC)
        if DH > 0:
            acc_e = tl.dot(p, ve, acc_e * alpha[:, None], input_precision=PREC, out_dtype=ACC)
        m_i = m_new
        k_rows += (BLOCK_N * skn) * ALIGN
        v_rows += (BLOCK_N * svn) * ALIGN

    # l_i >= 1 (the row maximum contributes exp2(0)), so no division by zero.
    o_rows = O + (b * sob + h * soh) * ALIGN + (offs_m[:, None] * son) * ALIGN
    tl.store(o_rows + offs_d[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty), mask=m_ok & d_ok)
    if DH > 0:
        tl.store(o_rows + offs_e[None, :], (acc_e / l_i[:, None]).to(O.dtype.element_ty), mask=m_ok & e_ok)
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # back to natural log
    tl.store(LSE + bh.to(tl.int64) * N + offs_m, lse.to(LSE.dtype.element_ty), mask=offs_m < N)


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, sob, soh, son, sdb, sdh, sdn, H, N,
                      D: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr,
                      ACC: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O): memory-bound, so one padded power-of-two tile is fine."""
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m < N)[:, None] & (offs_d < D)[None, :]
    o = tl.load(O + (b * sob + h * soh) * ALIGN + (offs_m[:, None] * son) * ALIGN + offs_d[None, :],
                mask=ok, other=0.0)
    do = tl.load(DO + (b * sdb + h * sdh) * ALIGN + (offs_m[:, None] * sdn) * ALIGN + offs_d[None, :],
                 mask=ok, other=0.0)
    tl.store(DELTA + bh.to(tl.int64) * N + offs_m, tl.sum(o.to(ACC) * do.to(ACC), 1), mask=offs_m < N)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV,
                     sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
                     skgb, skgh, skgn, svgb, svgh, svgn,
                     H, N, N_BUCKET, qk_scale, scale,
                     D: tl.constexpr, DL: tl.constexpr, DH: tl.constexpr, ALIGN: tl.constexpr,
                     TILE: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per BLOCK_N keys, streaming all queries in BLOCK_M steps (works on P^T)."""
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, DL)
    d_ok = (offs_d < D)[None, :]
    n_ok = (offs_n < N)[:, None]
    k_rows = K + (b * skb + h * skh) * ALIGN + (offs_n[:, None] * skn) * ALIGN
    v_rows = V + (b * svb + h * svh) * ALIGN + (offs_n[:, None] * svn) * ALIGN
    q_rows = Q + (b * sqb + h * sqh) * ALIGN + (offs_m[:, None] * sqn) * ALIGN
    do_rows = DO + (b * sdb + h * sdh) * ALIGN + (offs_m[:, None] * sdn) * ALIGN
    lse_ptrs = LSE + bh.to(tl.int64) * N + offs_m
    delta_ptrs = DELTA + bh.to(tl.int64) * N + offs_m
    k = tl.load(k_rows + offs_d[None, :], mask=n_ok & d_ok, other=0.0).to(TILE)
    v = tl.load(v_rows + offs_d[None, :], mask=n_ok & d_ok, other=0.0).to(TILE)
    dk = tl.full([BLOCK_N, DL], 0.0, dtype=ACC)
    dv = tl.full([BLOCK_N, DL], 0.0, dtype=ACC)
    if DH > 0:
        offs_e = DL + tl.arange(0, DH)
        e_ok = (offs_e < D)[None, :]
        ke = tl.load(k_rows + offs_e[None, :], mask=n_ok & e_ok, other=0.0).to(TILE)
        ve = tl.load(v_rows + offs_e[None, :], mask=n_ok & e_ok, other=0.0).to(TILE)
        dke = tl.full([BLOCK_N, DH], 0.0, dtype=ACC)
        dve = tl.full([BLOCK_N, DH], 0.0, dtype=ACC)

    for start_m in range(0, N, BLOCK_M):
        r_ok = start_m + offs_m < N
        q = tl.load(q_rows + offs_d[None, :], mask=r_ok[:, None] & d_ok, other=0.0).to(TILE)
        do = tl.load(do_rows + offs_d[None, :], mask=r_ok[:, None] & d_ok, other=0.0).to(TILE)
        st = tl.dot(k, tl.trans(q), input_precision=PREC, out_dtype=ACC)
        dpt = tl.dot(v, tl.trans(do), input_precision=PREC, out_dtype=ACC)
        if DH > 0:
            qe = tl.load(q_rows + offs_e[None, :], mask=r_ok[:, None] & e_ok, other=0.0).to(TILE)
            doe = tl.load(do_rows + offs_e[None, :], mask=r_ok[:, None] & e_ok, other=0.0).to(TILE)
            st = tl.dot(ke, tl.trans(qe), st, input_precision=PREC, out_dtype=ACC)
            dpt = tl.dot(ve, tl.trans(doe), dpt, input_precision=PREC, out_dtype=ACC)
        # Padded query rows need no mask: q = dO = 0 and lse = delta = 0 there give
        # P^T = 1 and dS^T = 0, which reach dV and dK only multiplied by zero rows.
        lse2 = tl.load(lse_ptrs, mask=r_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_ptrs, mask=r_ok, other=0.0)
        pt = tl.exp2(st * qk_scale - lse2[None, :])
        dst = (pt * (dpt - delta[None, :])).to(TILE)
        pt = pt.to(TILE)
        dv = tl.dot(pt, do, dv, input_precision=PREC, out_dtype=ACC)
        dk = tl.dot(dst, q, dk, input_precision=PREC, out_dtype=ACC)
        if DH > 0:
            dve = tl.dot(pt, doe, dve, input_precision=PREC, out_dtype=ACC)
            dke = tl.dot(dst, qe, dke, input_precision=PREC, out_dtype=ACC)
        q_rows += (BLOCK_M * sqn) * ALIGN
        do_rows += (BLOCK_M * sdn) * ALIGN
        lse_ptrs += BLOCK_M
        delta_ptrs += BLOCK_M

    # Padded key rows may hold garbage (even inf): it stays in its own rows, never stored.
    dk_rows = DK + (b * skgb + h * skgh) * ALIGN + (offs_n[:, None] * skgn) * ALIGN
    dv_rows = DV + (b * svgb + h * svgh) * ALIGN + (offs_n[:, None] * svgn) * ALIGN
    tl.store(dk_rows + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=n_ok & d_ok)
    tl.store(dv_rows + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=n_ok & d_ok)
    if DH > 0:
        tl.store(dk_rows + offs_e[None, :], (dke * scale).to(DK.dtype.element_ty), mask=n_ok & e_ok)
        tl.store(dv_rows + offs_e[None, :], dve.to(DV.dtype.element_ty), mask=n_ok & e_ok)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,
                   sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, sqgb, sqgh, sqgn,
                   H, N, N_BUCKET, qk_scale, scale,
                   D: tl.constexpr, DL: tl.constexpr, DH: tl.constexpr, ALIGN: tl.constexpr,
                   TILE: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, EVEN_N: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per BLOCK_M queries, streaming all keys in BLOCK_N steps."""
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, DL)
    d_ok = (offs_d < D)[None, :]
    m_ok = (offs_m < N)[:, None]
    q_rows = Q + (b * sqb + h * sqh) * ALIGN + (offs_m[:, None] * sqn) * ALIGN
    do_rows = DO + (b * sdb + h * sdh) * ALIGN + (offs_m[:, None] * sdn) * ALIGN
    k_rows = K + (b * skb + h * skh) * ALIGN + (offs_n[:, None] * skn) * ALIGN
    v_rows = V + (b * svb + h * svh) * ALIGN + (offs_n[:, None] * svn) * ALIGN
    q = tl.load(q_rows + offs_d[None, :], mask=m_ok & d_ok, other=0.0).to(TILE)
    do = tl.load(do_rows + offs_d[None, :], mask=m_ok & d_ok, other=0.0).to(TILE)
    dq = tl.full([BLOCK_M, DL], 0.0, dtype=ACC)
    if DH > 0:
        offs_e = DL + tl.arange(0, DH)
        e_ok = (offs_e < D)[None, :]
        qe = tl.load(q_rows + offs_e[None, :], mask=m_ok & e_ok, other=0.0).to(TILE)
        doe = tl.load(do_rows + offs_e[None, :], mask=m_ok & e_ok, other=0.0).to(TILE)
        dqe = tl.full([BLOCK_M, DH], 0.0, dtype=ACC)
    lse2 = tl.load(LSE + bh.to(tl.int64) * N + offs_m, mask=offs_m < N, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + bh.to(tl.int64) * N + offs_m, mask=offs_m < N, other=0.0)

    for start_n in range(0, N, BLOCK_N):
        n_ok = (start_n + offs_n < N)[:, None]
        k = tl.load(k_rows + offs_d[None, :], mask=n_ok & d_ok, other=0.0).to(TILE)
        v = tl.load(v_rows + offs_d[None, :], mask=n_ok & d_ok, other=0.0).to(TILE)
        s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC, out_dtype=ACC)
        if DH > 0:
            ke = tl.load(k_rows + offs_e[None, :], mask=n_ok & e_ok, other=0.0).to(TILE)
            ve = tl.load(v_rows + offs_e[None, :], mask=n_ok & e_ok, other=0.0).to(TILE)
            s = tl.dot(qe, tl.trans(ke), s, input_precision=PREC, out_dtype=ACC)
            dp = tl.dot(doe, tl.trans(ve), dp, input_precision=PREC, out_dtype=ACC)
        p = tl.exp2(s * qk_scale - lse2[:, None])
        if not EVEN_N:  # a padded key scores 0, so p = 2^-lse may be inf, and inf * 0 = NaN
            p = tl.where((start_n + offs_n < N)[None, :], p, 0.0)
        ds = (p * (dp - delta[:, None])).to(TILE)
        dq = tl.dot(ds, k, dq, input_precision=PREC, out_dtype=ACC)
        if DH > 0:
            dqe = tl.dot(ds, ke, dqe, input_precision=PREC, out_dtype=ACC)
        k_rows += (BLOCK_N * skn) * ALIGN
        v_rows += (BLOCK_N * svn) * ALIGN

    dq_rows = DQ + (b * sqgb + h * sqgh) * ALIGN + (offs_m[:, None] * sqgn) * ALIGN
    tl.store(dq_rows + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=m_ok & d_ok)
    if DH > 0:
        tl.store(dq_rows + offs_e[None, :], (dqe * scale).to(DQ.dtype.element_ty), mask=m_ok & e_ok)


# ----------------------------------------------------------------------------- tuning
# (outer block, inner block, num_warps, num_stages); BLOCK_M is the query block and
# BLOCK_N the key block in every kernel, the outer one is per program. Pools, chosen so
# tiles and pipeline stages fit shared memory (227 KB on H100) and, per ptxas for sm_90a,
# mostly without register spills: "small" for 16-bit with DL + DH <= 128 (the DiT
# shapes, on wgmma tensor cores), "large" for wider 16-bit heads and fp32/fp64 rows up
# to 512 bytes, "huge" beyond. The first entry of a pool runs untuned for short
# sequences (N < _TUNE_FROM_N), where tuning is not worth its compile time.
_TABLES = {
    "fwd": {"small": [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 4), (128, 64, 4, 3), (64, 64, 4, 3)],
            "large": [(64, 32, 8, 2), (64, 32, 4, 2), (128, 64, 8, 2)],
            "huge": [(16, 16, 4, 1)]},
    # Backward: the outer block (keys for dK/dV, queries for dQ) keeps its fp32
    # accumulators in registers while small inner blocks stream through.
    "bwd": {"small": [(128, 32, 8, 4), (128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 4)],
            "large": [(64, 32, 8, 2), (32, 32, 4, 2)],
            "huge": [(16, 16, 4, 1)]},
}
_TUNE_FROM_N = 256  # compared with N_BUCKET, a kernel argument that only keys the tuning


def _table_configs(table, outer_is_m):
    pools = {name: [triton.Config({"BLOCK_M": a, "BLOCK_N": b} if outer_is_m else {"BLOCK_M": b, "BLOCK_N": a},
                                  num_warps=w, num_stages=s) for a, b, w, s in rows]
             for name, rows in table.items()}

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        elem, width = args["Q"].element_size(), args["DL"] + args["DH"]
        name = "small" if elem == 2 and width <= 128 else "large" if elem * width <= 512 else "huge"
        return pools[name] if args["N_BUCKET"] >= _TUNE_FROM_N else pools[name][:1]
    return [c for pool in pools.values() for c in pool], prune


def _build(kernel, name, outer_is_m=True, even_n=True):
    # EVEN_N drops the key mask when N is a multiple of the key block (the DiT shapes).
    heur = triton.heuristics({"EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0}) if even_n else (lambda f: f)
    if _INTERPRET:  # one fixed config: autotune would need a CPU timer and time for nothing
        return heur(kernel)
    configs, prune = _table_configs(_TABLES[name], outer_is_m)
    return triton.autotune(configs=configs, key=["N_BUCKET", "D"],
                           prune_configs_by={"early_config_prune": prune})(heur(kernel))


_fwd = _build(_fwd_kernel, "fwd")
_bwd_dkdv = _build(_bwd_dkdv_kernel, "bwd", outer_is_m=False, even_n=False)
_bwd_dq = _build(_bwd_dq_kernel, "bwd")


# ----------------------------------------------------------------------------- launchers
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
             torch.float64: tl.float64}


def _check_inputs(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"attention: {name} must be a 4-D (B, H, N, D) tensor, "
                             f"got {getattr(t, 'shape', type(t).__name__)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"attention: q, k, v shapes must match, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in _DTYPES:
        raise ValueError(f"attention: unsupported dtype {q.dtype}; use one of {_DTYPES}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"attention: head dim D={q.shape[-1]} exceeds the supported maximum {MAX_HEAD_DIM}")
    if q.shape[0] * q.shape[1] > 65535:
        raise ValueError(f"attention: B*H={q.shape[0] * q.shape[1]} exceeds the grid limit 65535")


def _check_buffer(name, buf, shape, dtype, device, contiguous=False):
    """A caller-supplied output buffer must match exactly: we write into it, never into a copy."""
    if buf.shape != shape or buf.dtype != dtype or buf.device != device:
        raise ValueError(f"attention: {name} must be {tuple(shape)} {dtype} on {device}, "
                         f"got {tuple(buf.shape)} {buf.dtype} on {buf.device}")
    if not (buf.is_contiguous() if contiguous else buf.stride(-1) == 1):
        raise ValueError(f"attention: {name} must have " + ("contiguous layout" if contiguous else "unit stride in D"))


def _rows(t):
    """The tensor with unit stride along D (the kernels index D directly)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _align(*tensors):
    """Largest power of two (<= 16) dividing every B, H and N stride."""
    a = 16
    for t in tensors:
        for s in t.stride()[:3]:
            a = math.gcd(a, s)
    return a


def _strides(t, align):
    return [s // align for s in t.stride()[:3]]


def _split_head_dim(D):
    """(DL, DH): a power-of-two chunk plus a smaller one (0 = none) covering D, when two
    chunks are narrower than the next power of two (72 -> 64 + 16), else (that power, 0)."""
    full = max(16, triton.next_power_of_2(D))
    lo = max(16, 1 << (D.bit_length() - 1))
    hi = max(16, triton.next_power_of_2(D - lo)) if D > lo else 0
    return (lo, hi) if lo + hi < full else (full, 0)


def _meta(q):
    """Compile-time parameters shared by the main kernels for these inputs."""
    f64 = q.dtype == torch.float64
    if q.dtype == torch.float32:
        prec = "tf32" if ALLOW_TF32 else "ieee"
    else:  # 16-bit dots ignore it; fp64 has no reduced mode
        prec = "ieee" if f64 else "tf32"
    acc = tl.float64 if f64 else tl.float32
    tile = _TL_DTYPE[q.dtype] if not _INTERPRET or f64 else tl.float32
    dl, dh = _split_head_dim(q.shape[-1])
    return dict(D=q.shape[-1], DL=dl, DH=dh, TILE=tile, ACC=acc, PREC=prec)


def _launch_cfg(N):
    """Interpreter only: one fixed config (64 keeps several blocks, and so the online
    softmax across blocks, in play at test sizes), shrunk for tiny N."""
    blk = min(INTERPRET_BLOCK, max(16, triton.next_power_of_2(N)))
    return dict(BLOCK_M=blk, BLOCK_N=blk, num_warps=4)


def _bucket(N):
    """Autotune key: the largest power of two <= N, so nearby lengths share a tuning."""
    return 1 << (N.bit_length() - 1)


def _grid(n_blocks_of, N, BH):
    return lambda meta: (triton.cdiv(N, meta[n_blocks_of]), BH)


def attention_forward(q, k, v, scale=None, out=None, lse=None):
    """Triton forward. Returns (out in q's dtype, lse (B, H, N) natural log; fp32, fp64 for fp64 inputs).

    `out` and `lse` may be given to write into (they are fully overwritten).
    """
    _check_inputs(q, k, v)
    q, k, v = _rows(q), _rows(k), _rows(v)
    B, H, N, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _check_buffer("out", out, q.shape, q.dtype, q.device)
    if lse is None:
        lse = torch.empty((B, H, N), dtype=acc_dtype, device=q.device)
    _check_buffer("lse", lse, (B, H, N), acc_dtype, q.device, contiguous=True)
    if q.numel() == 0:
        return out, lse
    align = _align(q, k, v, out)
    meta = _meta(q)
    extra = _launch_cfg(N) if _INTERPRET else {}
    _fwd[_grid("BLOCK_M", N, B * H)](
        q, k, v, out, lse, *_strides(q, align), *_strides(k, align), *_strides(v, align), *_strides(out, align),
        H, N, _bucket(N), scale * _LOG2E, ALIGN=align, **meta, **extra)
    return out, lse


def attention_backward(q, k, v, out, lse, dout, scale=None, dq=None, dk=None, dv=None):
    """Triton backward from the forward's out and lse. Returns (dq, dk, dv) in q's dtype.

    dq, dk, dv may be given to write into (they are fully overwritten).
    """
    _check_inputs(q, k, v)
    q, k, v, out, dout = _rows(q), _rows(k), _rows(v), _rows(out), _rows(dout)
    B, H, N, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    for name, t in (("out", out), ("dout", dout)):
        _check_buffer(name, t, q.shape, q.dtype, q.device)
    _check_buffer("lse", lse, (B, H, N), acc_dtype, q.device, contiguous=True)
    grads = []
    for name, g in (("dq", dq), ("dk", dk), ("dv", dv)):
        g = torch.empty(q.shape, dtype=q.dtype, device=q.device) if g is None else g
        _check_buffer(name, g, q.shape, q.dtype, q.device)
        grads.append(g)
    dq, dk, dv = grads
    if q.numel() == 0:
        return dq, dk, dv
    align = _align(q, k, v, out, dout, dq, dk, dv)
    meta = _meta(q)
    s_q, s_k, s_v, s_o, s_do = (_strides(t, align) for t in (q, k, v, out, dout))
    n_bucket, qk_scale = _bucket(N), scale * _LOG2E
    extra = _launch_cfg(N) if _INTERPRET else {}

    delta = torch.empty((B, H, N), dtype=acc_dtype, device=q.device)
    block_d = max(16, triton.next_power_of_2(D))
    delta_block = 64 if block_d <= 128 else 32
    _bwd_delta_kernel[(triton.cdiv(N, delta_block), B * H)](
        out, dout, delta, *s_o, *s_do, H, N, D=D, BLOCK_D=block_d, ALIGN=align, ACC=meta["ACC"],
        BLOCK_M=delta_block)
    _bwd_dkdv[_grid("BLOCK_N", N, B * H)](
        q, k, v, dout, lse, delta, dk, dv, *s_q, *s_k, *s_v, *s_do, *_strides(dk, align), *_strides(dv, align),
        H, N, n_bucket, qk_scale, scale, ALIGN=align, **meta, **extra)
    _bwd_dq[_grid("BLOCK_M", N, B * H)](
        q, k, v, dout, lse, delta, dq, *s_q, *s_k, *s_v, *s_do, *_strides(dq, align),
        H, N, n_bucket, qk_scale, scale, ALIGN=align, **meta, **extra)
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        out, lse = attention_forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(q, k, v, out, lse, dout, ctx.scale)
        return dq, dk, dv, None


@torch.compiler.disable  # Dynamo cannot trace into Triton launchers with autotune/heuristics
def _attention_triton(q, k, v, scale):
    return _FlashAttention.apply(q, k, v, scale)


def attention(q, k, v, scale=None, backend="auto"):
    """softmax(q k^T * scale) v over (B, H, N, D) inputs, differentiable in q, k, v.

    backend: "auto" (Triton on CUDA, else PyTorch), "triton" or "torch"; see backend.py.
    "triton" raises ValueError on inputs the kernel does not take (D > 256, q/k/v shapes,
    dtypes or devices that differ); "auto" hands those to the PyTorch reference instead.
    """
    if use_triton(backend, q):
        try:
            _check_inputs(q, k, v)
        except ValueError:
            if backend != "auto":
                raise
        else:
            return _attention_triton(q, k, v, 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale))
    return attention_reference(q, k, v, scale)
