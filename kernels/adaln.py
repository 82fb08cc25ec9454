"""Fused LayerNorm + adaLN modulation (and the residual-gate variant).

x is (B, N, C); shift, scale and gate are per sample, (B, C), broadcast over tokens.
LayerNorm has no affine parameters (adaLN supplies them) and is computed in fp32.
"""
import torch

from .backend import use_triton


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


def adaln_modulate(x, shift, scale, eps=1e-6, backend="auto"):
    if use_triton(backend, x):
        raise NotImplementedError("Triton adaLN lands with issue 4")
    return adaln_modulate_reference(x, shift, scale, eps)


def gated_residual_adaln(x, y, gate, shift, scale, eps=1e-6, backend="auto"):
    if use_triton(backend, x):
        raise NotImplementedError("Triton adaLN lands with issue 4")
    return gated_residual_adaln_reference(x, y, gate, shift, scale, eps)
