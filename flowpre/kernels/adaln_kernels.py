"""The adaLN kernels' Triton code (launched from adaln.py, which holds the references,
tilings, launchers and autograd Functions).

x is (B, N, C); shift, scale and gate are (B, C). LayerNorm statistics in ACC (fp32).
"""
import triton
import triton.language as tl

# ----------------------------------------------------------------------------- kernels
# A row of C columns can be held as two power-of-two column blocks, [0, BLOCK_A) and
# [BLOCK_A, BLOCK_A + BLOCK_B), so DiT widths waste almost no registers: 1152 = 1024 + 128
# where a single next-power-of-two block carries 2048 lanes, 44% of them masked. In the
# backward, registers bound occupancy, and occupancy times prefetch depth is the loads
# in flight that reach HBM bandwidth; the forward is not register-bound and keeps one
# padded block (launch_config). SPLIT is False with one block.

@triton.jit
def _col_block(rows, row_ok, col0, C, BLOCK: tl.constexpr):
    cols = col0 + tl.arange(0, BLOCK)
    col_ok = cols < C
    return cols, col_ok, row_ok[:, None] & col_ok[None, :], rows[:, None] * C + cols[None, :]


@triton.jit
def _fwd_load(X, Y, GATE, H, rows, row_ok, pcol0, col0, C,
              BLOCK: tl.constexpr, RESIDUAL: tl.constexpr, ACC: tl.constexpr):
    """x (or h = x + gate*y, stored as it goes) of one column block, masked lanes 0."""
    cols, col_ok, mask, offs = _col_block(rows, row_ok, col0, C, BLOCK)
    x = tl.load(X + offs, mask=mask, other=0.0)
    if RESIDUAL:
        y = tl.load(Y + offs, mask=mask, other=0.0).to(ACC)
        g = tl.load(GATE + pcol0 + cols, mask=col_ok, other=0.0).to(ACC)
        x = (x.to(ACC) + g[None, :] * y).to(H.dtype.element_ty)
        tl.store(H + offs, x, mask=mask)
    return x.to(ACC), mask


@triton.jit
def _fwd_store(OUT, SHIFT, SCALE, xc, rstd, rows, row_ok, pcol0, col0, C, BLOCK: tl.constexpr,
               ACC: tl.constexpr):
    cols, col_ok, mask, offs = _col_block(rows, row_ok, col0, C, BLOCK)
    shift = tl.load(SHIFT + pcol0 + cols, mask=col_ok, other=0.0).to(ACC)
    scale = tl.load(SCALE + pcol0 + cols, mask=col_ok, other=0.0).to(ACC)
    out = xc * rstd[:, None] * (1.0 + scale[None, :]) + shift[None, :]
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _adaln_fwd_kernel(X, Y, GATE, SHIFT, SCALE, H, OUT, MEAN, RSTD, N, C, eps,
                      RESIDUAL: tl.constexpr, ROWS: tl.constexpr, BLOCK_A: tl.constexpr,
                      BLOCK_B: tl.constexpr, SPLIT: tl.constexpr, ACC: tl.constexpr):
    # program (i, b): tokens [i*ROWS, (i+1)*ROWS) of sample b, whole rows in registers
    b = tl.program_id(1).to(tl.int64)  # int64: B*N*C can pass 2**31
    tok = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = tok < N
    rows = b * N + tok
    pcol0 = b * C

    xa, mask_a = _fwd_load(X, Y, GATE, H, rows, row_ok, pcol0, 0, C, BLOCK_A, RESIDUAL, ACC)
    total = tl.sum(xa, axis=1)
    if SPLIT:
        xb, mask_b = _fwd_load(X, Y, GATE, H, rows, row_ok, pcol0, BLOCK_A, C, BLOCK_B, RESIDUAL, ACC)
        total += tl.sum(xb, axis=1)
    mean = total / C
    xa = tl.where(mask_a, xa - mean[:, None], 0.0)
    squares = tl.sum(xa * xa, axis=1)
    if SPLIT:
        xb = tl.where(mask_b, xb - mean[:, None], 0.0)
        squares += tl.sum(xb * xb, axis=1)
    rstd = 1.0 / tl.sqrt(squares / C + eps)
    _fwd_store(OUT, SHIFT, SCALE, xa, rstd, rows, row_ok, pcol0, 0, C, BLOCK_A, ACC)
    if SPLIT:
        _fwd_store(OUT, SHIFT, SCALE, xb, rstd, rows, row_ok, pcol0, BLOCK_A, C, BLOCK_B, ACC)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _bwd_load(X, Y, DH, DOUT, rows, row_ok, col0, C, BLOCK: tl.constexpr, RESIDUAL: tl.constexpr):
    """One column block of a tile of the backward's inputs, in their storage dtypes
    (half the registers of fp32 while they wait as a prefetch). Without RESIDUAL, dh
    and y are stand-ins that are never used."""
    _, _, mask, offs = _col_block(rows, row_ok, col0, C, BLOCK)
    x = tl.load(X + offs, mask=mask, other=0.0)
    dout = tl.load(DOUT + offs, mask=mask, other=0.0)
    if RESIDUAL:
        dh = tl.load(DH + offs, mask=mask, other=0.0)
        y = tl.load(Y + offs, mask=mask, other=0.0)
    else:
        dh = dout
        y = dout
    return x, dout, dh, y


