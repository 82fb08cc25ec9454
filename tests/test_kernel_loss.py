"""Triton flow loss against its PyTorch reference, and the CPU behaviour of the kernel bench."""
import pytest
import torch

from flowpre.kernels import bench, loss

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (shape, num_groups): trailing dims of every rank, a sample spanning several tiles
# (4097 > one 4096 block), one element per sample, more groups than samples
CASES = [((5, 3, 7, 7), 4), ((2, 4097), 1), ((9, 1), 3), ((3, 2, 33), 6)]


def _tol(dtype):
    return 1e-4 if dtype == torch.float32 else 2e-2


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _inputs(shape, num_groups, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    b = shape[0]
    pred = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    target = (torch.randn(shape, generator=g) * 0.5 + 0.3).to(device=device, dtype=dtype)
    weight = (torch.rand(b, generator=g) + 0.25).to(device)
    group = torch.randint(0, num_groups, (b,), generator=g).to(device)
    return pred, target, weight, group


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,num_groups", CASES)
def test_flow_loss_matches_reference(kernel_device, shape, num_groups, dtype):
    pred, target, weight, group = _inputs(shape, num_groups, dtype, kernel_device, seed=sum(shape))
    ins = [t.clone().requires_grad_() for t in (pred, target, weight)]
    total, groups = loss.flow_loss(*ins, group, num_groups, backend="triton")
    assert total.dtype == torch.float32 and total.dim() == 0
    assert groups.shape == (num_groups,) and not groups.requires_grad
    grads = torch.autograd.grad(total * 1.7, ins)  # a non-unit upstream grad

    ref_ins = [t.float().requires_grad_() for t in (pred, target, weight)]
    ref_total, ref_groups = loss.flow_loss_reference(*ref_ins, group, num_groups)
    ref_grads = torch.autograd.grad(ref_total * 1.7, ref_ins)

    assert _rel(total, ref_total) < 1e-5
    assert torch.allclose(groups, ref_groups, rtol=1e-5, atol=1e-7)
    for name, a, b in zip(["dpred", "dtarget", "dweight"], grads, ref_grads):
        assert a.dtype == b.dtype if name == "dweight" else a.dtype == dtype
        assert _rel(a, b) < _tol(dtype), (name, _rel(a, b))


@pytest.mark.parametrize("target_dtype", [torch.float32, torch.bfloat16])
def test_bf16_pred_matches_fp32_reference(kernel_device, target_dtype):
    """The training loop hands in autocast's bf16 prediction as it is (no fp32 copy): the
    kernel reads it in bf16 and accumulates in fp32, so it matches the reference on the
    same values in fp32; the gradients come back in each input's own dtype."""
    pred, target, weight, group = _inputs((5, 3, 7, 9), 3, torch.float32, kernel_device, seed=21)
    pred, target = pred.to(torch.bfloat16), target.to(target_dtype)
    ins = [pred.clone().requires_grad_(), target.clone().requires_grad_()]
    total, groups = loss.flow_loss(*ins, weight, group, 3, backend="triton")
    assert total.dtype == groups.dtype == torch.float32
    dpred, dtarget = torch.autograd.grad(total, ins)
    assert dpred.dtype == torch.bfloat16 and dtarget.dtype == target_dtype

    ref_ins = [pred.float().requires_grad_(), target.float().requires_grad_()]
    ref_total, ref_groups = loss.flow_loss_reference(*ref_ins, weight, group, 3)
    ref_dpred, ref_dtarget = torch.autograd.grad(ref_total, ref_ins)
    assert _rel(total, ref_total) < 1e-6
    torch.testing.assert_close(groups, ref_groups, rtol=1e-6, atol=1e-7)
    assert _rel(dpred, ref_dpred) < 1e-2 and _rel(dtarget, ref_dtarget) < 1e-2
    # the torch path takes the same inputs (the reference casts inside)
    torch_total, _ = loss.flow_loss(pred, target, weight, group, 3, backend="torch")
    assert _rel(torch_total, ref_total) < 1e-6


def test_empty_group_is_zero(kernel_device):
    pred, target, weight, _ = _inputs((6, 2, 5), 5, torch.float32, kernel_device, seed=4)
    group = torch.tensor([0, 2, 2, 0, 2, 0], device=kernel_device)
    total, groups = loss.flow_loss(pred, target, weight, group, 5, backend="triton")
    ref_total, ref_groups = loss.flow_loss_reference(pred, target, weight, group, 5)
    assert torch.equal(groups[[1, 3, 4]], torch.zeros(3, device=kernel_device))
    assert (groups[[0, 2]] > 0).all()
    assert torch.allclose(groups, ref_groups, rtol=1e-5)
    assert torch.allclose(total, ref_total, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_launchers_overwrite_poisoned_buffers(kernel_device, dtype):
    pred, target, weight, group = _inputs((5, 3, 7, 7), 4, dtype, kernel_device, seed=9)
    nan = lambda *s: torch.full(s, float("nan"), device=kernel_device)  # noqa: E731
    clean = loss.flow_loss_forward(pred, target, weight, group, 4)
    poisoned = loss.flow_loss_forward(pred, target, weight, group, 4, total=nan(), group_losses=nan(4), means=nan(5))
    for a, b in zip(clean, poisoned):
        assert not b.isnan().any() and torch.equal(a, b)
    d_total = torch.tensor(0.8, device=kernel_device)
    dpred = loss.flow_loss_backward(pred, target, weight, d_total,
                                    dpred=torch.full((5, 147), float("nan"), device=kernel_device, dtype=dtype))
    assert dpred.shape == pred.shape and not dpred.isnan().any()
    assert torch.equal(dpred, loss.flow_loss_backward(pred, target, weight, d_total))


def test_gradcheck_float64(kernel_device):
    pred, target, weight, group = _inputs((3, 2, 5), 2, torch.float64, kernel_device, seed=6)
    weight = weight.double()
    ins = tuple(t.requires_grad_() for t in (pred, target, weight))
    assert torch.autograd.gradcheck(lambda p, t, w: loss.flow_loss(p, t, w, group, 2, backend="triton")[0], ins)


@pytest.mark.parametrize("bad,error", [("target", "target"), ("weight", "weight"), ("group", "group")])
def test_bad_dtype_raises(kernel_device, bad, error):
    args = dict(zip(["pred", "target", "weight", "group"], _inputs((4, 3), 2, torch.float32, kernel_device, seed=0)))
    # a target of another float dtype is fine (a bf16 prediction against an fp32 target); an integer one is not
    args[bad] = args[bad].to({"target": torch.int64, "weight": torch.int64, "group": torch.int32}[bad])
    with pytest.raises(ValueError, match=error):
        loss.flow_loss(**args, num_groups=2, backend="triton")


def test_group_out_of_range_raises_on_cpu():
    # the validation the Triton path runs; on CUDA tensors it is skipped (no host sync)
    pred, target, weight, _ = _inputs((4, 3), 2, torch.float32, "cpu", seed=0)
    with pytest.raises(ValueError, match="group"):
        loss._check(pred, target, weight, torch.tensor([0, 1, 2, 0]), 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU this would run the whole benchmark")
def test_bench_without_gpu_exits_cleanly(tmp_path, capsys):
    assert bench.main(["--out", str(tmp_path / "bench.json"), "--quick"]) == 0
    assert "needs a CUDA GPU; nothing measured" in capsys.readouterr().out


@pytest.mark.parametrize("shape", [(0, 3), (2, 0), (2, 4, 0)])
def test_empty_input_is_refused_by_name(shape):
    pred = torch.randn(*shape)
    weight, group = torch.rand(shape[0]), torch.zeros(shape[0], dtype=torch.int64)
    with pytest.raises(ValueError, match="pred has no elements"):
        loss.flow_loss(pred, torch.randn(*shape), weight, group, 2, backend="triton")


def test_bench_table_prints_a_committed_gpu_report(capsys):
    """The table printer on the rows an H200 run wrote (the GPU path cannot run here)."""
    import json
    from pathlib import Path
    report = json.loads((Path(__file__).resolve().parents[1] / "benchmarks/results/kernels_h200.json").read_text())
    bench._print_header(report)
    bench._print_rows(report["rows"])
    out = capsys.readouterr().out
    assert "H200" in out.splitlines()[0]
    line = next(x for x in out.splitlines() if x.startswith("gated_residual_adaln") and "fwd_bwd_graph" in x)
    assert "61%pk" in line and "vs_compiled=1.53x" in line
    assert sum(x.startswith("attention") for x in out.splitlines()) >= 3


def test_finishing_kernel_loops_over_more_chunks_than_its_block(kernel_device, monkeypatch):
    """A large sample cut into more chunks than the finishing kernel's chunk block (32: more
    spills registers, benchmarks/a100_configs.py): its loop over chunk blocks sums them all."""
    monkeypatch.setattr(loss, "_programs_wanted", lambda device: 160)
    pred, target, weight, group = _inputs((2, 35 * 4096 - 5), 2, torch.float32, kernel_device, seed=7)
    total, groups = loss.flow_loss(pred, target, weight, group, 2, backend="triton")
    ref_total, ref_groups = loss.flow_loss_reference(pred, target, weight, group, 2)
    assert _rel(total, ref_total) < 1e-5 and torch.allclose(groups, ref_groups, rtol=1e-5, atol=1e-7)
