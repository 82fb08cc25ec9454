"""Fused LayerNorm + adaLN modulation (and the residual-gate variant).

x is (B, N, C); shift, scale and gate are per sample, (B, C), broadcast over tokens.
LayerNorm has no affine parameters (adaLN supplies them) and is computed in fp32.

Triton path, memory traffic per call (R = B*N rows, s = bytes per element):
  adaln_modulate        forward reads x, writes out              (2 R C s)
                        backward reads x, dout, writes dx        (3 R C s)
  gated_residual_adaln  forward reads x, y, writes h, out        (4 R C s)
                        backward reads h, y, dh, dout, writes dx, dy  (6 R C s)
plus (R,) fp32 mean/rstd saved by the forward and small (B, chunks, C) fp32 partials.

Per-sample gradients (dshift, dscale, dgate) are reduced without atomics, so they are
deterministic: each backward program owns a contiguous chunk of one sample's tokens,
accumulates its column sums in registers and writes one row of a (3, B, chunks, C)
buffer, which a single torch .sum over the chunk axis finishes.

The LayerNorm statistics of gated_residual_adaln are taken over h as stored (rounded
to the input dtype), so the forward and the backward, which reloads h, see the same
numbers.

The Triton path wants one dtype for every input and raises ValueError naming the
odd one out; the torch path is the reference itself and follows PyTorch promotion.
"""
import torch
import triton
import triton.language as tl

from .backend import use_triton

PREFETCH = True  # backward loads tile t+1 before working on tile t (see _adaln_bwd_kernel)
MAX_C = 16384  # one row lives in registers; beyond this the kernel would spill badly


def adaln_modulate_reference(x, shift, scale, eps=1e-6):
    """LayerNorm(x) * (1 + scale) + shift, in x's dtype."""
    xf = x.float()
    mean = xf.mean(-1, keepdim=True)
    var = xf.var(-1, keepdim=True, unbiased=False)
    x_hat = (xf - mean) * torch.rsqrt(var + eps)
    out = x_hat * (1 + scale.float()[:, None]) + shift.float()[:, None]
    return out.to(x.dtype)


def gated_residual_adaln_reference(x, y, gate, shift, scale, eps=1e-6):
    """(h, adaln_modulate(h)) with h = x + gate * y: the DiT block's residual seam."""
    h = x + gate[:, None] * y
    return h, adaln_modulate_reference(h, shift, scale, eps)


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _adaln_fwd_kernel(X, Y, GATE, SHIFT, SCALE, H, OUT, MEAN, RSTD, N, C, eps,
                      RESIDUAL: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
                      ACC: tl.constexpr):
    # program (i, b): tokens [i*ROWS, (i+1)*ROWS) of sample b, whole rows in registers
    b = tl.program_id(1)
    tok = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_C)
    row_ok = tok < N
    col_ok = cols < C
    mask = row_ok[:, None] & col_ok[None, :]
    rows = b.to(tl.int64) * N + tok  # int64: B*N*C can pass 2**31
    offs = rows[:, None] * C + cols[None, :]
    pcols = b.to(tl.int64) * C + cols

    x = tl.load(X + offs, mask=mask, other=0.0)
    if RESIDUAL:
        y = tl.load(Y + offs, mask=mask, other=0.0).to(ACC)
        g = tl.load(GATE + pcols, mask=col_ok, other=0.0).to(ACC)
        x = (x.to(ACC) + g[None, :] * y).to(H.dtype.element_ty)
        tl.store(H + offs, x, mask=mask)
    x = x.to(ACC)

    mean = tl.sum(x, axis=1) / C
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / C + eps)
    shift = tl.load(SHIFT + pcols, mask=col_ok, other=0.0).to(ACC)
    scale = tl.load(SCALE + pcols, mask=col_ok, other=0.0).to(ACC)
    out = xc * rstd[:, None] * (1.0 + scale[None, :]) + shift[None, :]
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _bwd_tile(X, Y, DH, DOUT, MEAN, RSTD, b, tile, tok_end, N, C, cols, col_ok,
              RESIDUAL: tl.constexpr, ROWS: tl.constexpr):
    """Loads one tile of the backward's inputs, in their storage dtypes (half the
    registers of fp32 while they wait as a prefetch). Tokens at or past tok_end (the
    end of the program's chunk) are masked off. Without RESIDUAL, dh and y are
    stand-ins that are never used."""
    tok = tile * ROWS + tl.arange(0, ROWS)
    row_ok = (tok < N) & (tok < tok_end)
    mask = row_ok[:, None] & col_ok[None, :]
    rows = b.to(tl.int64) * N + tok
    offs = rows[:, None] * C + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0)
    dout = tl.load(DOUT + offs, mask=mask, other=0.0)
    mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
    rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
    if RESIDUAL:
        dh = tl.load(DH + offs, mask=mask, other=0.0)
        y = tl.load(Y + offs, mask=mask, other=0.0)
    else:
        dh = dout
        y = dout
    return x, dout, mean, rstd, dh, y


