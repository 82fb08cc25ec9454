"""Scale features: --plan numbers by hand, ZeRO-3 + EMA + activation checkpointing + grad
accumulation on 2 ranks, optimizer offload."""
import sys

import torch

from flowpre.config import load_config
from flowpre.data.shards import write_shards
from flowpre.train.plan import make_plan

from helpers import exported, flowpre, free_port, launch, metrics

GIB = 2 ** 30


def test_plan_dit_xl2_256px_8_ranks_by_hand():
    cfg = load_config(None, ["model.name=DiT-XL/2", "model.in_channels=4", "model.image_size=32",
                             "model.num_classes=1000", "train.batch_size=256", "train.grad_accum=2"])
    plan = make_plan(cfg, world_size=8)
    h, n, depth, p = 1152, 256, 28, 674_816_272  # 32x32 latents, patch 2 -> 16x16 tokens
    assert plan["params"] == p and plan["tokens"] == n
    # multiply-adds: per block qkv + proj + MLP(4x) + scores and values + adaLN (per image)
    per_block = n * h * 3 * h + n * h * h + 2 * n * h * 4 * h + 2 * n * n * h + h * 6 * h
    patch = n * (2 * 2 * 4) * h * 2  # patch embedding in, final linear out
    cond = 256 * h + h * h + h * 2 * h  # timestep MLP and the final layer's adaLN
    forward = 2 * (depth * per_block + patch + cond)
    assert plan["forward_flops_per_image"] == forward
    assert abs(forward / 237e9 - 1) < 0.005  # the DiT paper's 237 GFLOP (TARGETS.md: ~0.71 TFLOP per image)
    assert plan["micro_batch_per_rank"] == 16 and plan["train_flops_per_step"] == 3 * forward * 256
    act = depth * 34 * n * h
    mem = plan["memory_per_rank"]
    # bytes per parameter: fp32 weights, bf16 copies, fp32 grads, AdamW, two fp32 EMAs; 8 ranks shard
    # (ZeRO-3 partitions the EMAs too)
    for stage, expected in {0: 4 + 2 + 4 + 8 + 8, 1: 4 + 2 + 4 + 1 + 8, 2: 4 + 2 + 0.5 + 1 + 8,
                            3: 0.5 + 0 + 0.5 + 1 + 1}.items():
        assert abs(mem[stage]["total"] - (expected * p + act * 16)) < 1, stage


def test_plan_cli_prints_every_stage():
    r = flowpre("train", "--config", "configs/quickstart.yaml", "--plan", "--world-size", "8",
                "model.name=DiT-XL/2", "model.in_channels=4", "model.image_size=32", "model.num_classes=1000",
                "train.batch_size=256")
    out = r.stdout
    assert "674.8M parameters" in out and "0.712 T" in out and "micro 32 x grad_accum 1 x 8 ranks" in out
    assert all(f"ZeRO-{s}" in out for s in range(4))


def test_zero3_ema_activation_checkpointing_grad_accum(tmp_path):
    """ZeRO-3 + activation checkpointing + grad accumulation on 2 ranks trains the same
    losses and exports the same weights (student and EMA) as plain ZeRO-0."""
    digits = tmp_path / "digits"
    write_shards("digits", digits, shard_size=100, limit=400)
    out = {}
    for name, extra in {"plain": ["deepspeed.zero_stage=0"],
                        "z3": ["deepspeed.zero_stage=3", "train.activation_checkpointing=true"]}.items():
        run = tmp_path / name
        launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port())], run, str(digits / "train-*.tar"), *extra, "train.grad_accum=2",
               "train.max_steps=4", "train.checkpoint_every=4")
        out[name] = [m["loss"] for m in metrics(run)]
        for which in ("slow", "none"):
            out[name, which] = exported(run, tmp_path / f"{name}_{which}.safetensors", which)
    a, b = torch.tensor(out["plain"]), torch.tensor(out["z3"])
    assert len(a) == 4 and ((a - b).abs() / a.abs()).max() < 1e-5
    for which in ("slow", "none"):
        for k, v in out["plain", which].items():
            torch.testing.assert_close(out["z3", which][k], v, atol=1e-5, rtol=1e-4)


def test_optimizer_offload_trains(tmp_path):
    digits = tmp_path / "digits"
    write_shards("digits", digits, shard_size=100, limit=200)
    run = tmp_path / "offload"
    from helpers import train
    train(run, str(digits / "train-*.tar"), "deepspeed.zero_stage=2", "deepspeed.offload_optimizer=cpu",
          "train.max_steps=3")
    m = metrics(run)
    assert len(m) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in m)
    r = flowpre("train", "--config", str(run) + ".yaml", f"run.dir={tmp_path / 'bad'}", "deepspeed.zero_stage=0",
                "deepspeed.offload_optimizer=cpu", f"data.shards={digits / 'train-*.tar'}", check=False)
    assert r.returncode != 0 and "offload_optimizer" in r.stderr
