"""Triton flash attention against the PyTorch reference.

On a machine without CUDA the kernels run through the Triton interpreter (conftest.py
switches it on), so sizes stay small. Error measure throughout:
    rel_err(a, ref) = max|a - ref| / max|ref|
with the reference computed in float64 from the very inputs the kernel saw (16-bit
inputs are rounded first, then upcast). Bounds: 1e-4 for fp32, 2e-2 for fp16/bf16.
"""
import importlib
import math
import os
import subprocess
import sys

import pytest
import torch

# The module itself (the package exports the function under the same name).
attn = importlib.import_module("flowpre.kernels.attention")

TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def rel_err(a, ref, denom=None):
    a, ref = a.detach().double(), ref.detach().double()
    assert torch.isfinite(a).all(), "non-finite values in kernel output"
    return ((a - ref).abs().max() / (ref.abs().max() if denom is None else denom)).item()


def rand(shape, dtype, device, gen):
    """Standard normal, generated in fp32 then rounded, never zeros."""
    return torch.randn(shape, generator=gen, device="cpu").to(device=device, dtype=dtype)


def reference(q, k, v, dout, scale):
    """Output, LSE and gradients in float64 from the same (rounded) inputs."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = attn.attention_reference(q64, k64, v64, scale)
    out.backward(dout.double())
    lse = torch.logsumexp(q64.detach() @ k64.detach().transpose(-1, -2) * scale, dim=-1)
    return out.detach(), lse, q64.grad, k64.grad, v64.grad


def check_all(q, k, v, dout, scale, tol, out, lse, dq, dk, dv):
    ref_out, ref_lse, ref_dq, ref_dk, ref_dv = reference(q, k, v, dout, scale)
    # With one key the softmax is constant: dq and dk are exactly zero, so measure
    # them against the scale of dv instead of their own (zero) maximum.
    zero_grads = k.shape[2] == 1
    grad_denom = ref_dv.abs().max().item() if zero_grads else None
    errs = {
        "out": rel_err(out, ref_out),
        "lse": rel_err(lse, ref_lse),
        "dq": rel_err(dq, ref_dq, grad_denom),
        "dk": rel_err(dk, ref_dk, grad_denom),
        "dv": rel_err(dv, ref_dv),
    }
    assert lse.dtype == torch.float32 and out.dtype == q.dtype and dq.dtype == q.dtype
    bad = {k_: e for k_, e in errs.items() if not e < tol}
    assert not bad, f"relative errors over {tol}: {bad} (all: {errs})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("D", [40, 72, 128])
@pytest.mark.parametrize("N", [1, 17, 77, 200])
def test_forward_backward_match_reference(kernel_device, N, D, dtype):
    """Low-level launchers, writing into NaN-poisoned buffers that must be fully overwritten."""
    gen = torch.Generator().manual_seed(1000 * N + D)
    B, H = 2, 3
    q, k, v, dout = (rand((B, H, N, D), dtype, kernel_device, gen) for _ in range(4))
    scale = 1.0 / math.sqrt(D)
    nan = lambda *shape, dt=dtype: torch.full(shape, float("nan"), dtype=dt, device=kernel_device)  # noqa: E731
    out, lse = attn.attention_forward(q, k, v, scale, out=nan(B, H, N, D), lse=nan(B, H, N, dt=torch.float32))
    dq, dk, dv = attn.attention_backward(q, k, v, out, lse, dout, scale,
                                         dq=nan(B, H, N, D), dk=nan(B, H, N, D), dv=nan(B, H, N, D))
    check_all(q, k, v, dout, scale, TOL[dtype], out, lse, dq, dk, dv)


# Cross-attention: M queries against N keys, both ragged, in both orders, and the
# single-query and single-key corners.
CROSS = [(1, 77), (77, 1), (200, 17), (17, 200)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D", [40, 72])
@pytest.mark.parametrize("M,N", CROSS, ids=[f"M{m}-N{n}" for m, n in CROSS])
def test_cross_attention_match_reference(kernel_device, M, N, D, dtype):
    gen = torch.Generator().manual_seed(7 * M + N + D)
    B, H = 2, 3
    q, dout = (rand((B, H, M, D), dtype, kernel_device, gen) for _ in range(2))
    k, v = (rand((B, H, N, D), dtype, kernel_device, gen) for _ in range(2))
    scale = 1.0 / math.sqrt(D)
    nan = lambda *shape, dt=dtype: torch.full(shape, float("nan"), dtype=dt, device=kernel_device)  # noqa: E731
    out, lse = attn.attention_forward(q, k, v, scale, out=nan(B, H, M, D), lse=nan(B, H, M, dt=torch.float32))
    dq, dk, dv = attn.attention_backward(q, k, v, out, lse, dout, scale,
                                         dq=nan(B, H, M, D), dk=nan(B, H, N, D), dv=nan(B, H, N, D))
    assert out.shape == (B, H, M, D) and lse.shape == (B, H, M) and dk.shape == dv.shape == (B, H, N, D)
    check_all(q, k, v, dout, scale, TOL[dtype], out, lse, dq, dk, dv)


def test_cross_attention_fp16_and_packed_context(kernel_device):
    """fp16, with k and v as strided views of one (B, L, 2, H, D) projection of a text
    context, as the DiT's cross-attention makes them."""
    gen = torch.Generator().manual_seed(3)
    B, H, M, L, D, dtype = 2, 2, 49, 13, 72, torch.float16
    q = rand((B, H, M, D), dtype, kernel_device, gen).requires_grad_()
    kv = rand((B, L, 2, H, D), dtype, kernel_device, gen).requires_grad_()
    k, v = (t.transpose(1, 2) for t in kv.unbind(2))
    assert not k.is_contiguous()
    dout = rand((B, H, M, D), dtype, kernel_device, gen)
    attn.attention(q, k, v, backend="triton").backward(dout)
    ref_out, _, ref_dq, ref_dk, ref_dv = reference(q, k, v, dout, 1.0 / math.sqrt(D))
    ref_dkv = torch.stack([ref_dk.transpose(1, 2), ref_dv.transpose(1, 2)], dim=2)
    assert rel_err(attn.attention(q, k, v, backend="triton"), ref_out) < TOL[dtype]
    assert rel_err(q.grad, ref_dq) < TOL[dtype] and rel_err(kv.grad, ref_dkv) < TOL[dtype]


