"""flowpre.kernels: fused Triton kernels, each with a PyTorch reference and backend switch."""
if __name__ != "flowpre.kernels":
    # Importing this folder under a second name (a bare `import kernels` with flowpre/ on
    # sys.path) runs it twice, and the second run re-registers every torch custom op
    # (torch.ops.flowpre.*). torch then frees the first registration while the first copy,
    # the one flowpre's model calls, still points at it: a use-after-free that surfaced as
    # random std::bad_alloc and segfaults in later kernel calls.
    raise ImportError(f"flowpre/kernels/ is the package flowpre.kernels; import it under that name, not as "
                      f"{__name__!r} (put the folder above flowpre/ on sys.path, not flowpre/ itself)")
from .adaln import adaln_modulate, adaln_modulate_reference, gated_residual_adaln, gated_residual_adaln_reference
from .attention import attention, attention_reference
from .backend import BACKENDS, use_triton
from .loss import flow_loss, flow_loss_reference

__all__ = [
    "attention", "attention_reference", "adaln_modulate", "adaln_modulate_reference",
    "gated_residual_adaln", "gated_residual_adaln_reference", "flow_loss", "flow_loss_reference",
    "BACKENDS", "use_triton",
]
