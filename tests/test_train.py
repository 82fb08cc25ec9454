"""End-to-end training: one process, two ranks at every ZeRO stage, exact resume,
crash during a checkpoint, bad input. Tiny models on real shards, CPU, fp32."""
import io
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowpre.cli import main as cli_main
from flowpre.data.shards import write_shards

from helpers import exported, flowpre, free_port, launch, metrics, train, weights


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    write_shards("digits", out, shard_size=200, split="train", limit=800)
    return str(out / "train-*.tar")


def test_missing_shards_fail_before_training(tmp_path):
    pattern = str(tmp_path / "nothing-{000000..000003}.tar")
    r = train(tmp_path / "run", pattern, check=False)
    assert r.returncode != 0 and pattern in r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_two_ranks_zero_stages_agree(tmp_path, digits):
    """Same 5-step loss sequence at ZeRO 1, 2, 3 on 2 CPU ranks in fp32 as at ZeRO 0, under both
    launchers: torchrun for stages 0, 1 and 3, the deepspeed launcher for stage 2 (the launcher
    and the stage are independent, so each stage runs once)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    deepspeed = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port"]
    losses = {}
    for stage, cmd in {0: torchrun, 1: torchrun, 2: deepspeed, 3: torchrun}.items():
        run = tmp_path / f"zero{stage}"
        launch(cmd + [str(free_port())], run, digits, f"deepspeed.zero_stage={stage}", "train.max_steps=5")
        losses[stage] = torch.tensor([m["loss"] for m in metrics(run)], dtype=torch.float64)
        assert len(losses[stage]) == 5 and torch.isfinite(losses[stage]).all()
        assert (run / "model.safetensors").is_file()
    ref = losses[0]
    for stage, seq in losses.items():
        assert ((seq - ref).abs() / ref.abs()).max() < 1e-5, (stage, seq, ref)
    assert not torch.allclose(ref[0], ref[-1])  # it trained


def test_resume_is_exact(tmp_path, digits):
    """2N steps straight == N steps, resume, N steps: bitwise-identical exported weights."""
    common = ["train.checkpoint_every=3", "data.num_workers=2", "data.hflip=true", "train.warmup_steps=4"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(straight, digits, "train.max_steps=6", *common)
    train(split, digits, "train.max_steps=3", *common)
    r = train(split, digits, "train.max_steps=6", "train.resume=auto", *common)
    assert "resumed from" in r.stdout
    for ema in ("slow", "fast", "none"):
        wa = exported(straight, tmp_path / f"a_{ema}.safetensors", ema)
        wb = exported(split, tmp_path / f"b_{ema}.safetensors", ema)
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), ema
    # metrics after the resume continue the same numbers
    ma, mb = metrics(straight), metrics(split)
    assert [m["step"] for m in mb] == list(range(1, 7))
    assert [m["loss"] for m in ma] == [m["loss"] for m in mb]


def test_sigkill_during_checkpoint_keeps_previous(tmp_path, digits):
    run = tmp_path / "run"
    common = ["train.checkpoint_every=2", "train.max_steps=6"]
    r = train(run, digits, *common, extra_env={"FLOWPRE_FAULT_KILL_AT_CHECKPOINT": "4"}, check=False)
    assert r.returncode == -9, r.stderr[-2000:]
    ckpts = run / "checkpoints"
    assert (ckpts / "step000000002" / "meta.json").is_file()
    assert not (ckpts / "step000000004").exists() and (ckpts / ".tmp-step000000004").is_dir()
    assert (run / "flowpre.lock").is_file()  # the killed run's, taken over below
    # the previous checkpoint loads: export it, then resume=auto picks it and finishes
    flowpre("export", "--run", str(run), "--out", str(tmp_path / "w2.safetensors"))
    r = train(run, digits, *common, "train.resume=auto")
    assert "step000000002" in r.stdout and "at step 2" in r.stdout
    assert "taking over the lock of pid" in r.stderr and "its process is gone" in r.stderr
    assert not (ckpts / ".tmp-step000000004").exists()
    assert (ckpts / "step000000006" / "meta.json").is_file()


def _append_corrupt_sample(shard):
    with tarfile.open(shard, "a") as tar:
        for name, data in (("99999999.png", b"\x89PNG this is not an image"), ("99999999.cls", b"3")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_corrupt_sample_is_skipped_and_counted(tmp_path):
    out = tmp_path / "shards"
    write_shards("digits", out, shard_size=100, split="train", limit=200)
    _append_corrupt_sample(out / "train-000000.tar")
    run = tmp_path / "run"
    r = train(run, str(out / "train-*.tar"), "train.max_steps=30", "train.log_every=30")
    assert metrics(run)[-1]["corrupt_samples"] >= 1
    assert "corrupt" in r.stderr.lower() and "99999999" in r.stderr


def test_quickstart_short(tmp_path):
    """The quickstart config, shortened: grid PNGs, metrics and export exist; export and sample CLIs work."""
    shards = tmp_path / "fm"
    flowpre("shards", "--source", "fashion-mnist", "--out", str(shards), "--limit", "1200", "--shard-size", "300")
    run = tmp_path / "qs"
    root = Path(__file__).resolve().parents[1]
    r = train(run, str(shards / "train-*.tar"), "train.max_steps=24", "train.batch_size=16", "train.log_every=8",
              "train.checkpoint_every=12", "sample.every=12", "sample.num_images=10",
              config=root / "configs" / "quickstart.yaml")
    assert "img/s" in r.stdout and "weights:" in r.stdout
    m = metrics(run)
    assert [x["step"] for x in m] == [8, 16, 24]
    for key in ("step", "loss", "loss_fm", "loss_sc", "lr", "samples_per_s"):
        assert key in m[-1]
    assert m[-1]["loss_sc"] is None and m[-1]["loss"] == pytest.approx(m[-1]["loss_fm"], rel=1e-5)
    assert m[-1]["loss"] < m[0]["loss"]
    for step in (12, 24):
        for n in (1, 4, 32):
            png = run / "samples" / f"step{step:07d}_{n}steps.png"
            assert png.is_file()
    img = np.asarray(Image.open(run / "samples" / "step0000024_32steps.png"))
    assert img.std() > 5  # not a blank image
    assert (run / "config.yaml").is_file() and (run / "model.safetensors").is_file()
    out = tmp_path / "grid.png"
    flowpre("sample", "--weights", str(run / "model.safetensors"), "--steps", "1,4", "--out", str(out), "--num", "5")
    grid = Image.open(out)
    assert grid.size[0] > grid.size[1] > 28  # 2 rows of 5


VARIANTS = {"scfm_step": ["objective.name=scfm", "objective.step_conditioning=true"],
            "scfm_two_time": ["objective.name=scfm", "model.time_inputs=2"],
            "meanflow": ["objective.name=meanflow", "model.time_inputs=2"],
            "meanflow_fd": ["objective.name=meanflow_fd", "model.time_inputs=2", "objective.fd_network=ema_fast"]}


@pytest.mark.parametrize("objective", ["scfm", "shortcut", "scfm_step", "scfm_two_time", "meanflow", "meanflow_fd"])
def test_quickstart_config_with_each_objective(tmp_path, digits, objective):
    """`flowpre train --config configs/quickstart.yaml objective.name=...` runs and logs both losses
    (scfm_step: the step-size-conditioned SCFM variant; the two-time models sample with each step's end)."""
    root = Path(__file__).resolve().parents[1]
    run = tmp_path / objective
    name = VARIANTS.get(objective, [f"objective.name={objective}"])
    train(run, digits, *name, "model.name=DiT-2x48x2/4", "train.max_steps=8",
          "train.batch_size=16", "train.log_every=4", "train.checkpoint_every=8", "sample.every=0",
          "sample.steps=[1,2,4,32]", "sample.num_images=4", "sample.shift=3.0", "data.num_workers=0",
          config=root / "configs" / "quickstart.yaml")
    m = metrics(run)
    assert all(r["loss_fm"] is not None and r["loss_sc"] is not None for r in m)
    if objective == "shortcut":
        assert any(r.get(f"loss_sc_l{level}") is not None for r in m for level in range(7))
    elif objective.startswith("meanflow"):  # adaptive weighting by default: the plain MSE is logged beside
        assert all(0 < r["sc_jump_mean"] < 1 and r["loss_mse"] > 0 and r["adaptive_weight_mean"] > 0 for r in m)
    else:
        assert all(r["sc_grid_mean"] >= 2 for r in m)
    for n in (1, 2, 4, 32):
        assert (run / "samples" / f"step0000008_{n}steps.png").is_file()
    if objective == "scfm_step":  # levels 0..log2(n_max): the export carries the step-size embedder
        assert weights(run / "model.safetensors")["d_embed.weight"].shape[0] == 5
    if "model.time_inputs=2" in name:  # the jump embedder was exported, and it learnt (it starts at zero)
        assert weights(run / "model.safetensors")["jump_embed.mlp.2.weight"].abs().sum() > 0
    # the sample command in this process (its argument handling has its own tests): one launch fewer each
    cli_main(["sample", "--weights", str(run / "model.safetensors"), "--steps", "1,4", "--out", str(tmp_path / "g.png")])
    assert (tmp_path / "g.png").stat().st_size > 1000


@pytest.mark.parametrize("objective,stage", [("meanflow", 2), ("meanflow_fd", 3)])
def test_meanflow_on_two_ranks(tmp_path, digits, objective, stage):
    """The JVP target under ZeRO-2, the finite-difference one under ZeRO-3 (where no JVP can run)."""
    run = tmp_path / objective
    launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(29640 + stage)], run, digits, f"objective.name={objective}", "model.time_inputs=2",
           f"deepspeed.zero_stage={stage}", "train.max_steps=3")
    m = metrics(run)
    assert len(m) == 3 and all(r["loss_sc"] is not None and torch.isfinite(torch.tensor(r["loss"])) for r in m)
    assert (run / "model.safetensors").is_file()


def test_fewshot_distillation_config(tmp_path, digits):
    """configs/distill_fewshot.yaml on 10 images, teacher and init from an exported run."""
    root = Path(__file__).resolve().parents[1]
    teacher_run = tmp_path / "teacher"
    train(teacher_run, digits, "train.max_steps=4")
    ten = tmp_path / "ten"
    write_shards("digits", ten, shard_size=10, limit=10)
    weights_path = teacher_run / "model.safetensors"
    run = tmp_path / "distill"
    train(run, str(ten / "train-*.tar"), f"objective.teacher={weights_path}", f"model.init={weights_path}",
          "train.max_steps=6", "train.batch_size=10", "train.log_every=3", "train.checkpoint_every=6",
          "sample.every=0", "sample.num_images=4", config=root / "configs" / "distill_fewshot.yaml")
    m = metrics(run)
    assert all(r["loss_fm"] is None and r["loss_sc"] is not None for r in m)
    teacher, student = weights(weights_path), weights(run / "model.safetensors")
    assert teacher.keys() == student.keys()  # the architecture came with model.init
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher)
