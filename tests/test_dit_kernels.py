"""The whole DiT with model.kernels=triton against model.kernels=torch (interpreter on CPU)."""
import pytest
import torch

from flowpre.models.dit import build_dit


@pytest.mark.parametrize("text", [False, True], ids=["class", "text"])
def test_dit_triton_matches_torch_forward_and_backward(kernel_device, text):
    """Class model, and a text model whose cross-attention runs the kernel with M != N."""
    torch.manual_seed(0)
    extra = {"text_dim": 24, "text_tokens": 8} if text else {}
    ref = build_dit("DiT-2x48x3/4", 2, 12, 5, kernels="torch", **extra).to(kernel_device)
    for p in ref.parameters():  # leave adaLN-Zero: zeros would hide every branch
        torch.nn.init.normal_(p, std=0.1)
    tri = build_dit("DiT-2x48x3/4", 2, 12, 5, kernels="triton", **extra).to(kernel_device)
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(3, 2, 12, 12, device=kernel_device)
    sigma = torch.rand(3, device=kernel_device)
    cond = torch.randn(3, 8, 24, device=kernel_device) if text else torch.tensor([0, 3, 5], device=kernel_device)
    outs, grads = [], []
    for model in (ref, tri):
        out = model(x, sigma, cond)
        out.pow(2).mean().backward()
        outs.append(out)
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert outs[0].abs().mean() > 0.1
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-4, rtol=1e-3, msg=name)
