"""Fused LayerNorm + adaLN modulation (and the residual-gate variant).

x is (B, N, C); shift, scale and gate are per sample, (B, C), broadcast over tokens.
LayerNorm has no affine parameters (adaLN supplies them) and is computed in fp32.

Triton path, memory traffic per call (R = B*N rows, s = bytes per element):
  adaln_modulate        forward reads x, writes out              (2 R C s)
                        backward reads x, dout, writes dx        (3 R C s)
  gated_residual_adaln  forward reads x, y, writes h, out        (4 R C s)
                        backward reads h, y, dh, dout, writes dx, dy  (6 R C s)
plus (R,) fp32 mean/rstd saved by the forward and small (B, chunks, C) fp32 partials.
Under autocast the modulated output (out) is written in autocast's dtype, the dtype
the next matmul reads, while x and h stay fp32: that saves half of out's write and
the matmul's own cast (a read and a write of out).

Per-sample gradients (dshift, dscale, dgate) are reduced without atomics, so they are
deterministic: each backward program owns a contiguous chunk of one sample's tokens,
accumulates its column sums in registers and writes one row of a (3, B, chunks, C)
buffer, which a single torch .sum over the chunk axis finishes.

The LayerNorm statistics of gated_residual_adaln are taken over h as stored (rounded
to the input dtype), so the forward and the backward, which reloads h, see the same
numbers.

The Triton path wants one dtype for every input and raises ValueError naming the
odd one out; the torch path is the reference itself and follows PyTorch promotion.
The @triton.jit code is in adaln_kernels.py; this file chooses tilings and launches it.
"""
import functools
import warnings
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import registers
from .adaln_kernels import _adaln_bwd_kernel, _adaln_fwd_kernel
from .backend import forward_mode_active, use_triton

MAX_C = 16384  # one row lives in registers; beyond this the kernel would spill badly


def adaln_modulate_reference(x, shift, scale, eps=1e-6, out_dtype=None):
    """LayerNorm(x) * (1 + scale) + shift, in out_dtype (default x's dtype); computed in fp32
    (float64 in float64, as the kernels do, so derivative checks in float64 see float64 arithmetic)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    mean = xf.mean(-1, keepdim=True)
    var = xf.var(-1, keepdim=True, unbiased=False)
    x_hat = (xf - mean) * torch.rsqrt(var + eps)
    out = x_hat * (1 + scale.to(acc)[:, None]) + shift.to(acc)[:, None]
    return out.to(out_dtype or x.dtype)


def gated_residual_adaln_reference(x, y, gate, shift, scale, eps=1e-6, out_dtype=None):
    """(h, adaln_modulate(h)) with h = x + gate * y: the DiT block's residual seam."""
    h = x + gate[:, None] * y
    return h, adaln_modulate_reference(h, shift, scale, eps, out_dtype)


# ----------------------------------------------------------------------------- launchers

def _acc_dtype(dtype):
    # float64 exists for gradcheck; every production dtype computes in fp32
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def _pow2_floor(n):
    return 1 << (n.bit_length() - 1)


def column_blocks(C, split=True):
    """(BLOCK_A, BLOCK_B): two powers of two covering C with little padding (1152 =
    1024 + 128); BLOCK_B is 0 when one block fits exactly or split is off."""
    if not split:
        return triton.next_power_of_2(C), 0
    block_a = _pow2_floor(C)
    rest = C - block_a
    return block_a, (triton.next_power_of_2(rest) if rest else 0)


class Launch(NamedTuple):
    """How one kernel call is tiled: ROWS tokens by the two column blocks, per program."""
    rows: int
    block_a: int
    block_b: int  # 0: one column block
    num_warps: int
    prefetch: int = 0  # backward only: tiles loaded ahead (0, 1 or 2)

    def constexprs(self):
        return dict(ROWS=self.rows, BLOCK_A=self.block_a, BLOCK_B=max(self.block_b, 1), SPLIT=self.block_b > 0)


