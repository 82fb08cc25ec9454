"""Forward-mode (JVP) flash attention: the output and its tangent in one Triton pass.

    out, tangent_out = attention_jvp_forward(q, k, v, tq, tk, tv, scale)

is softmax(scale q k^T) v and its directional derivative along (tq, tk, tv), what
torch.func.jvp of attention gives, but flash-style: online softmax over key blocks, no
M x N matrix in memory. Consistency models and MeanFlow need this JVP of every
attention layer; PyTorch's fused SDPA kernels refuse forward-mode AD, and its math path
materialises P and tP. The kernel and its derivation are in attention_jvp_kernels.py.

It is the forward-mode rule of the attention autograd.Function (attention.py's
FlashAttention.jvp), through the custom op flowpre::flash_attention_jvp: under torch.func
the rule sees functorch-wrapped tensors, which only the dispatcher unwraps, and the op is
opaque to torch.compile like the other kernels.
"""
import math

import torch

from . import attention_launch
from .attention_launch import (_LOG2E, _align, _bucket, _check_buffer, _check_inputs, _grid, _launch_cfg, _meta, _rows,
                               _strides)
from .attention_jvp_kernels import _INTERPRET, _jvp_fwd
from .backend import use_triton



def _default_scale(q, scale):
    if scale is not None:
        return float(scale)
    if q.shape[-1] == 0:
        raise ValueError("attention_jvp: head dim D=0 has no default scale 1/sqrt(D)")
    return 1.0 / math.sqrt(q.shape[-1])


def attention_jvp_reference(q, k, v, tq, tk, tv, scale=None):
    """(out, tangent_out) from the explicit formulas in PyTorch, materialising P (M x N).

    The same contract as attention_jvp_forward (None tangents are zero). 16-bit inputs
    are computed in fp32 and rounded on return, like the kernel; tests check this
    against torch.func.jvp of scaled_dot_product_attention's math path.
    """
    scale = _default_scale(q, scale)
    dtype = q.dtype
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    q, k, v = (t.to(work) for t in (q, k, v))
    p = torch.softmax(scale * (q @ k.transpose(-1, -2)), dim=-1)
    out = p @ v
    tangent = torch.zeros_like(out)
    if tq is not None or tk is not None:
        ts = torch.zeros_like(p)
        if tq is not None:
            ts = ts + tq.to(work) @ k.transpose(-1, -2)
        if tk is not None:
            ts = ts + q @ tk.to(work).transpose(-1, -2)
        pts = p * (scale * ts)
        # d softmax: P o (tS - rowsum(P o tS)); the rowsum term times P v is mu * out
        tangent = pts @ v - pts.sum(-1, keepdim=True) * out
    if tv is not None:
        tangent = tangent + p @ tv.to(work)
    return out.to(dtype), tangent.to(dtype)


def _gpu_meta(q):
    """attention's compile-time parameters, but fp32 tile products as 3xTF32 on the GPU.

    Exact ("ieee") fp32 products lower to FMA loops, not tensor cores; with the JVP's
    six products per key block, triton 3.9's LLVM aborts the whole process (an SLP
    vectorizer assertion, "must be scheduled at this point") in 13 of 27 sampled sm_90
    builds (block sizes 16-64, D = 64, 72, 128), and the builds that succeed spill
    heavily. 3xTF32 (each operand split in two TF32 halves, three tensor-core products)
    is within ~1e-6 of fp32 and none of ~80 builds (sm_80 and sm_90, D = 16 to 256)
    aborted. attention_launch.ALLOW_TF32 = True takes plain TF32, as for the plain attention.
    The interpreter computes every precision exactly, so it keeps attention's choice.
    """
    meta = _meta(q)
    if q.dtype == torch.float32 and not _INTERPRET and not attention_launch.ALLOW_TF32:
        meta["PREC"] = "tf32x3"
    return meta


def _check_tangents(q, k, v, tq, tk, tv):
    for name, t, primal, primal_name in (("tq", tq, q, "q"), ("tk", tk, k, "k"), ("tv", tv, v, "v")):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"attention_jvp: tangent {name} must be a tensor or None, got {type(t).__name__}")
        if t.shape != primal.shape or t.dtype != primal.dtype or t.device != primal.device:
            raise ValueError(f"attention_jvp: tangent {name} must match {primal_name}: {tuple(primal.shape)} "
                             f"{primal.dtype} on {primal.device}, got {tuple(t.shape)} {t.dtype} on {t.device}")


