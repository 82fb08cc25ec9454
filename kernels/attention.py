"""Flash attention: Triton forward/backward beside the PyTorch reference.

Shapes: q is (B, H, M, D), k and v are (B, H, N, D), the output is (B, H, M, D):
self-attention has M = N, the DiT's text cross-attention M image tokens against N
text tokens. Non-causal, no mask. Any M, N >= 1 and head dim D <= 256 (padded inside
the kernels with masked loads and stores, never in the caller's tensors), fp16/bf16/
fp32 inputs with fp32 accumulation, and fp64 with fp64 accumulation (for gradcheck).

Forward: online softmax over key blocks, saving the natural-log log-sum-exp (B, H, M).
Backward (FlashAttention-2): delta = rowsum(dO * O), then one kernel per key block
for dK/dV and one per query block for dQ; both recompute P from the LSE, so nothing
M x N is stored and no atomics are needed (so autotune may re-run any kernel safely).
The kernels themselves are in attention_kernels.py.
"""
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .attention_kernels import _INTERPRET, _bwd_delta_kernel, _bwd_dkdv, _bwd_dq, _fwd
from .backend import forward_mode_active, use_triton

# fp32 inputs use exact ("ieee") dots by default so fp32 matches torch to ~1e-6;
# set True to trade that for tf32 tensor-core speed.
ALLOW_TF32 = False
MAX_HEAD_DIM = 256
INTERPRET_BLOCK = 64  # query/key block under the interpreter (no autotuning there)
_LOG2E = 1.4426950408889634


def attention_reference(q, k, v, scale=None):
    """softmax(q k^T * scale) v, scale defaulting to 1/sqrt(D)."""
    if scale is None and q.shape[-1] == 0:
        raise ValueError("attention: head dim D=0 has no default scale 1/sqrt(D)")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


# ----------------------------------------------------------------------------- launchers
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
             torch.float64: tl.float64}


def _check_inputs(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"attention: {name} must be a 4-D (B, H, N, D) tensor, "
                             f"got {getattr(t, 'shape', type(t).__name__)}")
    if not (k.shape == v.shape and q.shape[:2] == k.shape[:2] and q.shape[3] == k.shape[3]):
        raise ValueError(f"attention: shapes must match as q (B, H, M, D), k and v (B, H, N, D), got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[3] == 0:
        raise ValueError("attention: head dim D=0: nothing to attend with")
    if k.shape[2] == 0 and q.shape[2] > 0:
        raise ValueError(f"attention: softmax over no keys is undefined: k has N=0, q has M={q.shape[2]}")
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
    if buf.numel() and not (buf.is_contiguous() if contiguous else buf.stride(-1) == 1):  # empty: nothing to lay out
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


def _launch_cfg(M, N):
    """Interpreter only: one fixed config (64 keeps several blocks, and so the online
    softmax across blocks, in play at test sizes), shrunk for tiny sequences."""
    blk = min(INTERPRET_BLOCK, max(16, triton.next_power_of_2(max(M, N))))
    return dict(BLOCK_M=blk, BLOCK_N=blk, num_warps=4)


def _bucket(N):
    """Autotune key: the largest power of two <= N, so nearby lengths share a tuning."""
    return 1 << (N.bit_length() - 1)


def _grid(n_blocks_of, length, BH):
    return lambda meta: (triton.cdiv(length, meta[n_blocks_of]), BH)


def attention_forward(q, k, v, scale=None, out=None, lse=None):
    """Triton forward. Returns (out in q's dtype, lse (B, H, M) natural log; fp32, fp64 for fp64 inputs).

    `out` and `lse` may be given to write into (they are fully overwritten).
    """
    _check_inputs(q, k, v)
    q, k, v = _rows(q), _rows(k), _rows(v)
    (B, H, M, D), N = q.shape, k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _check_buffer("out", out, q.shape, q.dtype, q.device)
    if lse is None:
        lse = torch.empty((B, H, M), dtype=acc_dtype, device=q.device)
    _check_buffer("lse", lse, (B, H, M), acc_dtype, q.device, contiguous=True)
    if q.numel() == 0:
        return out, lse
    align = _align(q, k, v, out)
    meta = _meta(q)
    extra = _launch_cfg(M, N) if _INTERPRET else {}
    _fwd[_grid("BLOCK_M", M, B * H)](
        q, k, v, out, lse, *_strides(q, align), *_strides(k, align), *_strides(v, align), *_strides(out, align),
        H, M, N, _bucket(M), _bucket(N), scale * _LOG2E, ALIGN=align, **meta, **extra)
    return out, lse


def attention_backward(q, k, v, out, lse, dout, scale=None, dq=None, dk=None, dv=None):
    """Triton backward from the forward's out and lse. Returns (dq, dk, dv) in q's dtype.

    dq, dk, dv may be given to write into (they are fully overwritten).
    """
    _check_inputs(q, k, v)
    q, k, v, out, dout = _rows(q), _rows(k), _rows(v), _rows(out), _rows(dout)
    (B, H, M, D), N = q.shape, k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    for name, t in (("out", out), ("dout", dout)):
        _check_buffer(name, t, q.shape, q.dtype, q.device)
    _check_buffer("lse", lse, (B, H, M), acc_dtype, q.device, contiguous=True)
    grads = []
    for name, g, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        g = torch.empty(like.shape, dtype=q.dtype, device=q.device) if g is None else g
        _check_buffer(name, g, like.shape, q.dtype, q.device)
        grads.append(g)
    dq, dk, dv = grads
    if q.numel() == 0:  # no queries (N = 0 keys is refused above): dk, dv are zero
        for g in (dq, dk, dv):
            g.zero_()
        return dq, dk, dv
    align = _align(q, k, v, out, dout, dq, dk, dv)
    meta = _meta(q)
    s_q, s_k, s_v, s_o, s_do = (_strides(t, align) for t in (q, k, v, out, dout))
    buckets, qk_scale = (_bucket(M), _bucket(N)), scale * _LOG2E
    extra = _launch_cfg(M, N) if _INTERPRET else {}

    delta = torch.empty((B, H, M), dtype=acc_dtype, device=q.device)
    block_d = max(16, triton.next_power_of_2(D))
    delta_block = 64 if block_d <= 128 else 32
    _bwd_delta_kernel[(triton.cdiv(M, delta_block), B * H)](
        out, dout, delta, *s_o, *s_do, H, M, D=D, BLOCK_D=block_d, ALIGN=align, ACC=meta["ACC"],
        BLOCK_M=delta_block)
    _bwd_dkdv[_grid("BLOCK_N", N, B * H)](
        q, k, v, dout, lse, delta, dk, dv, *s_q, *s_k, *s_v, *s_do, *_strides(dk, align), *_strides(dv, align),
        H, M, N, *buckets, qk_scale, scale, ALIGN=align, **meta, **extra)
    _bwd_dq[_grid("BLOCK_M", M, B * H)](
        q, k, v, dout, lse, delta, dq, *s_q, *s_k, *s_v, *s_do, *_strides(dq, align),
        H, M, N, *buckets, qk_scale, scale, ALIGN=align, **meta, **extra)
    return dq, dk, dv


# ----------------------------------------------------------------------------- custom ops
# Registered with torch.library so torch.compile keeps them in its graph instead of
# breaking around them; the fake implementations give the shapes, dtypes and strides
# the launchers produce (contiguous outputs) without running anything.

@torch.library.custom_op("flowpre::flash_attention_forward", mutates_args=())
def flash_attention_forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(q, k, v, scale)


@flash_attention_forward_op.register_fake
def _(q, k, v, scale):
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=acc_dtype)