@triton.jit
def _adaln_bwd_kernel(X, Y, GATE, SCALE, MEAN, RSTD, DH, DOUT, DX, DY, PART,
                      N, C, n_chunks, tiles_per_prog,
                      RESIDUAL: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
                      ACC: tl.constexpr, PREFETCH: tl.constexpr):
    # program (chunk, b) walks tiles_per_prog tiles of ROWS tokens of sample b; X is h
    # when RESIDUAL. PART is (3, B, n_chunks, C): dshift, dscale, dgate partial sums.
    chunk = tl.program_id(0)
    b = tl.program_id(1)
    B = tl.num_programs(1)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    pcols = b.to(tl.int64) * C + cols
    one_plus_scale = 1.0 + tl.load(SCALE + pcols, mask=col_ok, other=0.0).to(ACC)
    if RESIDUAL:
        gate = tl.load(GATE + pcols, mask=col_ok, other=0.0).to(ACC)

    acc_shift = tl.zeros([ROWS, BLOCK_C], dtype=ACC)
    acc_scale = tl.zeros([ROWS, BLOCK_C], dtype=ACC)
    acc_gate = tl.zeros([ROWS, BLOCK_C], dtype=ACC)
    first = chunk * tiles_per_prog
    end = (first + tiles_per_prog) * ROWS
    if PREFETCH:
        # software pipelining by hand: the next tile's loads are in flight while this
        # tile's reductions and stores run, so a program never idles on memory latency
        x, dout, mean, rstd, dh, y = _bwd_tile(X, Y, DH, DOUT, MEAN, RSTD, b, first, end, N, C, cols, col_ok,
                                               RESIDUAL, ROWS)
    for t in range(0, tiles_per_prog):
        if PREFETCH:
            nx, ndout, nmean, nrstd, ndh, ny = _bwd_tile(X, Y, DH, DOUT, MEAN, RSTD, b, first + t + 1,
                                                         end, N, C, cols, col_ok, RESIDUAL, ROWS)
        else:
            x, dout, mean, rstd, dh, y = _bwd_tile(X, Y, DH, DOUT, MEAN, RSTD, b, first + t, end, N, C, cols,
                                                   col_ok, RESIDUAL, ROWS)
        tok = (first + t) * ROWS + tl.arange(0, ROWS)
        mask = (tok < N)[:, None] & col_ok[None, :]
        offs = (b.to(tl.int64) * N + tok)[:, None] * C + cols[None, :]

        rstd_f = rstd.to(ACC)
        x_hat = tl.where(mask, (x.to(ACC) - mean.to(ACC)[:, None]) * rstd_f[:, None], 0.0)
        dout_f = dout.to(ACC)
        acc_shift += dout_f
        acc_scale += dout_f * x_hat
        # LayerNorm backward: dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))
        g = dout_f * one_plus_scale[None, :]
        mean_g = tl.sum(g, axis=1) / C
        mean_gx = tl.sum(g * x_hat, axis=1) / C
        dx = (g - mean_g[:, None] - x_hat * mean_gx[:, None]) * rstd_f[:, None]
        if RESIDUAL:
            dx += dh.to(ACC)
            acc_gate += dx * y.to(ACC)
            tl.store(DY + offs, (dx * gate[None, :]).to(DY.dtype.element_ty), mask=mask)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        if PREFETCH:
            x, dout, mean, rstd, dh, y = nx, ndout, nmean, nrstd, ndh, ny

    part = (b.to(tl.int64) * n_chunks + chunk) * C + cols
    plane = B.to(tl.int64) * n_chunks * C
    tl.store(PART + part, tl.sum(acc_shift, axis=0), mask=col_ok)
    tl.store(PART + plane + part, tl.sum(acc_scale, axis=0), mask=col_ok)
    if RESIDUAL:
        tl.store(PART + 2 * plane + part, tl.sum(acc_gate, axis=0), mask=col_ok)


