"""DeepSpeed: the flowpre config turned into a DeepSpeed config, and the engine.

Parallelism and precision are applied here and nowhere else: ZeRO stage and batch
arithmetic from the config, AdamW as the client optimizer (fp32 state), bf16 through
autocast on CUDA with fp32 master weights (see `autocast`), and train.compile
(`compile_blocks`).
"""
import contextlib
import json
import os
from pathlib import Path

import torch

from flowpre.config import ConfigError

TEMPLATES = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"


def deepspeed_config(cfg, world_size):
    """Fill the ZeRO template of `deepspeed.zero_stage` with consistent batch keys."""
    path = Path(cfg.deepspeed.template) if cfg.deepspeed.template else TEMPLATES / f"zero{cfg.deepspeed.zero_stage}.json"
    if not path.is_file():
        raise ConfigError(f"deepspeed.template: DeepSpeed config {path} not found")
    ds = json.loads(path.read_text())
    fit_grad_accum(cfg, world_size)
    per_step = cfg.train.grad_accum * world_size
    ds["train_batch_size"] = cfg.train.batch_size
    ds["gradient_accumulation_steps"] = cfg.train.grad_accum
    ds["train_micro_batch_size_per_gpu"] = cfg.train.batch_size // per_step
    ds["gradient_clipping"] = cfg.train.grad_clip
    zero = ds.setdefault("zero_optimization", {})
    zero["stage"] = cfg.deepspeed.zero_stage
    if cfg.deepspeed.offload_optimizer != "none":
        if cfg.deepspeed.zero_stage == 0:
            raise ConfigError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")
        zero["offload_optimizer"] = {"device": cfg.deepspeed.offload_optimizer, "pin_memory": True}
        # ZeRO-Offload steps with DeepSpeed's CPU Adam: let DeepSpeed build it from here
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": cfg.train.lr, "betas": list(cfg.train.betas),
                                                       "weight_decay": cfg.train.weight_decay}}
    return ds


def fit_grad_accum(cfg, world_size):
    """Keep the global train.batch_size on this world size. When train.grad_accum x ranks
    does not divide it (a run requeued on another node count), raise train.grad_accum to
    the next value that does, which keeps the micro batch at or below the intended one."""
    batch, accum = cfg.train.batch_size, cfg.train.grad_accum
    if batch % (accum * world_size) == 0:
        return
    fits = [a for a in range(accum, batch // world_size + 1) if batch % (a * world_size) == 0]
    if not fits:
        raise ConfigError(f"train.batch_size={batch} cannot be split over {world_size} ranks: it must be "
                          f"divisible by train.grad_accum ({accum}) x world size, and no train.grad_accum >= "
                          f"{accum} makes it so; change train.batch_size or the number of ranks")
    cfg.train.grad_accum = fits[0]
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"flowpre: train.grad_accum {accum} -> {fits[0]} to keep train.batch_size={batch} on "
              f"{world_size} ranks (micro batch {batch // (fits[0] * world_size)})", flush=True)


def lr_lambda(warmup_steps):
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def build_engine(cfg, model, world_size):
    import deepspeed

    ds = deepspeed_config(cfg, world_size)
    model.activation_checkpointing = cfg.train.activation_checkpointing
    if cfg.train.compile:
        compile_blocks(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = None if "optimizer" in ds else torch.optim.AdamW(
        params, lr=cfg.train.lr, betas=tuple(cfg.train.betas), weight_decay=cfg.train.weight_decay)
    warmup = lr_lambda(cfg.train.warmup_steps)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, optimizer=optimizer, config=ds,
                                      lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, warmup))
    return engine, ds


def compile_blocks(model, **options):
    """torch.compile each DiT block in place (options go to torch.compile). In place
    (Module.compile) keeps parameter names, so checkpoints, exports and the EMAs see the
    same model. The blocks rather than the whole model: they are the repeated compute and
    share their compiled code (the first block apart, whose input has another layout),
    while the embedders, the objectives and the loop stay eager."""
    for block in model.blocks:
        block.compile(**options)


def precision(cfg, device):
    if cfg.train.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return cfg.train.precision


def autocast(mode, device):
    if mode == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
