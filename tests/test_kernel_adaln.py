"""Triton adaLN kernels against their PyTorch references (CUDA, or CPU through the interpreter)."""
import pytest
import torch

from flowpre.kernels import adaln

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# odd C (masked columns), N = 1 (one token per sample), N = 77 (several chunks, last partial)
SHAPES = [(3, 17, 40), (2, 1, 385), (2, 77, 72), (4, 5, 128)]


def _tol(dtype):
    return 1e-4 if dtype == torch.float32 else 2e-2


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _inputs(shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    b, n, c = shape
    # an offset mean and a spread of row scales exercise the statistics, and
    # shift/scale/gate far from 0 make every term of the modulation matter
    x = (torch.randn(b, n, c, generator=g) * torch.rand(b, n, 1, generator=g).add(0.5) + 0.7)
    y = torch.randn(b, n, c, generator=g)
    gate, shift, scale = (torch.randn(b, c, generator=g) for _ in range(3))
    return [t.to(device=device, dtype=dtype) for t in (x, y, gate, shift, scale)]


def _grads_vs_reference(fn, ref_fn, inputs, n_out, device, dtype):
    """Outputs and input grads of fn, and of ref_fn in fp32 from the same rounded inputs."""
    g = torch.Generator().manual_seed(1)
    ins = [t.clone().requires_grad_() for t in inputs]
    outs = fn(*ins)
    outs = outs if isinstance(outs, tuple) else (outs,)
    douts = [torch.randn(o.shape, generator=g).to(device=device, dtype=dtype) for o in outs]
    grads = torch.autograd.grad(outs, ins, douts)
    ref_ins = [t.float().requires_grad_() for t in inputs]
    ref_outs = ref_fn(*ref_ins)
    ref_outs = ref_outs if isinstance(ref_outs, tuple) else (ref_outs,)
    ref_grads = torch.autograd.grad(ref_outs, ref_ins, [d.float() for d in douts])
    assert len(outs) == n_out
    for o in outs:
        assert o.dtype == dtype
    return list(outs) + list(grads), list(ref_outs) + list(ref_grads)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_adaln_modulate_matches_reference(kernel_device, shape, dtype):
    x, _, _, shift, scale = _inputs(shape, dtype, kernel_device, seed=sum(shape))
    got, want = _grads_vs_reference(
        lambda x, s, c: adaln.adaln_modulate(x, s, c, backend="triton"),
        adaln.adaln_modulate_reference, [x, shift, scale], 1, kernel_device, dtype)
    for name, a, b in zip(["out", "dx", "dshift", "dscale"], got, want):
        assert a.shape == b.shape, name
        assert _rel(a, b) < _tol(dtype), (name, _rel(a, b))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_gated_residual_adaln_matches_reference(kernel_device, shape, dtype):
    inputs = _inputs(shape, dtype, kernel_device, seed=sum(shape) + 7)
    got, want = _grads_vs_reference(
        lambda *a: adaln.gated_residual_adaln(*a, backend="triton"),
        adaln.gated_residual_adaln_reference, inputs, 2, kernel_device, dtype)
    for name, a, b in zip(["h", "out", "dx", "dy", "dgate", "dshift", "dscale"], got, want):
        assert a.shape == b.shape, name
        assert _rel(a, b) < _tol(dtype), (name, _rel(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_launchers_overwrite_poisoned_buffers(kernel_device, dtype):
    """Every element of caller-supplied output buffers is written (none left NaN)."""
    x, y, gate, shift, scale = _inputs((2, 77, 72), dtype, kernel_device, seed=3)
    dout, dh = torch.randn_like(x), torch.randn_like(x)
    nan = lambda t: torch.full_like(t, float("nan"))  # noqa: E731
    for residual in (False, True):
        kw = dict(y=y, gate=gate) if residual else {}
        clean = adaln.adaln_forward(x, shift, scale, **kw)
        stats = torch.empty(2, 77, device=kernel_device)
        poisoned = adaln.adaln_forward(x, shift, scale, **kw, out=nan(x), mean=nan(stats), rstd=nan(stats),
                                       h=nan(x) if residual else None)
        for a, b in zip(clean, poisoned):
            if a is not None:
                assert not b.isnan().any()
                assert torch.equal(a, b)
        out, h, mean, rstd = clean
        src = h if residual else x
        kw = dict(y=y, gate=gate, dh=dh, dy=nan(x)) if residual else {}
        grads = adaln.adaln_backward(src, scale, mean, rstd, dout, dx=nan(x), **kw)
        want = adaln.adaln_backward(src, scale, mean, rstd, dout, **({k: v for k, v in kw.items() if k != "dy"}))
        for a, b in zip(grads, want):
            if a is not None:
                assert not a.isnan().any()
                assert torch.equal(a, b)


def test_backward_is_deterministic(kernel_device):
    inputs = [t.requires_grad_() for t in _inputs((4, 77, 128), torch.bfloat16, kernel_device, seed=5)]
    h, out = adaln.gated_residual_adaln(*inputs, backend="triton")
    douts = (torch.randn_like(h), torch.randn_like(out))
    first = torch.autograd.grad((h, out), inputs, douts, retain_graph=True)
    second = torch.autograd.grad((h, out), inputs, douts)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_gradcheck_float64(kernel_device):
    x, y, gate, shift, scale = (t.requires_grad_() for t in _inputs((2, 3, 5), torch.float64, kernel_device, seed=11))
    assert torch.autograd.gradcheck(lambda *a: adaln.adaln_modulate(*a, backend="triton"), (x, shift, scale))
    assert torch.autograd.gradcheck(lambda *a: adaln.gated_residual_adaln(*a, backend="triton"),
                                    (x, y, gate, shift, scale))


def test_non_contiguous_inputs(kernel_device):
    x, y, gate, shift, scale = _inputs((3, 17, 40), torch.float32, kernel_device, seed=13)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, permuted strides
    got = adaln.gated_residual_adaln(xt, y, gate, shift, scale, backend="triton")
    want = adaln.gated_residual_adaln_reference(x, y, gate, shift, scale)
    for a, b in zip(got, want):
        assert _rel(a, b) < 1e-5


def test_autocast_mixed_dtypes_match_reference(kernel_device):
    """Under bf16 autocast the DiT hands in an fp32 residual stream x with bf16 branch output y
    and bf16 shift/scale/gate: outputs follow x's dtype, each gradient its input's dtype."""
    x, y, gate, shift, scale = _inputs((3, 17, 72), torch.float32, kernel_device, seed=11)
    y, gate, shift, scale = (t.to(torch.bfloat16) for t in (y, gate, shift, scale))
    g = torch.Generator().manual_seed(5)
    ins = [t.clone().requires_grad_() for t in (x, y, gate, shift, scale)]
    h, out = adaln.gated_residual_adaln(*ins, backend="triton")
    assert h.dtype == out.dtype == torch.float32
    dh, dout = (torch.randn(h.shape, generator=g).to(kernel_device) for _ in range(2))
    grads = torch.autograd.grad((h, out), ins, (dh, dout))
    assert [t.dtype for t in grads] == [t.dtype for t in ins]
    ref_ins = [t.float().requires_grad_() for t in (x, y, gate, shift, scale)]
    ref = adaln.gated_residual_adaln_reference(*ref_ins)
    ref_grads = torch.autograd.grad(ref, ref_ins, (dh, dout))
    for name, a, b in zip(["h", "out"], (h, out), ref):
        assert _rel(a, b) < 1e-4, name
    for name, a, b in zip(["dx", "dy", "dgate", "dshift", "dscale"], grads, ref_grads):
        assert _rel(a, b) < 2e-2, (name, _rel(a, b))
    m = adaln.adaln_modulate(x, shift, scale, backend="triton")
    assert m.dtype == torch.float32 and _rel(m, adaln.adaln_modulate_reference(x, shift.float(), scale.float())) < 1e-4


def test_autocast_writes_modulated_output_in_autocast_dtype(kernel_device):
    """Under bf16 autocast the modulated output feeds a bf16 matmul, so both paths write it in
    bf16 directly (no fp32 tensor for autocast to cast); the residual h stays x's dtype."""
    x, y, gate, shift, scale = _inputs((3, 17, 72), torch.float32, kernel_device, seed=12)
    y, gate, shift, scale = (t.to(torch.bfloat16) for t in (y, gate, shift, scale))
    g = torch.Generator().manual_seed(6)
    douts = [torch.randn(x.shape, generator=g).to(device=kernel_device, dtype=dt)
             for dt in (torch.bfloat16, torch.float32, torch.bfloat16)]  # for m, h, out
    results = {}
    for backend in ("triton", "torch"):
        ins = [t.clone().requires_grad_() for t in (x, y, gate, shift, scale)]
        with torch.autocast(kernel_device.type, dtype=torch.bfloat16):
            m = adaln.adaln_modulate(ins[0], ins[3], ins[4], backend=backend)
            h, out = adaln.gated_residual_adaln(*ins, backend=backend)
        assert m.dtype == out.dtype == torch.bfloat16 and h.dtype == torch.float32, backend
        grads = torch.autograd.grad((m, h, out), ins, douts)
        assert [t.dtype for t in grads] == [t.dtype for t in ins], backend
        results[backend] = (m, h, out, *grads)
    # bf16 tolerance throughout: the reference's gate * y is a bf16 product, the kernel's fp32
    for name, a, b in zip(["m", "h", "out", "dx", "dy", "dgate", "dshift", "dscale"], *results.values()):
        assert _rel(a, b) < 2e-2, (name, _rel(a, b))


def test_bad_inputs_raise(kernel_device):
    x, y, gate, shift, scale = _inputs((2, 3, 8), torch.float32, kernel_device, seed=0)
    with pytest.raises(ValueError, match="y"):
        adaln.gated_residual_adaln(x, y.to(torch.int32), gate, shift, scale, backend="triton")
    with pytest.raises(ValueError, match="scale"):
        adaln.adaln_modulate(x, shift, scale[:, :4], backend="triton")
    with pytest.raises(ValueError, match="x must be"):
        adaln.adaln_modulate(x[0], shift, scale, backend="triton")


def test_torch_backend_is_the_reference(kernel_device):
    x, y, gate, shift, scale = _inputs((2, 3, 8), torch.float32, kernel_device, seed=2)
    assert torch.equal(adaln.adaln_modulate(x, shift, scale, backend="torch"),
                       adaln.adaln_modulate_reference(x, shift, scale))


# Tilings the sweep (benchmarks/adaln_sweep.py) may pick: split or padded columns, one or
# several rows per tile, 0-2 tiles prefetched. Each must compute the same gradients.
TILINGS = [(1, True, 0), (2, True, 1), (4, True, 2), (2, False, 2), (1, False, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,split,prefetch", TILINGS)
def test_every_tiling_matches_reference(kernel_device, monkeypatch, rows, split, prefetch, dtype):
    def tiling(C, N, backward=False):
        a, b = adaln.column_blocks(C, split)
        return adaln.Launch(rows, a, b, 4, prefetch if backward else 0)
    monkeypatch.setattr(adaln, "launch_config", tiling)
    # 50 tokens of 385 columns (256 + 256 split): several tiles per backward program,
    # the last one partial, and a chunk end that is not a tile end
    inputs = _inputs((3, 50, 385), dtype, kernel_device, seed=rows * 10 + prefetch)
    got, want = _grads_vs_reference(
        lambda *a: adaln.gated_residual_adaln(*a, backend="triton"),
        adaln.gated_residual_adaln_reference, inputs, 2, kernel_device, dtype)
    for name, a, b in zip(["h", "out", "dx", "dy", "dgate", "dshift", "dscale"], got, want):
        assert _rel(a, b) < _tol(dtype), (name, _rel(a, b))


def test_column_blocks_cover_width_with_little_padding():
    for C in range(1, 3000):
        a, b = adaln.column_blocks(C)
        assert a & (a - 1) == 0 and (b == 0 or b & (b - 1) == 0)
        assert a <= C <= a + b or (b == 0 and a == C)
        assert a + b <= triton_next_pow2(C)
    assert adaln.column_blocks(1152) == (1024, 128)
    assert adaln.column_blocks(1152, split=False) == (2048, 0)


def triton_next_pow2(n):
    return 1 << (n - 1).bit_length()


def test_backward_grid_fills_whole_rounds():
    # DiT-XL/2 at 512 px on 132 SMs with 3 programs each: one full round, not 2.7
    n_chunks, per_program = adaln.backward_grid(32, 1024, 1, 3 * 132)
    assert 32 * n_chunks <= 3 * 132 and n_chunks * per_program >= 1024
    assert per_program <= 1.05 * 1024 * 32 / (3 * 132) + 4
    for B, N, rows, slots in [(1, 1, 1, 4), (3, 17, 16, 4), (256, 256, 1, 528), (7, 1000, 4, 96)]:
        n_chunks, per_program = adaln.backward_grid(B, N, rows, slots)
        tiles = -(-N // rows)
        assert n_chunks * per_program >= tiles > (n_chunks - 1) * per_program  # every tile, no empty chunk


def test_backward_occupancy_is_learnt_once_and_falls_back(monkeypatch):
    """On CUDA the grid is sized from the compiled kernel's registers; without NVIDIA tools it
    warns and assumes 4 programs per SM. Exercised here with stand-ins for the GPU parts."""
    import types
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(multi_processor_count=132))
    monkeypatch.setattr(adaln, "_RESIDENT", {})
    calls = []

    class Kernel:
        def warmup(self, *args, grid, **kw):
            calls.append(kw)
            return "compiled"
    monkeypatch.setattr(adaln, "_adaln_bwd_kernel", Kernel())
    monkeypatch.setattr(adaln.registers, "resident_programs", lambda compiled, warps: 3)
    launch = adaln.Launch(1, 1024, 128, 4, 2)
    assert adaln._backward_slots(cuda, torch.bfloat16, True, launch, [], {"num_warps": 4}) == 396
    assert adaln._backward_slots(cuda, torch.bfloat16, True, launch, [], {"num_warps": 4}) == 396
    assert len(calls) == 1  # compiled and measured once per tiling
    assert adaln._backward_slots(torch.device("cpu"), torch.bfloat16, True, launch, [], {}) == 4

    def no_tools(compiled, warps):
        raise RuntimeError("cuobjdump is missing")
    monkeypatch.setattr(adaln.registers, "resident_programs", no_tools)
    with pytest.warns(UserWarning, match="cuobjdump is missing"):
        assert adaln._backward_slots(cuda, torch.bfloat16, False, launch, [], {"num_warps": 4}) == 4 * 132