def attention_jvp_forward(q, k, v, tq, tk, tv, scale=None, *, out=None, tangent_out=None, lse=None):
    """Attention output and its tangent along (tq, tk, tv), in one Triton pass.

    Contract
    - q (B, H, M, D); k, v (B, H, N, D); M, N >= 1 (M = 0 gives empty outputs), D <= 256;
      all one dtype among fp16, bf16, fp32, fp64 and one device (CUDA, or CPU under
      TRITON_INTERPRET=1). Non-causal, no mask; scale defaults to 1/sqrt(D).
    - tq, tk, tv: the tangents of q, k, v, each with its primal's exact shape, dtype and
      device, or None for a zero tangent (the kernel then skips the products it would
      feed, so pass None rather than zeros when an input carries no tangent).
    - Any strides: a tensor whose last dim is not unit-stride is copied first; others are
      read in place (packed qkv views, transposed layouts).
    - Returns (out, tangent_out), both (B, H, M, D) in q's dtype, unit stride in D.
      out is attention_forward's output up to rounding (the same arithmetic per key
      block; the tuned block sizes may differ); tangent_out is
      d/de attention(q + e tq, k + e tk, v + e tv) at e = 0.
    - Accumulation in fp32 for 16-bit inputs and fp64 for fp64 inputs. On the GPU, fp32
      tile products run as 3xTF32 (~1e-6 relative; see _gpu_meta) where the plain
      forward uses exact fp32, and compiled Triton passes `scale` as fp32, so fp64
      results are exact to ~1e-7 (as for the plain forward).
    - Keyword-only buffers to write into (fully overwritten, checked like
      attention_forward's): out and tangent_out (q's shape and dtype, unit stride in
      D), lse ((B, H, M) contiguous, fp32 or fp64 for fp64 inputs; the natural-log
      log-sum-exp, written only when given, e.g. to serve a later backward).
    Raises ValueError naming the offending argument for inputs the kernel does not take.
    """
    _check_inputs(q, k, v)
    _check_tangents(q, k, v, tq, tk, tv)
    q, k, v = _rows(q), _rows(k), _rows(v)
    tq, tk, tv = (None if t is None else _rows(t) for t in (tq, tk, tv))
    (B, H, M, D), N = q.shape, k.shape[2]
    scale = _default_scale(q, scale)
    outputs = []
    for name, buf in (("out", out), ("tangent_out", tangent_out)):
        buf = torch.empty(q.shape, dtype=q.dtype, device=q.device) if buf is None else buf
        _check_buffer(name, buf, q.shape, q.dtype, q.device)
        outputs.append(buf)
    out, tangent_out = outputs
    if lse is not None:
        acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        _check_buffer("lse", lse, (B, H, M), acc_dtype, q.device, contiguous=True)
    if q.numel() == 0:
        return out, tangent_out
    present = [t for t in (q, k, v, tq, tk, tv, out, tangent_out) if t is not None]
    align = _align(*present)
    # A missing tangent's pointer and strides are stand-ins the kernel never reads.
    tq_, tk_, tv_ = (q if tq is None else tq), (k if tk is None else tk), (v if tv is None else tv)
    strides = [s for t in (q, k, v, tq_, tk_, tv_, out, tangent_out) for s in _strides(t, align)]
    extra = _launch_cfg(M, N) if _INTERPRET else {}
    _jvp_fwd[_grid("BLOCK_M", M, B * H)](
        q, k, v, tq_, tk_, tv_, out, tangent_out, out if lse is None else lse, *strides,
        H, M, N, _bucket(M), _bucket(N), scale * _LOG2E, scale, ALIGN=align,
        HAS_TQ=tq is not None, HAS_TK=tk is not None, HAS_TV=tv is not None, STORE_LSE=lse is not None,
        **_gpu_meta(q), **extra)
    return out, tangent_out


@torch.library.custom_op("flowpre::flash_attention_jvp", mutates_args=())
def flash_attention_jvp_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tq: torch.Tensor | None,
                           tk: torch.Tensor | None, tv: torch.Tensor | None,
                           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_jvp_forward(q, k, v, tq, tk, tv, scale)


@flash_attention_jvp_op.register_fake
def _(q, k, v, tq, tk, tv, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape)


def _attention_jvp_triton(q, k, v, tq, tk, tv, scale):
    return flash_attention_jvp_op(q, k, v, tq, tk, tv, _default_scale(q, scale))


def attention_jvp(q, k, v, tq, tk, tv, scale=None, backend="auto"):
    """(out, tangent_out) by the Triton kernel or the PyTorch reference, chosen as
    attention() chooses (backend "auto", "triton" or "torch"; "auto" hands inputs the
    kernel does not take to the reference, "triton" raises ValueError on them)."""
    if use_triton(backend, q):
        try:
            _check_inputs(q, k, v)
            _check_tangents(q, k, v, tq, tk, tv)
        except ValueError:
            if backend != "auto":
                raise
        else:
            return _attention_jvp_triton(q, k, v, tq, tk, tv, scale)
    return attention_jvp_reference(q, k, v, tq, tk, tv, scale)
