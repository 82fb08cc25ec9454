"""Flash attention: Triton forward/backward beside the PyTorch reference.

Shapes: q, k, v are (B, H, N, D); the output is (B, H, N, D). Non-causal, no mask.
Any N, any head dim D <= 256 (padded inside the kernels to BLOCK_D, a power of two,
with masked loads and stores), fp16/bf16/fp32 inputs with fp32 accumulation, and
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
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


def attention_reference(q, k, v, scale=None):
    """softmax(q k^T * scale) v, scale defaulting to 1/sqrt(D)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


# ----------------------------------------------------------------------------- kernels
# Row strides arrive divided by ALIGN (a power of two dividing every stride) and are
# multiplied back by the constexpr here: Triton then knows each row starts on an ALIGN
# boundary and can issue 16-byte loads even when the stride itself (72 for D=72) is not
# a multiple of 16, which is all Triton infers from a runtime integer.

@triton.jit
def _load_tile(base, rows, stride, cols, N, D: tl.constexpr, ALIGN: tl.constexpr, UPCAST: tl.constexpr):
    """A [rows, BLOCK_D] tile, zero outside N x D."""
    mask = (rows < N)[:, None] & (cols < D)[None, :]
    x = tl.load(base + (rows[:, None] * stride) * ALIGN + cols[None, :], mask=mask, other=0.0)
    if UPCAST:  # the interpreter computes 16-bit floats wrongly (stored as raw uint16)
        x = x.to(tl.float32)
    return x


