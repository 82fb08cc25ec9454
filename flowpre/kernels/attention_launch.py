"""What the attention kernels' launchers share: input checks, strides, compile-time
parameters and grids, for the forward/backward (attention.py) and the forward-mode JVP
(attention_jvp.py), which both import it from here rather than from each other.
"""
import math

import torch
import triton
import triton.language as tl

from .attention_kernels import _INTERPRET

# fp32 inputs use exact ("ieee") dots by default so fp32 matches torch to ~1e-6;
# set True to trade that for tf32 tensor-core speed.
ALLOW_TF32 = False  # attention_launch.ALLOW_TF32 = True: both attention kernels
MAX_HEAD_DIM = 256
INTERPRET_BLOCK = 64  # query/key block under the interpreter (no autotuning there)
_LOG2E = 1.4426950408889634


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
