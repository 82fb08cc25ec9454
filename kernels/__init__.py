"""flowpre.kernels: fused Triton kernels, each with a PyTorch reference and backend switch."""
from .adaln import adaln_modulate, adaln_modulate_reference, gated_residual_adaln, gated_residual_adaln_reference
from .attention import attention, attention_reference
from .backend import BACKENDS, use_triton
from .loss import flow_loss, flow_loss_reference

__all__ = [
    "attention", "attention_reference", "adaln_modulate", "adaln_modulate_reference",
    "gated_residual_adaln", "gated_residual_adaln_reference", "flow_loss", "flow_loss_reference",
    "BACKENDS", "use_triton",
]