@triton.jit
def _store_tile(base, rows, stride, cols, N, x, D: tl.constexpr, ALIGN: tl.constexpr):
    mask = (rows < N)[:, None] & (cols < D)[None, :]
    tl.store(base + (rows[:, None] * stride) * ALIGN + cols[None, :], x.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _head_offset(bh, H, stride_b, stride_h, ALIGN: tl.constexpr):
    # int64: B*H*N*D can pass 2**31 elements at DiT batch sizes.
    return ((bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h) * ALIGN


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE,
                sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                H, N, N_BUCKET, qk_scale,
                D: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr, UPCAST: tl.constexpr,
                ACC: tl.constexpr, PREC: tl.constexpr, EVEN_N: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bh = tl.program_id(1)
    Q += _head_offset(bh, H, sqb, sqh, ALIGN)
    K += _head_offset(bh, H, skb, skh, ALIGN)
    V += _head_offset(bh, H, svb, svh, ALIGN)
    O += _head_offset(bh, H, sob, soh, ALIGN)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q, offs_m, sqn, offs_d, N, D, ALIGN, UPCAST)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(K, offs_n, skn, offs_d, N, D, ALIGN, UPCAST)
        v = _load_tile(V, offs_n, svn, offs_d, N, D, ALIGN, UPCAST)
        # Scores in log2 units (qk_scale = scale * log2 e) so the softmax uses exp2.
        s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * qk_scale
        if not EVEN_N:  # padded keys must get zero weight; every block holds >= 1 real key
            s = tl.where((offs_n < N)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC, out_dtype=ACC)
        m_i = m_new
    # l_i >= 1 (the row maximum contributes exp2(0)), so no division by zero.
    _store_tile(O, offs_m, son, offs_d, N, acc / l_i[:, None], D, ALIGN)
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + bh.to(tl.int64) * N + offs_m, lse.to(LSE.dtype.element_ty), mask=offs_m < N)


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, sob, soh, son, sdb, sdh, sdn, H, N,
                      D: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr,
                      ACC: tl.constexpr, BLOCK_M: tl.constexpr):
    bh = tl.program_id(1)
    O += _head_offset(bh, H, sob, soh, ALIGN)
    DO += _head_offset(bh, H, sdb, sdh, ALIGN)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(O, offs_m, son, offs_d, N, D, ALIGN, False).to(ACC)
    do = _load_tile(DO, offs_m, sdn, offs_d, N, D, ALIGN, False).to(ACC)
    tl.store(DELTA + bh.to(tl.int64) * N + offs_m, tl.sum(o * do, 1), mask=offs_m < N)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV,
                     sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
                     skgb, skgh, skgn, svgb, svgh, svgn,
                     H, N, N_BUCKET, qk_scale, scale,
                     D: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr, UPCAST: tl.constexpr,
                     ACC: tl.constexpr, PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per BLOCK_N keys, looping over all queries in BLOCK_M steps (transposed: P^T)."""
    bh = tl.program_id(1)
    Q += _head_offset(bh, H, sqb, sqh, ALIGN)
    K += _head_offset(bh, H, skb, skh, ALIGN)
    V += _head_offset(bh, H, svb, svh, ALIGN)
    DO += _head_offset(bh, H, sdb, sdh, ALIGN)
    DK += _head_offset(bh, H, skgb, skgh, ALIGN)
    DV += _head_offset(bh, H, svgb, svgh, ALIGN)
    LSE += bh.to(tl.int64) * N
    DELTA += bh.to(tl.int64) * N
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(K, offs_n, skn, offs_d, N, D, ALIGN, UPCAST)
    v = _load_tile(V, offs_n, svn, offs_d, N, D, ALIGN, UPCAST)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_tile(Q, offs_m, sqn, offs_d, N, D, ALIGN, UPCAST)
        do = _load_tile(DO, offs_m, sdn, offs_d, N, D, ALIGN, UPCAST)
        # Padded query rows need no mask: q = dO = 0 there and lse = delta = 0 give
        # P^T = 1, dS^T = 0, and both enter dV and dK only multiplied by zero rows.
        lse2 = tl.load(LSE + offs_m, mask=offs_m < N, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + offs_m, mask=offs_m < N, other=0.0)
        pt = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PREC, out_dtype=ACC) * qk_scale - lse2[None, :])
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PREC, out_dtype=ACC)
        dpt = tl.dot(v, tl.trans(do), input_precision=PREC, out_dtype=ACC)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=PREC, out_dtype=ACC)
    # Padded key rows hold garbage (even inf) but stay in their own rows and are not stored.
    _store_tile(DK, offs_n, skgn, offs_d, N, dk * scale, D, ALIGN)
    _store_tile(DV, offs_n, svgn, offs_d, N, dv, D, ALIGN)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,
                   sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, sqgb, sqgh, sqgn,
                   H, N, N_BUCKET, qk_scale, scale,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr, UPCAST: tl.constexpr,
                   ACC: tl.constexpr, PREC: tl.constexpr, EVEN_N: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per BLOCK_M queries, looping over all keys in BLOCK_N steps."""
    bh = tl.program_id(1)
    Q += _head_offset(bh, H, sqb, sqh, ALIGN)
    K += _head_offset(bh, H, skb, skh, ALIGN)
    V += _head_offset(bh, H, svb, svh, ALIGN)
    DO += _head_offset(bh, H, sdb, sdh, ALIGN)
    DQ += _head_offset(bh, H, sqgb, sqgh, ALIGN)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q, offs_m, sqn, offs_d, N, D, ALIGN, UPCAST)
    do = _load_tile(DO, offs_m, sdn, offs_d, N, D, ALIGN, UPCAST)
    lse2 = tl.load(LSE + bh.to(tl.int64) * N + offs_m, mask=offs_m < N, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + bh.to(tl.int64) * N + offs_m, mask=offs_m < N, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(K, offs_n, skn, offs_d, N, D, ALIGN, UPCAST)
        v = _load_tile(V, offs_n, svn, offs_d, N, D, ALIGN, UPCAST)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * qk_scale - lse2[:, None])
        if not EVEN_N:  # a padded key scores 0, so p = 2^-lse could be inf; inf * 0 = NaN
            p = tl.where((offs_n < N)[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC, out_dtype=ACC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC, out_dtype=ACC)
    _store_tile(DQ, offs_m, sqgn, offs_d, N, dq * scale, D, ALIGN)


# ----------------------------------------------------------------------------- tuning
# (outer block, inner block, num_warps, num_stages); BLOCK_M is the query block and
# BLOCK_N the key block in every kernel. Lists are chosen by the bytes of one padded
# row (BLOCK_D * element size) so tiles and pipeline stages fit shared memory (227 KB
# on H100) and registers: "small" is 16-bit up to BLOCK_D 128 (the DiT shapes), "large"
# 16-bit BLOCK_D 256 or fp32 128, "huge" fp32 256 and fp64. The first entry of a list
# runs untuned for short sequences, where tuning is not worth its compile time.
_TABLES = {
    "fwd": {"small": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 4), (64, 64, 4, 3)],
            "large": [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2)]},
    # Backward: a large outer block (keys for dK/dV, queries for dQ) keeps its fp32
    # accumulators in registers while small inner blocks stream through.
    "bwd": {"small": [(128, 64, 8, 3), (128, 32, 4, 3), (128, 64, 8, 2), (128, 32, 8, 4),
                      (64, 64, 4, 3), (64, 32, 4, 4)],
            "large": [(64, 32, 8, 2), (32, 32, 4, 2), (64, 64, 8, 1)]},
}
_HUGE = [(16, 16, 4, 1)]
_TUNE_FROM_N = 256  # N_BUCKET below this runs the first config untuned


