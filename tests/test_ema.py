"""The dual fp32 EMA: math, restart, state, and correctness under ZeRO-3 on 2 ranks."""
import sys

import torch

from flowpre.train.ema import DualEma

from helpers import flowpre, launch, metrics, weights


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
    from pathlib import Path
    digits = tmp_path / "digits"
    from flowpre.data.shards import write_shards
    write_shards("digits", digits, shard_size=100, limit=400)
    for stage in (0, 3):
        run = tmp_path / f"z{stage}"
        launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(29650 + stage)], run, str(digits / "train-*.tar"), f"deepspeed.zero_stage={stage}",
               "objective.name=scfm", "train.max_steps=4", "ema.fast_decay=0.5", "ema.slow_decay=0.8",
               "train.checkpoint_every=2", "sample.every=2")
        ema_bytes[stage] = metrics(run)[-1]["ema_bytes_per_rank"]
        assert (run / "samples" / "step0000002_1steps.png").is_file()
        for which in ("fast", "slow", "none"):
            path = Path(tmp_path / f"z{stage}_{which}.safetensors")
            flowpre("export", "--run", str(run), "--out", str(path), "--ema", which)
            out[stage, which] = weights(path)
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