@triton.jit
def _bwd_tile(X, Y, DH, DOUT, MEAN, RSTD, b, tile, tok_end, N, C,
              RESIDUAL: tl.constexpr, ROWS: tl.constexpr, BLOCK_A: tl.constexpr,
              BLOCK_B: tl.constexpr, SPLIT: tl.constexpr):
    """Loads tile `tile` of sample b: both column blocks and the row statistics. Tokens at
    or past tok_end (the end of the program's chunk) are masked off."""
    tok = tile * ROWS + tl.arange(0, ROWS)
    row_ok = (tok < N) & (tok < tok_end)
    rows = b * N + tok
    mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
    rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
    a = _bwd_load(X, Y, DH, DOUT, rows, row_ok, 0, C, BLOCK_A, RESIDUAL)
    if SPLIT:
        bb = _bwd_load(X, Y, DH, DOUT, rows, row_ok, BLOCK_A, C, BLOCK_B, RESIDUAL)
    else:
        bb = a  # never used
    return mean, rstd, a, bb


@triton.jit
def _bwd_grads(x, dout, mean, rstd, one_plus_scale, mask, ACC: tl.constexpr):
    """x_hat, g = dout * (1 + scale) and dout in ACC, for one column block."""
    x_hat = tl.where(mask, (x.to(ACC) - mean[:, None]) * rstd[:, None], 0.0)
    dout_f = dout.to(ACC)
    return x_hat, dout_f * one_plus_scale[None, :], dout_f


@triton.jit
def _bwd_store(DX, DY, x_hat, g, dout, dh, y, gate, mean_g, mean_gx, rstd, mask, offs,
               acc_shift, acc_scale, acc_gate, RESIDUAL: tl.constexpr, ACC: tl.constexpr):
    """dx (and dy) of one column block, given the row means; returns the updated
    column-sum accumulators."""
    # LayerNorm backward: dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))
    dx = (g - mean_g[:, None] - x_hat * mean_gx[:, None]) * rstd[:, None]
    acc_shift += dout
    acc_scale += dout * x_hat
    if RESIDUAL:
        dx += dh.to(ACC)
        acc_gate += dx * y.to(ACC)
        tl.store(DY + offs, (dx * gate[None, :]).to(DY.dtype.element_ty), mask=mask)
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
    return acc_shift, acc_scale, acc_gate


@triton.jit
def _store_partials(PART, plane, part, acc_shift, acc_scale, acc_gate, col_ok, RESIDUAL: tl.constexpr):
    tl.store(PART + part, tl.sum(acc_shift, axis=0), mask=col_ok)
    tl.store(PART + plane + part, tl.sum(acc_scale, axis=0), mask=col_ok)
    if RESIDUAL:
        tl.store(PART + 2 * plane + part, tl.sum(acc_gate, axis=0), mask=col_ok)