def _table_configs(table, outer_is_m):
    def make(rows):
        return [triton.Config({"BLOCK_M": a, "BLOCK_N": b} if outer_is_m else {"BLOCK_M": b, "BLOCK_N": a},
                              num_warps=w, num_stages=s) for a, b, w, s in rows]
    pools = {"small": make(table["small"]), "large": make(table["large"]), "huge": make(_HUGE)}

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        row_bytes = args["BLOCK_D"] * args["Q"].element_size()
        pool = pools["small" if row_bytes <= 256 else "large" if row_bytes <= 512 else "huge"]
        return pool if args["N_BUCKET"] >= _TUNE_FROM_N else pool[:1]
    return [c for p in pools.values() for c in p], prune


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


def _meta(q):
    """Compile-time parameters shared by every kernel for these inputs."""
    B, H, N, D = q.shape
    f64 = q.dtype == torch.float64
    if q.dtype == torch.float32:
        prec = "tf32" if ALLOW_TF32 else "ieee"
    else:  # 16-bit dots ignore it; fp64 has no reduced mode
        prec = "ieee" if f64 else "tf32"
    return dict(D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), ACC=tl.float64 if f64 else tl.float32,
                # On GPU 16-bit tiles go straight into tensor-core dots; the interpreter
                # must see fp32 (fp64 already computes correctly there).
                UPCAST=_INTERPRET and not f64, PREC=prec)


def _launch_cfg(N):
    """Interpreter only: fixed blocks (64 is the fastest there), shrunk for tiny N."""
    blk = min(64, max(16, triton.next_power_of_2(N)))
    return dict(BLOCK_M=blk, BLOCK_N=blk, num_warps=4)


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
        H, N, triton.next_power_of_2(N), scale * _LOG2E, ALIGN=align, **meta, **extra)
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
    n_bucket, qk_scale = triton.next_power_of_2(N), scale * _LOG2E
    extra = _launch_cfg(N) if _INTERPRET else {}

    delta = torch.empty((B, H, N), dtype=acc_dtype, device=q.device)
    delta_block = 64 if meta["BLOCK_D"] <= 128 else 32
    _bwd_delta_kernel[(triton.cdiv(N, delta_block), B * H)](
        out, dout, delta, *s_o, *s_do, H, N, D=D, BLOCK_D=meta["BLOCK_D"], ALIGN=align,
        ACC=meta["ACC"], BLOCK_M=delta_block)
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
    """
    if use_triton(backend, q):
        _check_inputs(q, k, v)
        return _attention_triton(q, k, v, 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale))
    return attention_reference(q, k, v, scale)
