"""Runs that survive a cluster: preemption by signal (2 ranks, only one signalled) resumes
bitwise; a non-finite step on one rank is skipped on both; too many in a row stop the run."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flowpre.data.shards import write_shards
from flowpre.train.nonfinite import parse_faults
from flowpre.train.preemption import Preemption

from helpers import TINY, env, exported, flowpre, free_port, metrics, train, write_empty_config


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    write_shards("digits", out, shard_size=200, split="train", limit=800)
    return str(out / "train-*.tar")


def torchrun_cmd(run, shards, *overrides):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(free_port()), "-m", "flowpre.cli", "train", "--config", str(write_empty_config(run)),
            f"run.dir={run}", f"data.shards={shards}", *TINY, *overrides]


def two_ranks(run, shards, *overrides, extra_env=None, check=True):
    r = subprocess.run(torchrun_cmd(run, shards, *overrides), capture_output=True, text=True, timeout=600,
                       env=env(**(extra_env or {})))
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r


def rank_pid(run, rank):
    """The pid of the training process of `rank` for run folder `run` (read from /proc)."""
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if f"run.dir={run}".encode() in cmd and b"flowpre.cli" in cmd and f"RANK={rank}".encode() in environ \
                and b"torch.distributed.run" not in cmd:
            return int(proc.name)
    return None


def test_preemption_signal(tmp_path):
    """The handler records SIGTERM and SIGUSR1 (and only notes the first); restore() puts back the old ones."""
    before = signal.getsignal(signal.SIGUSR1)
    p = Preemption()
    assert not p.requested
    os.kill(os.getpid(), signal.SIGUSR1)
    assert p.requested and p.signal == "SIGUSR1"
    os.kill(os.getpid(), signal.SIGTERM)
    assert p.signal == "SIGUSR1"
    p.restore()
    assert signal.getsignal(signal.SIGUSR1) is before


def test_fault_spec_parses():
    assert parse_faults("3:1,7-9") == {(3, 1), (7, None), (8, None), (9, None)}
    assert parse_faults("") == set()
    with pytest.raises(ValueError, match="FLOWPRE_FAULT_NAN_AT"):
        parse_faults("x:1")


@pytest.mark.slow  # about 60 s: three 2-rank launches
def test_sigterm_on_one_rank_checkpoints_and_resumes_bitwise(tmp_path, digits):
    """SIGTERM to rank 1 only, mid-run: both ranks stop at the same step, checkpoint, exit 0; resume=auto
    to the end gives the uninterrupted run's weights bit for bit. A NaN step on rank 0 before the
    signal checks that resume after a skipped step is exact too."""
    common = ["train.max_steps=20", "train.checkpoint_every=7", "train.warmup_steps=4", "data.num_workers=1"]
    fault = {"FLOWPRE_FAULT_NAN_AT": "2:0"}
    straight, split = tmp_path / "straight", tmp_path / "split"
    two_ranks(straight, digits, *common, extra_env=fault)

    proc = subprocess.Popen(torchrun_cmd(split, digits, *common), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env(**fault))
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            log = split / "metrics.jsonl"
            if log.is_file() and len(log.read_text().splitlines()) >= 3:
                break
            time.sleep(0.05)
        pid = rank_pid(split, 1)
        assert pid is not None and proc.poll() is None, "the run ended before it could be signalled"
        os.kill(pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:] + err[-5000:]
    m = re.search(r"preempted at step (\d+) of 20 \(signal received by another rank\); checkpoint: (\S+)", out)
    assert m, out[-3000:]
    stop = int(m.group(1))
    assert 3 <= stop < 20 and Path(m.group(2)).name == f"step{stop:09d}"
    assert (Path(m.group(2)) / "meta.json").is_file()
    assert "rank 1 got SIGTERM" in err and not (split / "model.safetensors").exists()
    assert [r["step"] for r in metrics(split)] == list(range(1, stop + 1))

    r = two_ranks(split, digits, *common, "train.resume=auto", extra_env=fault)
    assert f"at step {stop}" in r.stdout
    for ema in ("slow", "none"):
        wa = exported(straight, tmp_path / f"a_{ema}.safetensors", ema)
        wb = exported(split, tmp_path / f"b_{ema}.safetensors", ema)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), ema
    ma, mb = metrics(straight), metrics(split)
    assert [x["skipped_steps"] for x in ma] == [0] + [1] * 19 == [x["skipped_steps"] for x in mb]
    assert [x["loss"] for x in ma[2:]] == [x["loss"] for x in mb[2:]]


def _module(ckpt):
    state = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return state["module"], state["lr_scheduler"]["last_epoch"], state["skipped_steps"]


@pytest.mark.parametrize("stage", [0, 2])
def test_nonfinite_loss_on_one_rank_is_skipped_on_both(tmp_path, digits, stage):
    """NaN loss on rank 1 at step 3: both ranks skip it (ZeRO-0: flowpre's check; ZeRO-2: DeepSpeed's
    overflow check plus flowpre's loss flag); weights, EMAs and LR are those of step 2; training goes on."""
    run = tmp_path / "run"
    r = two_ranks(run, digits, f"deepspeed.zero_stage={stage}", "train.max_steps=5", "train.checkpoint_every=1",
                  "train.keep_checkpoints=10", extra_env={"FLOWPRE_FAULT_NAN_AT": "3:1"})
    assert "step 3 skipped: non-finite loss" in r.stdout
    m = metrics(run)
    assert [x["skipped_steps"] for x in m] == [0, 0, 1, 1, 1]
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in m if x["step"] != 3)
    ck = {s: run / "checkpoints" / f"step{s:09d}" for s in (2, 3, 4)}
    (w2, lr2, sk2), (w3, lr3, sk3), (w4, lr4, _) = (_module(ck[s]) for s in (2, 3, 4))
    assert all(torch.equal(w2[k], w3[k]) for k in w2) and any(not torch.equal(w3[k], w4[k]) for k in w3)
    assert (lr2, lr3, lr4) == (2, 2, 3) and (sk2, sk3) == (0, 1)
    e2, e3 = (torch.load(ck[s] / "flowpre_shared.pt", weights_only=False)["ema"] for s in (2, 3))
    assert all(torch.equal(e2[k][n], e3[k][n]) for k in ("fast", "slow") for n in e2[k])


