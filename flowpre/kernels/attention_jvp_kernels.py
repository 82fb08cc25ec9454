"""Forward-mode flash attention: the Triton kernel behind attention_jvp.py.

One pass over the keys yields the output O and its tangent tO (the JVP) together,
without an M x N matrix in memory. With S = scale q k^T, P = softmax_rows(S), O = P v
and the tangents tq, tk, tv of q, k, v:

    tS = scale (tq k^T + q tk^T)
    tP = P o (tS - mu),            mu = rowsum(P o tS)    (o: elementwise; mu per query)
    tO = tP v + P tv = (P o tS) v + P tv - mu O

Online over key blocks, with the running row maximum m and unnormalised p = exp(S - m):
    l     += rowsum(p)            acc_o += p v
    mu_l  += rowsum(p o tS)       acc_t += (p o tS) v + p tv
every accumulator rescaled by exp(m_old - m_new) when the maximum moves, as in the
plain forward. At the end O = acc_o / l, mu = mu_l / l and tO = (acc_t - mu acc_o) / l.
That is six tile products per key block (S; the two halves of tS; p v, (p o tS) v and
p tv), against two for the plain forward: 3x its FLOPs. A missing (None) tangent's
products are left out at compile time: its half of tS for tq or tk, (p o tS) v when
both are missing, p tv without tv.

Layout conventions (head-dim split DL + DH, strides divided by ALIGN, int64 head
offsets, TILE/ACC dtypes) are those of attention_kernels.py; see the comment there.
"""
import triton
import triton.language as tl

from .attention_kernels import _INTERPRET


