"""Bounds checks for every memory access of a Triton kernel run under the interpreter.

Under TRITON_INTERPRET=1 a kernel's loads and stores are raw pointer accesses into the
torch tensors it was given (on CPU no copy is made). A masked store whose mask lets one
element too many through writes past the tensor into the heap, silently; the damage shows
up later, in another test, as std::bad_alloc or a crash. On a GPU the same bug
writes into a neighbouring allocation. So every test that runs a kernel under the
interpreter checks, at each load, store and atomic, that every enabled lane's address lies
inside one of the kernel's tensor arguments (the extent of the view, not just its storage),
and fails naming the kernel, the operation and the first offending address.

`install()` is called once from conftest.py; `violations` counts what was caught (the
guard's own test checks that a deliberately wrong kernel is caught).
"""
import numpy as np
import torch
from triton.runtime import interpreter as _interp


class OutOfBoundsAccess(AssertionError):
    pass


_extents = None  # [(start, end, description)] of the running kernel's tensor arguments
_kernel = None
violations = 0


def _tensor_extent(t):
    """Byte range [start, end) a strided view can address."""
    if t.numel() == 0:
        return None
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()) if size > 0)
    start = t.data_ptr()
    if any(s < 0 for s in t.stride()):
        raise OutOfBoundsAccess("negative strides are not expected in flowpre's kernels")
    return start, start + (last + 1) * t.element_size(), f"{tuple(t.shape)} {t.dtype}"


def _collect(args, out):
    for arg in args:
        if isinstance(arg, (tuple, list)):
            _collect(arg, out)
        elif isinstance(arg, torch.Tensor):
            extent = _tensor_extent(arg)
            if extent is not None:
                out.append(extent)
        elif hasattr(arg, "base") and isinstance(getattr(arg, "base"), torch.Tensor):
            _collect([arg.base], out)


def _check(op, ptrs, mask, element_ty):
    global violations
    if _extents is None:
        return
    addresses = np.asarray(ptrs.data, dtype=np.uint64)
    if mask is not None:
        addresses = addresses[np.broadcast_to(np.asarray(mask.data, dtype=bool), addresses.shape)]
    if addresses.size == 0:
        return
    itemsize = max(element_ty.primitive_bitwidth // 8, 1)
    inside = np.zeros(addresses.shape, dtype=bool)
    for start, end, _ in _extents:
        inside |= (addresses >= start) & (addresses + itemsize <= end)
    if inside.all():
        return
    violations += 1
    bad = int(addresses[~inside][0])
    nearest = min(_extents, key=lambda e: min(abs(bad - e[0]), abs(bad - e[1])))
    raise OutOfBoundsAccess(
        f"kernel {_kernel}: {op} of {int((~inside).sum())} lane(s) outside every tensor argument; "
        f"first at byte {bad - nearest[0]} from the start of the nearest argument "
        f"({nearest[2]}, {nearest[1] - nearest[0]} bytes)")


def _check_width(ptrs, value):
    """The interpreter copies each value's numpy width into memory: a value wider than the
    pointer's element would write past it."""
    global violations
    if _extents is None:
        return
    want = max(ptrs.get_element_ty().primitive_bitwidth // 8, 1)
    got = np.asarray(value.data).dtype.itemsize
    if got > want:
        violations += 1
        raise OutOfBoundsAccess(f"kernel {_kernel}: store of {got}-byte values into {want}-byte elements "
                                f"({ptrs.get_element_ty()})")


def install():
    builder = _interp.InterpreterBuilder
    if getattr(builder, "_flowpre_guarded", False):
        return
    builder._flowpre_guarded = True

    load, store = builder.create_masked_load, builder.create_masked_store
    rmw, cas = builder.create_atomic_rmw, builder.create_atomic_cas

    def create_masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        _check("load", ptrs, mask, ptrs.get_element_ty())
        return load(self, ptrs, mask, other, cache_policy, is_volatile)

    def create_masked_store(self, ptrs, value, mask, cache_policy):
        _check("store", ptrs, mask, ptrs.get_element_ty())
        _check_width(ptrs, value)
        return store(self, ptrs, value, mask, cache_policy)

    def create_atomic_rmw(self, op, ptr, val, mask, sem, scope):
        _check("atomic", ptr, mask, ptr.get_element_ty())
        return rmw(self, op, ptr, val, mask, sem, scope)

    def create_atomic_cas(self, ptr, cmp, val, sem, scope):
        _check("atomic_cas", ptr, None, ptr.get_element_ty())
        return cas(self, ptr, cmp, val, sem, scope)

    builder.create_masked_load, builder.create_masked_store = create_masked_load, create_masked_store
    builder.create_atomic_rmw, builder.create_atomic_cas = create_atomic_rmw, create_atomic_cas

    executor = _interp.GridExecutor
    init_args = executor._init_args_hst
    call = executor.__call__

    def _init_args_hst(self, args_dev, kwargs):
        global _extents, _kernel
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        extents = []
        _collect(list(args_hst) + list(kwargs_hst.values()), extents)
        _extents, _kernel = extents, getattr(self.fn, "__name__", str(self.fn))
        return args_hst, kwargs_hst

    def __call__(self, *args, **kwargs):
        global _extents, _kernel
        try:
            return call(self, *args, **kwargs)
        finally:
            _extents, _kernel = None, None

    executor._init_args_hst, executor.__call__ = _init_args_hst, __call__
