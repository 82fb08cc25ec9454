"""Forward-mode AD (torch.func.jvp) through the fused kernels: the attention Function's rule
(the flash-style JVP kernel), adaLN's explicit tangents, and a whole two-time DiT, each against
torch.func.jvp of the PyTorch references (interpreter on CPU)."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from flowpre import kernels as K
from flowpre.models.dit import build_dit, forward_mode_kernels

TOL = {torch.float64: dict(atol=1e-9, rtol=1e-9), torch.float32: dict(atol=2e-5, rtol=2e-5),
       torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def rand(*shape, dtype, device, g):
    return torch.randn(*shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("tangents", ["all", "x_only", "modulation_only"])
def test_adaln_tangents_match_reference_forward_ad(kernel_device, dtype, tangents):
    g = torch.Generator().manual_seed(1)
    B, N, C = 3, 13, 37
    x, y = rand(B, N, C, dtype=dtype, device=kernel_device, g=g), rand(B, N, C, dtype=dtype, device=kernel_device, g=g)
    gate, shift, scale = (rand(B, C, dtype=dtype, device=kernel_device, g=g) for _ in range(3))
    primals = (x, y, gate, shift, scale)
    tans = [rand(*p.shape, dtype=dtype, device=kernel_device, g=g) for p in primals]
    if tangents == "x_only":
        tans = [tans[0]] + [torch.zeros_like(t) for t in tans[1:]]
    elif tangents == "modulation_only":
        tans = [torch.zeros_like(t) for t in tans[:3]] + tans[3:]

    def fused(x, y, gate, shift, scale):
        h, out = K.gated_residual_adaln(x, y, gate, shift, scale, backend="triton")
        return h, out, K.adaln_modulate(x, shift, scale, backend="triton")

    def reference(x, y, gate, shift, scale):
        h, out = K.gated_residual_adaln(x, y, gate, shift, scale, backend="torch")
        return h, out, K.adaln_modulate(x, shift, scale, backend="torch")

    got = torch.func.jvp(fused, primals, tuple(tans))
    want = torch.func.jvp(reference, primals, tuple(tans))
    for a, b in zip(got[1], want[1]):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **TOL[dtype])
    assert want[1][1].float().abs().mean() > 0.1  # the tangent is not trivially zero


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N,D", [(23, 23, 72), (17, 9, 40)], ids=["self_D72", "cross"])
def test_attention_function_rule_matches_math_path_jvp(kernel_device, dtype, M, N, D):
    g = torch.Generator().manual_seed(2)
    q = rand(2, 3, M, D, dtype=dtype, device=kernel_device, g=g)
    k, v = (rand(2, 3, N, D, dtype=dtype, device=kernel_device, g=g) for _ in range(2))
    tq, tk, tv = (torch.randn_like(t) for t in (q, k, v))
    out, tangent = torch.func.jvp(lambda q, k, v: K.attention(q, k, v, backend="triton"), (q, k, v), (tq, tk, tv))
    with sdpa_kernel(SDPBackend.MATH):
        ref_out, ref_tangent = torch.func.jvp(lambda q, k, v: K.attention(q, k, v, backend="torch"),
                                              (q.double(), k.double(), v.double()),
                                              (tq.double(), tk.double(), tv.double()))
    tol = dict(atol=3e-5, rtol=3e-5) if dtype == torch.float32 else dict(atol=4e-2, rtol=4e-2)
    torch.testing.assert_close(out.double(), ref_out, **tol)
    torch.testing.assert_close(tangent.double(), ref_tangent, **tol)
    assert ref_tangent.abs().mean() > 0.1


@pytest.mark.parametrize("text", [False, True], ids=["class", "text"])
def test_two_time_dit_jvp_on_fused_kernels_matches_references(kernel_device, text):
    """MeanFlow's JVP (tangent (v, 1, 0) on (z, t, r)) through a DiT with kernels=triton, the fused
    kernels kept by forward_mode_kernels, against kernels=torch on SDPA's math path."""
    torch.manual_seed(0)
    extra = {"text_dim": 24, "text_tokens": 7} if text else {}
    ref = build_dit("DiT-2x48x3/4", 2, 12, 5, kernels="torch", time_inputs=2, **extra).to(kernel_device)
    for p in ref.parameters():  # leave adaLN-Zero: zeros would hide every branch
        torch.nn.init.normal_(p, std=0.1)
    tri = build_dit("DiT-2x48x3/4", 2, 12, 5, kernels="triton", time_inputs=2, **extra).to(kernel_device)
    tri.load_state_dict(ref.state_dict())
    z, v = torch.randn(3, 2, 12, 12, device=kernel_device), torch.randn(3, 2, 12, 12, device=kernel_device)
    t = torch.rand(3, device=kernel_device) * 0.5 + 0.5
    r = t * torch.rand(3, device=kernel_device)
    cond = torch.randn(3, 7, 24, device=kernel_device) if text else torch.tensor([0, 3, 4], device=kernel_device)
    results = []
    for model in (ref, tri):
        with torch.no_grad(), forward_mode_kernels(model):
            assert model.kernels == ("triton" if model is tri else "torch")  # the fused path stays on
            results.append(torch.func.jvp(lambda z_, t_, r_: model(z_, t_, cond, sigma_end=r_), (z, t, r),
                                          (v, torch.ones_like(t), torch.zeros_like(r))))
    (u_ref, du_ref), (u_tri, du_tri) = results
    assert du_ref.abs().mean() > 0.05
    torch.testing.assert_close(u_tri, u_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(du_tri, du_ref, atol=2e-4, rtol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_jvp_op_passes_opcheck(kernel_device, dtype):
    """flowpre::flash_attention_jvp: fake tensor shapes, schema, no aliasing; tangents may be None."""
    from flowpre.kernels.attention_jvp import flash_attention_jvp_op
    g = torch.Generator().manual_seed(3)
    q = rand(1, 2, 19, 24, dtype=dtype, device=kernel_device, g=g)
    k, v = (rand(1, 2, 11, 24, dtype=dtype, device=kernel_device, g=g) for _ in range(2))
    for tangents in ((torch.randn_like(q), torch.randn_like(k), torch.randn_like(v)), (None, torch.randn_like(k), None)):
        torch.library.opcheck(flash_attention_jvp_op, (q, k, v, *tangents, 0.2),
                              test_utils=("test_schema", "test_faketensor"))