@triton.jit
def _jvp_fwd_kernel(Q, K, V, TQ, TK, TV, O, TO, LSE,
                    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                    stqb, stqh, stqn, stkb, stkh, stkn, stvb, stvh, stvn,
                    sob, soh, son, stob, stoh, ston,
                    H, M, N, M_BUCKET, N_BUCKET, qk_scale, scale,
                    D: tl.constexpr, DL: tl.constexpr, DH: tl.constexpr, ALIGN: tl.constexpr,
                    TILE: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, EVEN_N: tl.constexpr,
                    HAS_TQ: tl.constexpr, HAS_TK: tl.constexpr, HAS_TV: tl.constexpr,
                    STORE_LSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per BLOCK_M of the M queries, streaming the N keys in BLOCK_N steps.

    A missing tangent (HAS_T* False) is zero: its pointer is a stand-in never read, and
    the products it would feed are left out at compile time.
    """
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, DL)
    d_ok = (offs_d < D)[None, :]
    m_ok = (offs_m < M)[:, None]
    q_rows = Q + (b * sqb + h * sqh) * ALIGN + (offs_m[:, None] * sqn) * ALIGN
    tq_rows = TQ + (b * stqb + h * stqh) * ALIGN + (offs_m[:, None] * stqn) * ALIGN
    k_rows = K + (b * skb + h * skh) * ALIGN + (offs_n[:, None] * skn) * ALIGN
    v_rows = V + (b * svb + h * svh) * ALIGN + (offs_n[:, None] * svn) * ALIGN
    tk_rows = TK + (b * stkb + h * stkh) * ALIGN + (offs_n[:, None] * stkn) * ALIGN
    tv_rows = TV + (b * stvb + h * stvh) * ALIGN + (offs_n[:, None] * stvn) * ALIGN
    q = tl.load(q_rows + offs_d[None, :], mask=m_ok & d_ok, other=0.0).to(TILE)
    if HAS_TQ:
        tq = tl.load(tq_rows + offs_d[None, :], mask=m_ok & d_ok, other=0.0).to(TILE)
    acc_o = tl.full([BLOCK_M, DL], 0.0, dtype=ACC)
    acc_t = tl.full([BLOCK_M, DL], 0.0, dtype=ACC)
    if DH > 0:
        offs_e = DL + tl.arange(0, DH)
        e_ok = (offs_e < D)[None, :]
        qe = tl.load(q_rows + offs_e[None, :], mask=m_ok & e_ok, other=0.0).to(TILE)
        if HAS_TQ:
            tqe = tl.load(tq_rows + offs_e[None, :], mask=m_ok & e_ok, other=0.0).to(TILE)
        acc_oe = tl.full([BLOCK_M, DH], 0.0, dtype=ACC)
        acc_te = tl.full([BLOCK_M, DH], 0.0, dtype=ACC)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.full([BLOCK_M], 0.0, dtype=ACC)
    mu_l = tl.full([BLOCK_M], 0.0, dtype=ACC)  # rowsum(p o tS), normalised by l at the end

    for start_n in range(0, N, BLOCK_N):
        n_ok = (start_n + offs_n < N)[:, None]
        k = tl.load(k_rows + offs_d[None, :], mask=n_ok & d_ok, other=0.0).to(TILE)
        v = tl.load(v_rows + offs_d[None, :], mask=n_ok & d_ok, other=0.0).to(TILE)
        s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC)
        if DH > 0:
            ke = tl.load(k_rows + offs_e[None, :], mask=n_ok & e_ok, other=0.0).to(TILE)
            ve = tl.load(v_rows + offs_e[None, :], mask=n_ok & e_ok, other=0.0).to(TILE)
            s = tl.dot(qe, tl.trans(ke), s, input_precision=PREC, out_dtype=ACC)
        # tS without its scale (applied once, to p o tS, below). Padded keys load k = tk
        # = 0, so their tS is 0 and nothing non-finite can reach the products.
        if HAS_TQ:
            ts = tl.dot(tq, tl.trans(k), input_precision=PREC, out_dtype=ACC)
            if DH > 0:
                ts = tl.dot(tqe, tl.trans(ke), ts, input_precision=PREC, out_dtype=ACC)
        if HAS_TK:
            tk = tl.load(tk_rows + offs_d[None, :], mask=n_ok & d_ok, other=0.0).to(TILE)
            if HAS_TQ:
                ts = tl.dot(q, tl.trans(tk), ts, input_precision=PREC, out_dtype=ACC)
            else:
                ts = tl.dot(q, tl.trans(tk), input_precision=PREC, out_dtype=ACC)
            if DH > 0:
                tke = tl.load(tk_rows + offs_e[None, :], mask=n_ok & e_ok, other=0.0).to(TILE)
                ts = tl.dot(qe, tl.trans(tke), ts, input_precision=PREC, out_dtype=ACC)
        # Scores in log2 units (qk_scale = scale * log2 e) so the softmax uses exp2.
        s = s * qk_scale
        if not EVEN_N:  # padded keys get zero weight; every block holds >= 1 real key
            s = tl.where((start_n + offs_n < N)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc_t = acc_t * alpha[:, None]
        if DH > 0:
            acc_te = acc_te * alpha[:, None]
        pt = p.to(TILE)
        if HAS_TV:
            tv = tl.load(tv_rows + offs_d[None, :], mask=n_ok & d_ok, other=0.0).to(TILE)
            acc_t = tl.dot(pt, tv, acc_t, input_precision=PREC, out_dtype=ACC)
            if DH > 0:
                tve = tl.load(tv_rows + offs_e[None, :], mask=n_ok & e_ok, other=0.0).to(TILE)
                acc_te = tl.dot(pt, tve, acc_te, input_precision=PREC, out_dtype=ACC)
        if HAS_TQ or HAS_TK:
            pts = p * (ts * scale)
            mu_l = mu_l * alpha + tl.sum(pts, 1)
            pts = pts.to(TILE)
            acc_t = tl.dot(pts, v, acc_t, input_precision=PREC, out_dtype=ACC)
            if DH > 0:
                acc_te = tl.dot(pts, ve, acc_te, input_precision=PREC, out_dtype=ACC)
        acc_o = tl.dot(pt, v, acc_o * alpha[:, None], input_precision=PREC, out_dtype=ACC)
        if DH > 0:
            acc_oe = tl.dot(pt, ve, acc_oe * alpha[:, None], input_precision=PREC, out_dtype=ACC)
        m_i = m_new
        k_rows += (BLOCK_N * skn) * ALIGN
        v_rows += (BLOCK_N * svn) * ALIGN
        tk_rows += (BLOCK_N * stkn) * ALIGN
        tv_rows += (BLOCK_N * stvn) * ALIGN

    # l_i >= 1 (the row maximum contributes exp2(0)), so no division by zero. Dividing
    # (not multiplying by 1 / l) keeps out's arithmetic that of the plain forward.
    mu = mu_l / l_i
    o_rows = O + (b * sob + h * soh) * ALIGN + (offs_m[:, None] * son) * ALIGN
    to_rows = TO + (b * stob + h * stoh) * ALIGN + (offs_m[:, None] * ston) * ALIGN
    tl.store(o_rows + offs_d[None, :], (acc_o / l_i[:, None]).to(O.dtype.element_ty), mask=m_ok & d_ok)
    tl.store(to_rows + offs_d[None, :], ((acc_t - mu[:, None] * acc_o) / l_i[:, None]).to(TO.dtype.element_ty),
             mask=m_ok & d_ok)
    if DH > 0:
        tl.store(o_rows + offs_e[None, :], (acc_oe / l_i[:, None]).to(O.dtype.element_ty), mask=m_ok & e_ok)
        tl.store(to_rows + offs_e[None, :],
                 ((acc_te - mu[:, None] * acc_oe) / l_i[:, None]).to(TO.dtype.element_ty), mask=m_ok & e_ok)
    if STORE_LSE:
        lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # back to natural log
        tl.store(LSE + bh.to(tl.int64) * M + offs_m, lse.to(LSE.dtype.element_ty), mask=offs_m < M)


# ----------------------------------------------------------------------------- tuning
# (BLOCK_M, BLOCK_N, num_warps, num_stages). The JVP keeps two [BLOCK_M, D] fp32
# accumulators, q and tq, and per key block up to four key-side tiles (k, v, tk, tv)
# and two score tiles (S and tS): about twice the plain forward's registers and shared
# memory, so key blocks are narrower than the forward's. Pools by element size and
# padded head width (DL + DH); the first entry of a pool runs untuned for short
# sequences (M and N < TUNE_FROM_N), the rest join the tuning above that.
# Chosen from ptxas builds of every entry for sm_90 and sm_80 at D = 16 to 256
# (benchmarks/results/attention_jvp_registers_offline.json; the tests recheck a subset):
# - "small", 16-bit heads up to 128 wide (the DiT shapes, on tensor cores): on sm_90 no
#   entry spills at D = 16, 40, 64, 72, the first three not at D = 128 either; on sm_80
#   the first entry spills nothing at D <= 72 and 8 bytes at D = 128. A D that breaks
#   16-byte row alignment (D = 100) spills 40-50 bytes on sm_90.
# - "wide16", 16-bit heads past 128 (up to 256): the first entry spills on neither.
# - "fp32" (3xTF32 on the GPU, see attention_jvp._gpu_meta) and "fp64" are correctness
#   paths, untuned: fp32/fp64 tiles hold 2-4x the bytes. All fit shared memory; fp32
#   spills ~200 bytes at D = 72-128 and ~8 KB in "fp32_wide", fp64 nothing at D <= 72.
JVP_TABLES = {
    "small": [(128, 32, 8, 3), (128, 32, 8, 2), (64, 32, 4, 3), (128, 64, 8, 2), (64, 32, 4, 2)],
    "wide16": [(32, 16, 4, 2), (32, 32, 4, 2), (64, 16, 8, 2)],
    "fp32": [(16, 16, 4, 2)],
    "fp32_wide": [(16, 16, 4, 1)],
    "fp64": [(32, 16, 4, 2), (16, 16, 4, 1)],
    "fp64_wide": [(16, 16, 4, 1)],
}
TUNE_FROM_N = 256  # compared with the M/N buckets, kernel arguments that only key the tuning
TUNE_KEY = ["M_BUCKET", "N_BUCKET", "D", "HAS_TQ", "HAS_TK", "HAS_TV"]


def pool_name(element_size, width):
    """Which JVP_TABLES pool serves inputs of this element size and padded head width."""
    if element_size == 2:
        return "small" if width <= 128 else "wide16"
    limit = 128 if element_size == 4 else 80
    return ("fp32" if element_size == 4 else "fp64") + ("" if width <= limit else "_wide")


def _configs():
    pools = {name: [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
                    for bm, bn, w, st in rows] for name, rows in JVP_TABLES.items()}

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        pool = pools[pool_name(args["Q"].element_size(), args["DL"] + args["DH"])]
        return pool if max(args["M_BUCKET"], args["N_BUCKET"]) >= TUNE_FROM_N else pool[:1]
    return [c for pool in pools.values() for c in pool], prune


def _build(kernel):
    # EVEN_N drops the key mask when N is a multiple of the key block (the DiT shapes).
    heur = triton.heuristics({"EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0})
    if _INTERPRET:  # one fixed config: autotune would need a CPU timer and time for nothing
        return heur(kernel)
    configs, prune = _configs()
    return triton.autotune(configs=configs, key=TUNE_KEY, prune_configs_by={"early_config_prune": prune})(heur(kernel))


_jvp_fwd = _build(_jvp_fwd_kernel)