def test_too_many_nonfinite_steps_stop_naming_step_and_checkpoint(tmp_path, digits):
    run = tmp_path / "run"
    r = train(run, digits, "train.max_steps=20", "train.checkpoint_every=2", "train.max_skipped_steps=3",
              extra_env={"FLOWPRE_FAULT_NAN_AT": "3-20"}, check=False)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert "step 5: 3 consecutive steps" in r.stderr and "train.max_skipped_steps=3" in r.stderr
    assert str(run / "checkpoints" / "step000000004") in r.stderr and "Traceback" not in r.stderr
    assert [x["skipped_steps"] for x in metrics(run)] == [0, 0, 1, 2]  # it stops before logging step 5


def _export_like(path, **shape):
    """A small, valid flowpre export written directly (what `flowpre export` writes)."""
    from safetensors.torch import save_file

    from flowpre.models.dit import build_dit

    model = build_dit("DiT-2x32x2/4", 1, 8, 10)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"flowpre.model": json.dumps(model.config())})
    return path


def test_damaged_safetensors_is_an_error_naming_the_file(tmp_path):
    from flowpre.weights import WeightsError, load_model

    good = _export_like(tmp_path / "good.safetensors")
    load_model(good)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(3000))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size * 2 // 3])
    for bad in (garbage, truncated):
        with pytest.raises(WeightsError, match=re.escape(str(bad))):
            load_model(bad, source="model.init")
    for cmd in (["sample", "--weights", str(truncated), "--out", str(tmp_path / "g.png")],
                ["eval", "--weights", str(garbage), "--metric", "fd", "--num-samples", "4"]):
        r = flowpre(*cmd, check=False)
        assert r.returncode != 0 and str(cmd[2]) in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_resume_with_another_model_names_both(tmp_path, digits):
    run = tmp_path / "run"
    train(run, digits, "train.max_steps=2")
    r = train(run, digits, "train.max_steps=4", "train.resume=auto", "model.name=DiT-2x48x2/4", check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "DiT-2x32x2/4" in r.stderr and "model.name=DiT-2x48x2/4" in r.stderr and "hidden 32" in r.stderr
    garbage = tmp_path / "init.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    r = train(tmp_path / "run2", digits, f"model.init={garbage}", check=False)
    assert r.returncode == 2 and f"model.init: {garbage}" in r.stderr and "Traceback" not in r.stderr
