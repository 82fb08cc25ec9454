"""Flash attention's Triton kernels and their autotuning tables (launched from attention.py).

M queries attend to N keys (M = N for self-attention, N = the text length for
cross-attention); q is (B, H, M, D), k and v (B, H, N, D), the LSE and delta (B, H, M).
"""
import torch
import triton
import triton.language as tl

from .backend import interpreter_on

# Read once, like @triton.jit does: kernels are compiled for one mode or the other.
_INTERPRET = interpreter_on()

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
                H, M, N, M_BUCKET, N_BUCKET, qk_scale,
                D: tl.constexpr, DL: tl.constexpr, DH: tl.constexpr, ALIGN: tl.constexpr,
                TILE: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, EVEN_N: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per BLOCK_M of the M queries, streaming the N keys in BLOCK_N steps."""
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, DL)
    d_ok = (offs_d < D)[None, :]
    m_ok = (offs_m < M)[:, None]
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
    tl.store(LSE + bh.to(tl.int64) * M + offs_m, lse.to(LSE.dtype.element_ty), mask=offs_m < M)


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, sob, soh, son, sdb, sdh, sdn, H, M,
                      D: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr,
                      ACC: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O): memory-bound, so one padded power-of-two tile is fine."""
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m < M)[:, None] & (offs_d < D)[None, :]
    o = tl.load(O + (b * sob + h * soh) * ALIGN + (offs_m[:, None] * son) * ALIGN + offs_d[None, :],
                mask=ok, other=0.0)
    do = tl.load(DO + (b * sdb + h * sdh) * ALIGN + (offs_m[:, None] * sdn) * ALIGN + offs_d[None, :],
                 mask=ok, other=0.0)
    tl.store(DELTA + bh.to(tl.int64) * M + offs_m, tl.sum(o.to(ACC) * do.to(ACC), 1), mask=offs_m < M)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV,
                     sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
                     skgb, skgh, skgn, svgb, svgh, svgn,
                     H, M, N, M_BUCKET, N_BUCKET, qk_scale, scale,
                     D: tl.constexpr, DL: tl.constexpr, DH: tl.constexpr, ALIGN: tl.constexpr,
                     TILE: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per BLOCK_N keys, streaming the M queries in BLOCK_M steps (works on P^T)."""
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
    lse_ptrs = LSE + bh.to(tl.int64) * M + offs_m
    delta_ptrs = DELTA + bh.to(tl.int64) * M + offs_m
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

    for start_m in range(0, M, BLOCK_M):
        r_ok = start_m + offs_m < M
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
                   H, M, N, M_BUCKET, N_BUCKET, qk_scale, scale,
                   D: tl.constexpr, DL: tl.constexpr, DH: tl.constexpr, ALIGN: tl.constexpr,
                   TILE: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, EVEN_N: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per BLOCK_M queries, streaming the N keys in BLOCK_N steps."""
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, DL)
    d_ok = (offs_d < D)[None, :]
    m_ok = (offs_m < M)[:, None]
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
    lse2 = tl.load(LSE + bh.to(tl.int64) * M + offs_m, mask=offs_m < M, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + bh.to(tl.int64) * M + offs_m, mask=offs_m < M, other=0.0)

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
# sequences (M and N < _TUNE_FROM_N), where tuning is not worth its compile time.
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
# Before Hopper (A100, sm_80): mma.sync keeps every accumulator in registers and a block
# gets at most 163 KB of shared memory, and ptxas spills several of the rows above there.
# These pools hold only rows that compile for sm_80 without spills and within that shared
# memory at every head width of the pool (benchmarks/a100_configs.py compiles each one;
# tests/test_a100_configs.py keeps it so). The forward keeps Hopper's first choice.
_TABLES_SM80 = {
    "fwd": {"small": [(128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3), (128, 32, 8, 3), (64, 64, 4, 2)],
            "large": [(64, 32, 8, 2), (32, 32, 4, 2), (32, 32, 8, 2)],
            "huge": [(16, 16, 4, 1)]},
    "bwd": {"small": [(64, 32, 4, 4), (64, 32, 4, 3), (64, 16, 4, 4)],
            "large": [(64, 32, 8, 1), (32, 32, 8, 2)],
            "huge": [(16, 16, 4, 1)]},
}
_TUNE_FROM_N = 256  # compared with the M/N buckets, kernel arguments that only key the tuning


def _table_configs(name, outer_is_m):
    def configs(table):
        return {pool: [triton.Config({"BLOCK_M": a, "BLOCK_N": b} if outer_is_m else {"BLOCK_M": b, "BLOCK_N": a},
                                     num_warps=w, num_stages=s) for a, b, w, s in rows]
                for pool, rows in table[name].items()}
    by_arch = {"sm90": configs(_TABLES), "sm80": configs(_TABLES_SM80)}

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        q = args["Q"]
        pools = by_arch["sm80" if torch.cuda.get_device_capability(q.device)[0] < 9 else "sm90"]
        elem, width = q.element_size(), args["DL"] + args["DH"]
        pool = "small" if elem == 2 and width <= 128 else "large" if elem * width <= 512 else "huge"
        return pools[pool] if max(args["M_BUCKET"], args["N_BUCKET"]) >= _TUNE_FROM_N else pools[pool][:1]
    return [c for pools in by_arch.values() for pool in pools.values() for c in pool], prune


def _build(kernel, name, outer_is_m=True, even_n=True):
    # EVEN_N drops the key mask when N is a multiple of the key block (the DiT shapes).
    heur = triton.heuristics({"EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0}) if even_n else (lambda f: f)
    if _INTERPRET:  # one fixed config: autotune would need a CPU timer and time for nothing
        return heur(kernel)
    configs, prune = _table_configs(name, outer_is_m)
    return triton.autotune(configs=configs, key=["M_BUCKET", "N_BUCKET", "D"],
                           prune_configs_by={"early_config_prune": prune})(heur(kernel))


_fwd = _build(_fwd_kernel, "fwd")
_bwd_dkdv = _build(_bwd_dkdv_kernel, "bwd", outer_is_m=False, even_n=False)
_bwd_dq = _build(_bwd_dq_kernel, "bwd")