def launch_config(C, N, backward=False):
    """The tiling used for width C and N tokens.

    Forward: from a sweep on an H200 (bf16, CUDA-graph timed, C in {384, 768, 1152}):
    ~32 elements per thread per tensor and 2K-4K-element tiles of one padded column block.
    It reached 89% of copy bandwidth there, and its registers leave occupancy at the warp
    limit, so it is left as measured.

    Backward: the same sweep settled on 2K-element tiles with one tile prefetched, which
    ran at ~60% of copy bandwidth; ptxas (flowpre/kernels/registers.py) puts that tiling at 217
    registers for the gated kernel at C = 1152, two programs per SM, one tile of loads in
    flight each. Split columns and ~1K-element tiles free enough registers to keep two
    tiles in flight at three or four programs per SM, 3-4x the loads in flight, with no
    spills at any DiT width (tests/test_kernel_registers.py checks that). Not yet timed on
    a GPU: benchmarks/adaln_sweep.py times this tiling against the alternatives.
    """
    block_a, block_b = column_blocks(C, split=backward)
    width = block_a + block_b
    if not backward:
        rows = min(16, _pow2_floor(max(1, (2048 if width <= 512 else 4096) // width)), triton.next_power_of_2(N))
        return Launch(rows, block_a, block_b, _pow2_floor(max(2, min(16, rows * width // 1024))))
    rows = min(16, _pow2_floor(max(1, 1024 // width)), triton.next_power_of_2(N))
    tile = rows * width
    num_warps = _pow2_floor(max(4, min(16, tile // 256)))
    per_thread = tile // (32 * num_warps)  # elements of each tensor per thread
    # at 16 warps a thread gets at most 128 registers; wide rows then go without prefetch
    return Launch(rows, block_a, block_b, num_warps, 2 if per_thread <= (8 if num_warps == 16 else 12) else 0)


@functools.lru_cache(maxsize=4096)
def backward_grid(B, N, rows, slots):
    """(chunks per sample, tiles per program) for B samples of N tokens in tiles of `rows`.

    `slots` backward programs run at once (resident per SM times SMs). A program's time
    grows with its tile count, so the split that finishes first minimises rounds x tiles
    per program, rounds = ceil(programs / slots): one full round of 384 programs beats
    1056 programs in three rounds with the last a third empty. Within 5% of the best, the
    fewest chunks win: every chunk adds a row to the partial-sum buffer.
    """
    tiles = triton.cdiv(N, rows)
    options = []
    for chunks in range(1, min(tiles, 4 * triton.cdiv(slots, B)) + 1):
        per_program = triton.cdiv(tiles, chunks)
        n_chunks = triton.cdiv(tiles, per_program)
        options.append((triton.cdiv(B * n_chunks, slots) * per_program, n_chunks, per_program))
    best = min(cost for cost, _, _ in options)
    return min((n, per) for cost, n, per in options if cost <= 1.05 * best)


_RESIDENT = {}  # (device, dtype, residual, launch) -> backward programs resident per SM


def _backward_slots(device, dtype, residual, launch, args, constexprs):
    """Backward programs that run at once: per SM, from the compiled kernel's registers
    (read once per tiling), times the SM count. 4 under the interpreter."""
    if device.type != "cuda":
        return 4
    key = (device.index, dtype, residual, launch)
    if key not in _RESIDENT:
        try:
            compiled = _adaln_bwd_kernel.warmup(*args, grid=(1, 1), **constexprs)
            _RESIDENT[key] = max(1, registers.resident_programs(compiled, launch.num_warps))
        except Exception as e:  # noqa: BLE001 - a triton without its NVIDIA tools: fall back to a fixed guess
            warnings.warn(f"adaLN backward: occupancy unknown ({type(e).__name__}: {e}); assuming 4 programs per SM")
            _RESIDENT[key] = 4
    return _RESIDENT[key] * torch.cuda.get_device_properties(device).multi_processor_count


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


def adaln_forward(x, shift, scale, eps=1e-6, y=None, gate=None, out=None, h=None, mean=None, rstd=None,
                  out_dtype=None):
    """Launch the forward kernel. With y and gate given, h = x + gate*y is normalised.

    Returns (out, h, mean, rstd); h is None without y; out is out_dtype (default x's dtype),
    h x's dtype. Buffers passed in are written in full (the tests hand in NaN-filled ones
    to check that).
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
    out = torch.empty(x.shape, device=x.device, dtype=out_dtype or x.dtype) if out is None else out
    mean = torch.empty((B, N), device=x.device, dtype=acc_torch) if mean is None else mean
    rstd = torch.empty((B, N), device=x.device, dtype=acc_torch) if rstd is None else rstd
    if x.numel() == 0:  # no samples, tokens or columns: nothing to normalise
        mean.zero_()
        rstd.zero_()
        return out, (h if residual else None), mean, rstd
    launch = launch_config(C, N)
    grid = (triton.cdiv(N, launch.rows), B)
    _adaln_fwd_kernel[grid](
        x, y if residual else x, gate if residual else shift, shift, scale,
        h if residual else out, out, mean, rstd, N, C, eps,
        RESIDUAL=residual, ACC=acc_tl, num_warps=launch.num_warps, **launch.constexprs())
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
    if x.numel() == 0:  # every per-sample gradient is a sum over no tokens
        def zeros():  # one tensor each: the custom ops' outputs may not alias one another
            return torch.zeros((B, C), device=x.device, dtype=x.dtype)
        return dx, (dy if residual else None), (zeros() if residual else None), zeros(), zeros()
    launch = launch_config(C, N, backward=True)
    constexprs = dict(RESIDUAL=residual, ACC=acc_tl, PREFETCH=launch.prefetch, num_warps=launch.num_warps,
                      **launch.constexprs())
    args = [x, y if residual else x, gate if residual else scale, scale, mean, rstd,
            dh if residual else dout, dout, dx, dy if residual else dx]
    # occupancy is read from a compile with stand-in grid sizes (3, 5): the real ones depend on it
    slots = _backward_slots(x.device, x.dtype, residual, launch, args + [mean, N, C, 3, 5], constexprs)
    n_chunks, tiles_per_prog = backward_grid(B, N, launch.rows, slots)
    part = torch.empty((3 if residual else 2, B, n_chunks, C), device=x.device, dtype=acc_torch)
    _adaln_bwd_kernel[(n_chunks, B)](*args, part, N, C, n_chunks, tiles_per_prog, **constexprs)
    # deterministic reductions, one per gradient so that no two outputs are views of one tensor
    sums = [plane.sum(1).to(x.dtype) for plane in part]
    dgate = sums[2] if residual else None
    return dx, (dy if residual else None), dgate, sums[0], sums[1]


# ----------------------------------------------------------------------------- custom ops
# Registered with torch.library so torch.compile keeps them in its graph instead of
# breaking around them. The fake implementations give the launchers' output shapes,
# dtypes and strides (all contiguous) without running anything.

def _stats_like(x):
    return x.new_empty(x.shape[:2], dtype=_acc_dtype(x.dtype)[1])


@torch.library.custom_op("flowpre::adaln_modulate_forward", mutates_args=())
def adaln_modulate_forward_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                              out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out, _, mean, rstd = adaln_forward(x, shift, scale, eps, out_dtype=out_dtype)
    return out, mean, rstd


@adaln_modulate_forward_op.register_fake
def _(x, shift, scale, eps, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype), _stats_like(x), _stats_like(x)


@torch.library.custom_op("flowpre::adaln_modulate_backward", mutates_args=())
def adaln_modulate_backward_op(x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                               dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, _, _, dshift, dscale = adaln_backward(x.contiguous(), scale.contiguous(), mean, rstd, dout)
    return dx, dshift, dscale


@adaln_modulate_backward_op.register_fake
def _(x, scale, mean, rstd, dout):
    return x.new_empty(x.shape), x.new_empty(scale.shape), x.new_empty(scale.shape)


@torch.library.custom_op("flowpre::gated_residual_adaln_forward", mutates_args=())
def gated_residual_adaln_forward_op(
        x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
        out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    out, h, mean, rstd = adaln_forward(x, shift, scale, eps, y=y, gate=gate, out_dtype=out_dtype)
    return h, out, mean, rstd


@gated_residual_adaln_forward_op.register_fake
def _(x, y, gate, shift, scale, eps, out_dtype):
    return x.new_empty(x.shape), x.new_empty(x.shape, dtype=out_dtype), _stats_like(x), _stats_like(x)


@torch.library.custom_op("flowpre::gated_residual_adaln_backward", mutates_args=())
def gated_residual_adaln_backward_op(
        h: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor,
        rstd: torch.Tensor, dh: torch.Tensor, dout: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dy, dgate, dshift, dscale); dx is also the gradient of h's input x."""
    return adaln_backward(h.contiguous(), scale.contiguous(), mean, rstd, dout, y=y.contiguous(),
                          gate=gate.contiguous(), dh=dh)


@gated_residual_adaln_backward_op.register_fake
def _(h, y, gate, scale, mean, rstd, dh, dout):
    return (h.new_empty(h.shape), y.new_empty(y.shape), h.new_empty(scale.shape), h.new_empty(scale.shape),
            h.new_empty(scale.shape))


# ----------------------------------------------------------------------------- autograd
# autograd.Functions over the ops, in the setup_context style that torch.func transforms need.

def modulate_tangent(x, scale, tx, tshift, tscale, eps, out_dtype):
    """The forward-mode derivative of adaln_modulate at x along (tx, tshift, tscale), any of
    them None for zero. With n = (x - mean) * rstd: dn = rstd * (dx - mean(dx) - n * mean(n dx)),
    and d out = dn * (1 + scale) + n * dscale + dshift. A memory-bound op, so plain PyTorch in
    fp32 (it runs once per JVP, beside three attention-sized kernels)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    mean = xf.mean(-1, keepdim=True)
    rstd = torch.rsqrt(xf.var(-1, keepdim=True, unbiased=False) + eps)
    n = (xf - mean) * rstd
    tangent = torch.zeros_like(n)
    if tx is not None:
        t = tx.to(acc)
        dn = rstd * (t - t.mean(-1, keepdim=True) - n * (n * t).mean(-1, keepdim=True))
        tangent = tangent + dn * (1 + scale.to(acc)[:, None])
    if tscale is not None:
        tangent = tangent + n * tscale.to(acc)[:, None]
    if tshift is not None:
        tangent = tangent + tshift.to(acc)[:, None]
    return tangent.to(out_dtype)


class AdaLNModulate(torch.autograd.Function):
    """apply(x, shift, scale, eps, out_dtype) -> (out, mean, rstd); mean, rstd not differentiable."""

    @staticmethod
    def forward(x, shift, scale, eps, out_dtype):
        return adaln_modulate_forward_op(x, shift, scale, eps, out_dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, _, scale, _, _ = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, scale, mean, rstd)
        ctx.save_for_forward(x, scale)
        ctx.eps, ctx.out_dtype = inputs[3], inputs[4]
        ctx.mark_non_differentiable(mean, rstd)

    @staticmethod
    def backward(ctx, dout, _dmean, _drstd):
        x, scale, mean, rstd = ctx.saved_tensors
        dx, dshift, dscale = adaln_modulate_backward_op(x, scale, mean, rstd, dout)
        return dx, dshift, dscale, None, None


class GatedResidualAdaLN(torch.autograd.Function):
    """apply(x, y, gate, shift, scale, eps, out_dtype) -> (h, out, mean, rstd); mean, rstd not differentiable."""

    @staticmethod
    def forward(x, y, gate, shift, scale, eps, out_dtype):
        return gated_residual_adaln_forward_op(x, y, gate, shift, scale, eps, out_dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, y, gate, _, scale, _, _ = inputs
        h, _, mean, rstd = output
        # h is an output anyway, so keeping it costs no memory and saves the
        # backward a read of x (h = x + gate*y would need both x and y)
        ctx.save_for_backward(h, y, gate, scale, mean, rstd)
        ctx.save_for_forward(h, y, gate, scale)
        ctx.eps, ctx.out_dtype = inputs[5], inputs[6]
        ctx.mark_non_differentiable(mean, rstd)

    @staticmethod
    def backward(ctx, dh, dout, _dmean, _drstd):
        h, y, gate, scale, mean, rstd = ctx.saved_tensors
        dx, dy, dgate, dshift, dscale = gated_residual_adaln_backward_op(h, y, gate, scale, mean, rstd, dh, dout)
        return dx, dy, dgate, dshift, dscale, None, None


class AdaLNModulateForwardMode(AdaLNModulate):
    """With a forward-mode rule, applied under torch.func.jvp / forward AD only
    (backend.forward_mode_active): Dynamo cannot trace a Function that has a jvp."""

    @staticmethod
    def jvp(ctx, tx, tshift, tscale, _teps, _tdtype):
        x, scale = ctx.saved_tensors
        return modulate_tangent(x, scale, tx, tshift, tscale, ctx.eps, ctx.out_dtype), None, None


class GatedResidualAdaLNForwardMode(GatedResidualAdaLN):
    """GatedResidualAdaLN with a forward-mode rule (see AdaLNModulateForwardMode)."""

    @staticmethod
    def jvp(ctx, tx, ty, tgate, tshift, tscale, _teps, _tdtype):
        h, y, gate, scale = ctx.saved_tensors
        th = None  # h = x + gate * y
        for term in (tx, None if tgate is None else tgate[:, None] * y, None if ty is None else gate[:, None] * ty):
            if term is not None:
                th = term if th is None else th + term
        tout = modulate_tangent(h, scale, th, tshift, tscale, ctx.eps, ctx.out_dtype)
        return (torch.zeros_like(h) if th is None else th.to(h.dtype)), tout, None, None


def modulated_dtype(x):
    """The dtype of the modulated output: under autocast the dtype the next matmul runs in
    (writing it directly saves that matmul's cast, a full read and write of the
    activations), else x's. The residual stream h keeps x's dtype."""
    device = x.device.type
    if x.dtype != torch.float64 and torch.is_autocast_enabled(device):  # autocast leaves float64 alone
        return torch.get_autocast_dtype(device)
    return x.dtype


def adaln_modulate(x, shift, scale, eps=1e-6, backend="auto"):
    """LayerNorm(x) * (1 + scale) + shift. x (B, N, C); shift, scale (B, C).
    The output is x's dtype, or autocast's dtype when autocast is on."""
    out_dtype = modulated_dtype(x)
    if use_triton(backend, x):
        shift, scale = shift.to(x.dtype), scale.to(x.dtype)  # (B, C): autocast may hand these in bf16
        _check(x, shift, scale)
        function = AdaLNModulateForwardMode if forward_mode_active() else AdaLNModulate
        return function.apply(x, shift, scale, eps, out_dtype)[0]
    return adaln_modulate_reference(x, shift, scale, eps, out_dtype)


def gated_residual_adaln(x, y, gate, shift, scale, eps=1e-6, backend="auto"):
    """(h, adaln_modulate(h, shift, scale)) with h = x + gate[:, None] * y, in one pass;
    h in x's dtype, the modulated output as adaln_modulate's."""
    out_dtype = modulated_dtype(x)
    if use_triton(backend, x):
        gate, shift, scale = gate.to(x.dtype), shift.to(x.dtype), scale.to(x.dtype)
        _check(x, shift, scale, y, gate)
        function = GatedResidualAdaLNForwardMode if forward_mode_active() else GatedResidualAdaLN
        h, out, _, _ = function.apply(x, y, gate, shift, scale, eps, out_dtype)
        return h, out
    return gated_residual_adaln_reference(x, y, gate, shift, scale, eps, out_dtype)
