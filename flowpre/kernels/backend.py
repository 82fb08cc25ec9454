"""Choosing between a Triton kernel and its PyTorch reference.

"auto" runs Triton on CUDA tensors and the reference elsewhere (the model on CPU
uses the reference). "triton" forces the kernel: on CPU that needs the Triton
interpreter, which must be switched on (TRITON_INTERPRET=1) before the kernel
modules are imported, because @triton.jit reads it at decoration time.
"""
import os

import torch

BACKENDS = ("auto", "triton", "torch")

# Fused multiply-add in the kernels, as measured and tested. Triton 3.9 enables it by
# default but warns that 3.10 will not; pinning it keeps numerics and speed across the
# upgrade. A user's own setting wins.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(backend: str, tensor: torch.Tensor) -> bool:
    """True when the call should run the Triton kernel; raises on impossible requests."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "auto":
        return tensor.is_cuda and triton_available()
    if not triton_available():
        raise RuntimeError("backend='triton' but triton is not installed")
    if not tensor.is_cuda and not interpreter_on():
        raise RuntimeError(
            "backend='triton' on a CPU tensor needs the Triton interpreter: set "
            "TRITON_INTERPRET=1 before importing flowpre (or use backend='torch')")
    return True


def forward_mode_active() -> bool:
    """True under a torch.func transform (jvp) or a forward-AD dual level. The kernels then
    apply the variant of their autograd.Function that carries a forward-mode (jvp) rule:
    Dynamo cannot trace a Function that has one, so compiled training uses the plain one."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._functorch.maybe_current_level() is not None or torch.autograd.forward_ad._current_level >= 0