@triton.jit
def _adaln_bwd_kernel(X, Y, GATE, SCALE, MEAN, RSTD, DH, DOUT, DX, DY, PART,
                      N, C, n_chunks, tiles_per_prog,
                      RESIDUAL: tl.constexpr, ROWS: tl.constexpr, BLOCK_A: tl.constexpr,
                      BLOCK_B: tl.constexpr, SPLIT: tl.constexpr, ACC: tl.constexpr,
                      PREFETCH: tl.constexpr):
    # program (chunk, b) walks tiles_per_prog tiles of ROWS tokens of sample b; X is h
    # when RESIDUAL. PART is (3, B, n_chunks, C): dshift, dscale, dgate partial sums.
    # Suffix _a / _b: the two column blocks.
    chunk = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    B = tl.num_programs(1)
    pcol0 = b * C
    cols_a = tl.arange(0, BLOCK_A)
    cols_b = BLOCK_A + tl.arange(0, BLOCK_B)
    ok_a = cols_a < C
    ok_b = cols_b < C
    scale_a = 1.0 + tl.load(SCALE + pcol0 + cols_a, mask=ok_a, other=0.0).to(ACC)
    scale_b = 1.0 + tl.load(SCALE + pcol0 + cols_b, mask=ok_b, other=0.0).to(ACC)
    gate_a = scale_a
    gate_b = scale_b
    if RESIDUAL:
        gate_a = tl.load(GATE + pcol0 + cols_a, mask=ok_a, other=0.0).to(ACC)
        gate_b = tl.load(GATE + pcol0 + cols_b, mask=ok_b, other=0.0).to(ACC)

    acc_shift_a = tl.zeros([ROWS, BLOCK_A], dtype=ACC)
    acc_scale_a = tl.zeros([ROWS, BLOCK_A], dtype=ACC)
    acc_gate_a = tl.zeros([ROWS, BLOCK_A], dtype=ACC)
    acc_shift_b = tl.zeros([ROWS, BLOCK_B], dtype=ACC)
    acc_scale_b = tl.zeros([ROWS, BLOCK_B], dtype=ACC)
    acc_gate_b = tl.zeros([ROWS, BLOCK_B], dtype=ACC)
    first = chunk * tiles_per_prog
    end = (first + tiles_per_prog) * ROWS
    # Software pipelining by hand: PREFETCH tiles ahead are loading while this tile's
    # reductions and stores run, so a program never idles on memory latency. Each tile
    # ahead costs registers (its inputs in their storage dtype), so the depth trades
    # against occupancy; launch_config picks it.
    if PREFETCH >= 1:
        mean, rstd, in_a, in_b = _bwd_tile(X, Y, DH, DOUT, MEAN, RSTD, b, first, end, N, C,
                                           RESIDUAL, ROWS, BLOCK_A, BLOCK_B, SPLIT)
    if PREFETCH >= 2:
        second = _bwd_tile(X, Y, DH, DOUT, MEAN, RSTD, b, first + 1, end, N, C,
                           RESIDUAL, ROWS, BLOCK_A, BLOCK_B, SPLIT)
    for t in range(0, tiles_per_prog):
        if PREFETCH >= 1:
            ahead = _bwd_tile(X, Y, DH, DOUT, MEAN, RSTD, b, first + t + PREFETCH, end, N, C,
                              RESIDUAL, ROWS, BLOCK_A, BLOCK_B, SPLIT)
        else:
            mean, rstd, in_a, in_b = _bwd_tile(X, Y, DH, DOUT, MEAN, RSTD, b, first + t, end, N, C,
                                               RESIDUAL, ROWS, BLOCK_A, BLOCK_B, SPLIT)
        tok = (first + t) * ROWS + tl.arange(0, ROWS)
        row_ok = tok < N
        rows = b * N + tok
        mean = mean.to(ACC)
        rstd = rstd.to(ACC)
        _, _, mask_a, offs_a = _col_block(rows, row_ok, 0, C, BLOCK_A)
        x_hat_a, g_a, dout_a = _bwd_grads(in_a[0], in_a[1], mean, rstd, scale_a, mask_a, ACC)
        sum_g = tl.sum(g_a, axis=1)
        sum_gx = tl.sum(g_a * x_hat_a, axis=1)
        if SPLIT:
            _, _, mask_b, offs_b = _col_block(rows, row_ok, BLOCK_A, C, BLOCK_B)
            x_hat_b, g_b, dout_b = _bwd_grads(in_b[0], in_b[1], mean, rstd, scale_b, mask_b, ACC)
            sum_g += tl.sum(g_b, axis=1)
            sum_gx += tl.sum(g_b * x_hat_b, axis=1)
        mean_g = sum_g / C
        mean_gx = sum_gx / C
        acc_shift_a, acc_scale_a, acc_gate_a = _bwd_store(
            DX, DY, x_hat_a, g_a, dout_a, in_a[2], in_a[3], gate_a, mean_g, mean_gx, rstd, mask_a, offs_a,
            acc_shift_a, acc_scale_a, acc_gate_a, RESIDUAL, ACC)
        if SPLIT:
            acc_shift_b, acc_scale_b, acc_gate_b = _bwd_store(
                DX, DY, x_hat_b, g_b, dout_b, in_b[2], in_b[3], gate_b, mean_g, mean_gx, rstd, mask_b, offs_b,
                acc_shift_b, acc_scale_b, acc_gate_b, RESIDUAL, ACC)
        if PREFETCH == 1:
            mean, rstd, in_a, in_b = ahead
        if PREFETCH == 2:
            mean, rstd, in_a, in_b = second
            second = ahead

    part = (b * n_chunks + chunk) * C
    plane = B.to(tl.int64) * n_chunks * C
    _store_partials(PART, plane, part + cols_a, acc_shift_a, acc_scale_a, acc_gate_a, ok_a, RESIDUAL)
    if SPLIT:
        _store_partials(PART, plane, part + cols_b, acc_shift_b, acc_scale_b, acc_gate_b, ok_b, RESIDUAL)