# ----------------------------------------------------------------------------- launchers

def _acc_dtype(dtype):
    # float64 exists for gradcheck; every production dtype computes in fp32
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def _launch_config(C, N, backward=False):
    """(rows per tile, BLOCK_C, num_warps), from a sweep on an H200 (bf16, CUDA-graph
    timed, C in {384, 768, 1152}): the forward liked ~32 elements per thread per tensor
    and 2K-4K-element tiles; the backward, which holds more tensors (and a prefetched
    second set), ~16 elements per thread and 2K-element tiles. 8 warps on small tiles
    cost up to 2x in the backward; 64 elements per thread with prefetch spilled (10x)."""
    block_c = triton.next_power_of_2(C)
    target = 2048 if backward or block_c <= 512 else 4096
    rows = max(1, min(16, target // block_c, triton.next_power_of_2(N)))
    tile = rows * block_c
    num_warps = max(4, min(16, tile // 512)) if backward else max(2, min(16, tile // 1024))
    return rows, block_c, num_warps


def _programs_wanted(device):
    # the backward loops over tokens; a few programs per SM hide latency, more would
    # only grow the partial-sum buffer
    if device.type == "cuda":
        return 8 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _check(x, shift, scale, y=None, gate=None):
    if x.dim() != 3:
        raise ValueError(f"x must be (B, N, C), got shape {tuple(x.shape)}")
    B, N, C = x.shape
    named = [("shift", shift), ("scale", scale)] + ([("y", y), ("gate", gate)] if y is not None else [])
    for name, t in named:
        if name == "y":  # the branch output may be autocast's dtype while the residual stays fp32
            if t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
                raise ValueError(f"y has unsupported dtype {t.dtype}")
        elif t.dtype != x.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but x has {x.dtype}; all inputs must share one dtype")
        want = (B, N, C) if name == "y" else (B, C)
        if tuple(t.shape) != want:
            raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"x has unsupported dtype {x.dtype}")


def adaln_forward(x, shift, scale, eps=1e-6, y=None, gate=None, out=None, h=None, mean=None, rstd=None):
    """Launch the forward kernel. With y and gate given, h = x + gate*y is normalised.

    Returns (out, h, mean, rstd); h is None without y. Buffers passed in are written
    in full (the tests hand in NaN-filled ones to check that).
    """
    residual = y is not None
    _check(x, shift, scale, y, gate)
    B, N, C = x.shape
    if C > MAX_C:
        raise ValueError(f"C={C} exceeds the kernel's limit of {MAX_C}; use backend='torch'")
    x, shift, scale = x.contiguous(), shift.contiguous(), scale.contiguous()
    if residual:
        y, gate = y.contiguous(), gate.contiguous()
        h = torch.empty_like(x) if h is None else h
    acc_tl, acc_torch = _acc_dtype(x.dtype)
    out = torch.empty_like(x) if out is None else out
    mean = torch.empty((B, N), device=x.device, dtype=acc_torch) if mean is None else mean
    rstd = torch.empty((B, N), device=x.device, dtype=acc_torch) if rstd is None else rstd
    rows, block_c, num_warps = _launch_config(C, N)
    grid = (triton.cdiv(N, rows), B)
    _adaln_fwd_kernel[grid](
        x, y if residual else x, gate if residual else shift, shift, scale,
        h if residual else out, out, mean, rstd, N, C, eps,
        RESIDUAL=residual, ROWS=rows, BLOCK_C=block_c, ACC=acc_tl, num_warps=num_warps)
    return out, (h if residual else None), mean, rstd


def adaln_backward(x, scale, mean, rstd, dout, y=None, gate=None, dh=None, dx=None, dy=None):
    """Launch the backward kernel; x is h for the residual variant.

    Returns (dx, dy, dgate, dshift, dscale); dy and dgate are None without y.
    dx = d(total) wrt h, which for the residual variant is also the gradient of x.
    """
    residual = y is not None
    B, N, C = x.shape
    acc_tl, acc_torch = _acc_dtype(x.dtype)
    dout = dout.contiguous()
    dx = torch.empty_like(x) if dx is None else dx
    if residual:
        dh = torch.zeros_like(x) if dh is None else dh.contiguous()
        dy = torch.empty_like(y) if dy is None else dy
    rows, block_c, num_warps = _launch_config(C, N, backward=True)
    tiles = triton.cdiv(N, rows)
    chunks_wanted = max(1, min(tiles, triton.cdiv(_programs_wanted(x.device), B)))
    tiles_per_prog = triton.cdiv(tiles, chunks_wanted)
    n_chunks = triton.cdiv(tiles, tiles_per_prog)
    part = torch.empty((3 if residual else 2, B, n_chunks, C), device=x.device, dtype=acc_torch)
    prefetch = PREFETCH and rows * block_c <= 16 * 32 * num_warps  # more would spill
    _adaln_bwd_kernel[(n_chunks, B)](
        x, y if residual else x, gate if residual else scale, scale, mean, rstd,
        dh if residual else dout, dout, dx, dy if residual else dx, part,
        N, C, n_chunks, tiles_per_prog,
        RESIDUAL=residual, ROWS=rows, BLOCK_C=block_c, ACC=acc_tl, PREFETCH=prefetch, num_warps=num_warps)
    sums = part.sum(2).to(x.dtype)  # one deterministic reduction for all partials
    dgate = sums[2] if residual else None
    return dx, (dy if residual else None), dgate, sums[0], sums[1]


# ----------------------------------------------------------------------------- autograd

class _AdaLNModulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, eps):
        out, _, mean, rstd = adaln_forward(x, shift, scale, eps)
        ctx.save_for_backward(x, scale, mean, rstd)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, scale, mean, rstd = ctx.saved_tensors
        dx, _, _, dshift, dscale = adaln_backward(x.contiguous(), scale.contiguous(), mean, rstd, dout)
        return dx, dshift, dscale, None


class _GatedResidualAdaLN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, gate, shift, scale, eps):
        out, h, mean, rstd = adaln_forward(x, shift, scale, eps, y=y, gate=gate)
        # h is an output anyway, so keeping it costs no memory and saves the
        # backward a read of x (h = x + gate*y would need both x and y)
        ctx.save_for_backward(h, y.contiguous(), gate.contiguous(), scale.contiguous(), mean, rstd)
        return h, out

    @staticmethod
    def backward(ctx, dh, dout):
        h, y, gate, scale, mean, rstd = ctx.saved_tensors
        dx, dy, dgate, dshift, dscale = adaln_backward(h, scale, mean, rstd, dout, y=y, gate=gate, dh=dh)
        return dx, dy, dgate, dshift, dscale, None


# The kernels are opaque to torch.compile: a compiled model graph-breaks around them.
# Eager calls skip the disable wrapper, whose cost shows on small shapes.
_adaln_opaque = torch.compiler.disable(_AdaLNModulate.apply)
_gated_opaque = torch.compiler.disable(_GatedResidualAdaLN.apply)


def adaln_modulate(x, shift, scale, eps=1e-6, backend="auto"):
    """LayerNorm(x) * (1 + scale) + shift. x (B, N, C); shift, scale (B, C), same dtype as x."""
    if use_triton(backend, x):
        shift, scale = shift.to(x.dtype), scale.to(x.dtype)  # (B, C): autocast may hand these in bf16
        _check(x, shift, scale)
        apply = _adaln_opaque if torch.compiler.is_compiling() else _AdaLNModulate.apply
        return apply(x, shift, scale, eps)
    return adaln_modulate_reference(x, shift, scale, eps)


def gated_residual_adaln(x, y, gate, shift, scale, eps=1e-6, backend="auto"):
    """(h, adaln_modulate(h, shift, scale)) with h = x + gate[:, None] * y, in one pass."""
    if use_triton(backend, x):
        gate, shift, scale = gate.to(x.dtype), shift.to(x.dtype), scale.to(x.dtype)
        _check(x, shift, scale, y, gate)
        apply = _gated_opaque if torch.compiler.is_compiling() else _GatedResidualAdaLN.apply
        return apply(x, y, gate, shift, scale, eps)
    return gated_residual_adaln_reference(x, y, gate, shift, scale, eps)
