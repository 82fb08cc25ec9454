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

from .attention_kernels import _INTERPRET, _bwd_delta_kernel, _bwd_dkdv, _bwd_dq, _fwd
# the launch helpers both attention kernels share (ALLOW_TF32, the fp32 precision switch, is there)
from .attention_launch import (_LOG2E, MAX_HEAD_DIM, _align, _bucket, _check_buffer, _check_inputs,  # noqa: F401
                               _grid, _launch_cfg, _meta, _rows, _strides)
from .backend import forward_mode_active, use_triton


def attention_reference(q, k, v, scale=None):
    """softmax(q k^T * scale) v, scale defaulting to 1/sqrt(D)."""
    if scale is None and q.shape[-1] == 0:
        raise ValueError("attention: head dim D=0 has no default scale 1/sqrt(D)")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


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
