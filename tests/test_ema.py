"""The dual fp32 EMA: math, restart, state, and correctness under ZeRO-3 on 2 ranks."""
import os
import subprocess
import sys

import pytest
import torch

from flowpre.train import ema as ema_module
from flowpre.train.ema import DualEma

from helpers import exported, free_port, launch, metrics


def tiny():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GELU(), torch.nn.Linear(7, 3)).to(torch.bfloat16)


def test_ema_math_fp32_and_restart():
    student = tiny()
    ema = DualEma(student, fast_decay=0.9, slow_decay=0.999, restart_every=3)
    assert all(p.dtype == torch.float32 for p in ema.slow.parameters())  # fp32 whatever the student
    start = {k: v.clone() for k, v in ema.slow.state_dict().items()}
    torch.testing.assert_close(start["0.weight"], student[0].weight.float())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    ema.update(student, step=1)
    for key, decay in (("fast", 0.9), ("slow", 0.999)):
        got = ema.nets[key].state_dict()["0.weight"]
        expected = decay * start["0.weight"] + (1 - decay) * student[0].weight.float()
        torch.testing.assert_close(got, expected, atol=1e-7, rtol=1e-6)
    # a bf16 EMA at 0.999 would not move; this one does
    assert not torch.equal(ema.slow.state_dict()["0.weight"], start["0.weight"])
    ema.update(student, step=2)
    ema.update(student, step=3)  # restart: both become the student
    for net in ema.nets.values():
        torch.testing.assert_close(net.state_dict()["2.bias"], student[2].bias.float(), atol=0, rtol=0)


def _odd_student(dtype):
    """Parameters of several shapes and sizes, none a multiple of another."""
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(13, 31), torch.nn.LayerNorm(31), torch.nn.Conv2d(31, 5, 3),
                               torch.nn.Linear(7, 1)).to(dtype)


def _separate_updates(fast, slow, student, decays, restart):
    """What the two EMAs must be after one step: each updated on its own, tensor by tensor."""
    for ref, decay in ((fast, decays[0]), (slow, decays[1])):
        for r, p in zip(ref, student.parameters()):
            r.copy_(p.detach().float()) if restart else r.lerp_(p.detach().float(), 1.0 - decay)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("one_call", [True, False])
def test_both_emas_in_one_op_equal_two_separate_updates(dtype, one_call, monkeypatch):
    """DualEma.update does both EMAs in one multi-tensor op (or, on a torch without the
    per-tensor weights, one call per EMA): over random steps with a restart in between, it
    equals updating each EMA on its own, bit for bit."""
    monkeypatch.setattr(ema_module, "_LERP_PER_TENSOR_WEIGHT", one_call and ema_module._LERP_PER_TENSOR_WEIGHT)
    student = _odd_student(dtype)
    decays = (0.9, 0.999)
    ema = DualEma(student, *decays, restart_every=4)
    fast = [p.detach().float().clone() for p in student.parameters()]
    slow = [t.clone() for t in fast]
    g = torch.Generator().manual_seed(2)
    for step in range(1, 8):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn(p.shape, generator=g).to(dtype))
        ema.update(student, step)
        _separate_updates(fast, slow, student, decays, restart=step % 4 == 0)
        for key, ref in (("fast", fast), ("slow", slow)):
            for (name, got), want in zip(ema.nets[key].named_parameters(), ref):
                assert torch.equal(got, want), f"step {step} {key} {name}"
    assert not torch.equal(fast[0], slow[0])  # the two decays did differ


def test_sharded_emas_in_one_op_equal_two_separate_updates(tmp_path):
    """The same under ZeRO-3: the EMAs' local shards (ds_tensor) updated from the student's."""
    script = """
import os, torch
from flowpre.train.distributed import init_distributed
from flowpre.train.ema import DualEma
import deepspeed
init_distributed()
torch.manual_seed(1)
student = torch.nn.Sequential(torch.nn.Linear(13, 31), torch.nn.LayerNorm(31), torch.nn.Linear(31, 5))
ema = DualEma(student, 0.9, 0.999, restart_every=3, sharded=True)
deepspeed.zero.Init(module=student, config_dict_or_path={"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1,
                                                         "zero_optimization": {"stage": 3}})
shards = [p.ds_tensor for p in student.parameters()]
fast, slow = [s.float().clone() for s in shards], [s.float().clone() for s in shards]
g = torch.Generator().manual_seed(2)
for step in range(1, 6):
    for s in shards:
        s.add_(torch.randn(s.shape, generator=g))
    ema.update(student, step, zero3=True)
    for ref, decay in ((fast, 0.9), (slow, 0.999)):
        for r, s in zip(ref, shards):
            r.copy_(s) if step % 3 == 0 else r.lerp_(s, 1.0 - decay)
    for key, ref in (("fast", fast), ("slow", slow)):
        for p, want in zip(ema.nets[key].parameters(), ref):
            assert torch.equal(p.ds_tensor, want), (step, key)
print("sharded ok")
"""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "sharded ok" in done.stdout, done.stderr[-3000:]


def test_ema_state_roundtrip():
    student = tiny()
    a = DualEma(student, 0.5, 0.9)
    with torch.no_grad():
        student[0].weight.mul_(3)
    a.update(student, 1)
    b = DualEma(tiny(), 0.5, 0.9)
    b.load_state_dict(a.state_dict())
    for k in ("fast", "slow"):
        for (n1, p1), (n2, p2) in zip(a.nets[k].named_parameters(), b.nets[k].named_parameters()):
            assert torch.equal(p1, p2), n1


def test_sharded_ema_under_zero3_matches_zero0_on_two_ranks(tmp_path):
    """Under ZeRO-3 each rank holds half of each EMA, SCFM's EMA forwards gather it block by
    block, and the exported EMAs (and student) equal ZeRO-0's with its replicated EMAs."""
    out, ema_bytes = {}, {}
    digits = tmp_path / "digits"
    from flowpre.data.shards import write_shards
    write_shards("digits", digits, shard_size=100, limit=400)
    for stage in (0, 3):
        run = tmp_path / f"z{stage}"
        launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port())], run, str(digits / "train-*.tar"), f"deepspeed.zero_stage={stage}",
               "objective.name=scfm", "train.max_steps=4", "ema.fast_decay=0.5", "ema.slow_decay=0.8",
               "train.checkpoint_every=2", "sample.every=2")
        ema_bytes[stage] = metrics(run)[-1]["ema_bytes_per_rank"]
        assert (run / "samples" / "step0000002_1steps.png").is_file()
        for which in ("fast", "slow", "none"):
            out[stage, which] = exported(run, tmp_path / f"z{stage}_{which}.safetensors", which)
    full = 2 * 4 * sum(v.numel() for v in out[0, "slow"].values())
    assert ema_bytes[0] == full
    assert 0.5 * full <= ema_bytes[3] < 0.5 * full + 2 * 4 * 2 * len(out[0, "slow"])  # half, plus padding
    for which in ("fast", "slow", "none"):
        a, b = out[0, which], out[3, which]
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=f"{which} {k}")
    # the EMA moved away from the initial weights: the zero-initialised output layer is nonzero
    assert out[3, "slow"]["final.linear.weight"].abs().sum() > 0
    assert not torch.equal(out[3, "slow"]["final.linear.weight"], out[3, "none"]["final.linear.weight"])