def test_no_queries_gives_zero_key_gradients(kernel_device):
    q, dout = torch.randn(1, 2, 0, 16, device=kernel_device), torch.randn(1, 2, 0, 16, device=kernel_device)
    k, v = torch.randn(1, 2, 5, 16, device=kernel_device), torch.randn(1, 2, 5, 16, device=kernel_device)
    out, lse = attn.attention_forward(q, k, v)
    poisoned = torch.full((1, 2, 5, 16), float("nan"), device=kernel_device)
    _, dk, dv = attn.attention_backward(q, k, v, out, lse, dout, dk=poisoned.clone(), dv=poisoned.clone())
    assert out.shape == (1, 2, 0, 16) and torch.equal(dk, torch.zeros_like(k)) and torch.equal(dv, torch.zeros_like(v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_head_dim_256_and_custom_scale(kernel_device, dtype):
    gen = torch.Generator().manual_seed(256)
    q, k, v, dout = (rand((1, 2, 70, 256), dtype, kernel_device, gen) for _ in range(4))
    out, lse = attn.attention_forward(q, k, v, 0.1)
    dq, dk, dv = attn.attention_backward(q, k, v, out, lse, dout, 0.1)
    check_all(q, k, v, dout, 0.1, TOL[dtype], out, lse, dq, dk, dv)


@pytest.mark.parametrize("D", [33, 96])
def test_autograd_non_contiguous(kernel_device, D):
    """q, k, v as views of one packed (B, N, 3, H, D) projection, as a DiT block makes them,
    and dout transposed from (B, N, H, D): strides, not copies, must be honoured."""
    gen = torch.Generator().manual_seed(D)
    B, N, H, dtype = 2, 70, 3, torch.bfloat16
    qkv = rand((B, N, 3, H, D), dtype, kernel_device, gen)
    q, k, v = (t.transpose(1, 2).detach().requires_grad_() for t in qkv.unbind(2))
    assert not q.is_contiguous()
    dout = rand((B, N, H, D), dtype, kernel_device, gen).transpose(1, 2)
    out = attn.attention(q, k, v, backend="triton")
    out.backward(dout)
    ref_out, _, ref_dq, ref_dk, ref_dv = reference(q, k, v, dout, 1.0 / math.sqrt(D))
    for name, a, r in (("out", out, ref_out), ("dq", q.grad, ref_dq), ("dk", k.grad, ref_dk), ("dv", v.grad, ref_dv)):
        assert rel_err(a, r) < TOL[dtype], name


@pytest.mark.parametrize("M,N", [(9, 9), (9, 13)])
def test_gradcheck_float64(kernel_device, M, N):
    gen = torch.Generator().manual_seed(9)
    q, k, v = (rand((1, 2, n, 40), torch.float64, kernel_device, gen).requires_grad_() for n in (M, N, N))
    fn = lambda q, k, v: attn.attention(q, k, v, scale=0.3, backend="triton")  # noqa: E731
    # fast_mode checks random projections of the Jacobian: a few forward calls instead
    # of one per input element, which the interpreter could not afford.
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)
    # Compiled Triton passes float scalars (the scale) as fp32: fp64 is exact only to ~1e-7.
    assert rel_err(fn(q, k, v), attn.attention_reference(q, k, v, 0.3)) < 1e-5


def test_bad_inputs_raise_value_error(kernel_device):
    q = torch.randn(1, 2, 8, 16, device=kernel_device)
    with pytest.raises(ValueError, match="head dim"):
        big = torch.randn(1, 2, 8, 300, device=kernel_device)
        attn.attention(big, big, big, backend="triton")
    k9 = torch.randn(1, 2, 9, 16, device=kernel_device)
    assert attn.attention(q, k9, k9, backend="triton").shape == q.shape  # M != N is cross-attention
    with pytest.raises(ValueError, match="shapes must match"):  # k and v lengths differ
        attn.attention(q, k9, q, backend="triton")
    with pytest.raises(ValueError, match="shapes must match"):  # head dims differ
        attn.attention(q, k9[..., :8], k9[..., :8], backend="triton")
    with pytest.raises(ValueError, match="no keys"):
        attn.attention(q, k9[:, :, :0], k9[:, :, :0], backend="triton")
    with pytest.raises(ValueError, match="4-D"):
        attn.attention_forward(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="dtype"):
        qi = q.to(torch.int32)
        attn.attention_forward(qi, qi, qi)
    with pytest.raises(ValueError, match="device"):
        attn.attention_forward(q, q.to("meta"), q)
    with pytest.raises(ValueError, match="out must be"):
        attn.attention_forward(q, q, q, out=torch.empty(1, 2, 8, 15, device=kernel_device))


def test_triton_on_cpu_without_interpreter_raises():
    """backend='triton' on a CPU tensor with the interpreter off: a clear error, not a crash."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import torch\nfrom flowpre import kernels\n"
        "q = torch.randn(1, 1, 4, 16)\n"
        "try:\n"
        "    kernels.attention(q, q, q, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print('RAISED', e)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "RAISED" in res.stdout and "TRITON_INTERPRET" in res.stdout, res.stdout + res.stderr


@pytest.mark.parametrize("shape", [(0, 2, 5, 8), (2, 0, 5, 8)])
def test_empty_batch_or_heads_give_empty_outputs(kernel_device, shape):
    q, k, v = (torch.randn(*shape, device=kernel_device, requires_grad=True) for _ in range(3))
    out = attn.attention(q, k, v, backend="triton")
    assert out.shape == shape
    out.sum().backward()  # an empty expanded grad: no stride to check, nothing to compute
    for t in (q, k, v):
        assert t.grad.shape == shape


def test_zero_head_dim_is_refused():
    q = torch.randn(1, 1, 5, 0)
    for backend in ("triton", "torch"):
        with pytest.raises(ValueError, match="head dim D=0"):
            attn.attention(q, q, q, backend=backend)
