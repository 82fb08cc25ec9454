"""The interpreter's bounds guard (tests/interpreter_guard.py) catches an off-by-one store."""
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="guards the interpreter only")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import interpreter_guard  # noqa: E402


@triton.jit
def _scale_kernel(x_ptr, out_ptr, n, limit, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < limit  # the caller passes limit = n + 1 to make the off-by-one
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr + offs, x * 2.0, mask=mask)


@pytest.mark.parametrize("n", [5, 16, 37])
def test_guard_passes_a_correct_kernel(n):
    x = torch.randn(n)
    out = torch.empty(n)
    _scale_kernel[(triton.cdiv(n, 16),)](x, out, n, n, BLOCK=16)
    torch.testing.assert_close(out, 2 * x)


@pytest.mark.parametrize("n", [5, 16, 37])
def test_guard_catches_a_store_one_past_the_end(n):
    x = torch.randn(n)
    buffer = torch.randn(n + 1)
    sentinel = buffer[n].item()
    before = interpreter_guard.violations
    with pytest.raises(Exception, match="store of 1 lane"):
        # out is a view of the first n elements: the n-th store lands in the buffer's spare
        # element, which no argument of the kernel owns
        _scale_kernel[(triton.cdiv(n + 1, 16),)](x, buffer[:n], n, n + 1, BLOCK=16)
    assert interpreter_guard.violations == before + 1
    assert buffer[n].item() == sentinel, "the guard must stop the store before it happens"


def test_guard_catches_a_load_past_the_end():
    n = 9
    x = torch.randn(n + 3)[:n]
    out = torch.empty(n + 3)

    @triton.jit
    def _read_past(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < n + 2), mask=offs < n + 2)

    with pytest.raises(Exception, match="load of 2 lane"):
        _read_past[(1,)](x, out, n, BLOCK=16)