@torch.library.custom_op("flowpre::flash_attention_backward", mutates_args=())
def flash_attention_backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                                lse: torch.Tensor, dout: torch.Tensor,
                                scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(q, k, v, out, lse, dout, scale)


@flash_attention_backward_op.register_fake
def _(q, k, v, out, lse, dout, scale):
    return q.new_empty(q.shape), q.new_empty(k.shape), q.new_empty(v.shape)


class FlashAttention(torch.autograd.Function):
    """The ops' autograd, backward and forward mode, in the setup_context style (forward
    without ctx) that torch.func transforms require.
    apply(q, k, v, scale) -> (out, lse); lse is not differentiable."""

    @staticmethod
    def forward(q, k, v, scale):
        return flash_attention_forward_op(q, k, v, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.save_for_forward(q, k, v)  # what a jvp rule reads back as ctx.saved_tensors
        ctx.scale = scale
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = flash_attention_backward_op(q, k, v, out, lse, dout, ctx.scale)
        return dq, dk, dv, None


class FlashAttentionForwardMode(FlashAttention):
    """FlashAttention with a forward-mode rule, applied under torch.func.jvp / forward AD only
    (backend.forward_mode_active): Dynamo cannot trace a Function that has a jvp."""

    @staticmethod
    def jvp(ctx, tq, tk, tv, _tscale):
        # torch.func.jvp (MeanFlow's target) through the fused kernels: the output's tangent
        # by the flash-style forward-mode kernel (attention_jvp.py), no M x N matrix either
        from .attention_jvp import flash_attention_jvp_op

        q, k, v = ctx.saved_tensors
        _, tangent_out = flash_attention_jvp_op(q, k, v, tq, tk, tv, ctx.scale)
        return tangent_out, None


def attention(q, k, v, scale=None, backend="auto"):
    """softmax(q k^T * scale) v for q (B, H, M, D) and k, v (B, H, N, D), differentiable in q, k, v.

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
            function = FlashAttentionForwardMode if forward_mode_active() else FlashAttention
            return function.apply(q, k, v, 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale))[0]
    return attention_reference(q, k, v, scale)
