"""The training loop: `flowpre train --config FILE [key=value ...]`.

One process, or one rank per process under torchrun / the deepspeed launcher.
The loop knows nothing about any objective: it asks the objective for targets,
regresses the student onto them with the fused flow loss, steps the DeepSpeed engine,
updates the fp32 EMAs, and logs / samples / checkpoints on schedule.
"""
import json
import os
import tarfile
import time
from pathlib import Path

import torch

from flowpre import kernels as K
from flowpre.config import ConfigError, save_config
from flowpre.data.pipeline import ShardLoader, read_dataset_info, resolve_shards
from flowpre.data.streams import run_streams
from flowpre.weights import load_model, save_weights
from flowpre.images import class_columns, save_labeled_grid, steps_label
from flowpre.models.dit import DiT, build_dit
from flowpre.objectives import Nets, build
from flowpre.sampling import euler_sample, seeded_noise
from flowpre.text import TextEncoder
from flowpre.vae import decode, vae_for_dataset

from .checkpoint import (check_same_model, checkpoint_weights, checkpoints_root, complete_checkpoints, load_checkpoint,
                         resolve_resume, save_checkpoint)
from .distributed import barrier, gather_objects, init_distributed
from . import reshard, run_folder
from .ema import DualEma
from .engine import autocast, build_engine, precision
from .metrics import Meter, peak_flops
from .nonfinite import StepGuard, finite_or_none
from .preemption import Preemption
from .report import Reporter

SAMPLE_LOG_ENV = "FLOWPRE_SAMPLE_LOG"  # a folder: each rank appends "step epoch:shard:key" per sample


def fill_model_shape(cfg, dataset=None):
    """Shape keys left at 0 in the config (channels, size, classes) read from the shards."""
    m = cfg.model
    if m.in_channels and m.image_size and m.num_classes:
        return
    dataset = dataset or read_dataset_info(resolve_shards(cfg.data.shards))
    m.in_channels = m.in_channels or dataset["channels"]
    m.image_size = m.image_size or dataset["height"]
    m.num_classes = m.num_classes or dataset["num_classes"]


def build_model(cfg, dataset, step_levels=0, text=None):
    """The student; shape keys left at 0 in the config are filled from the dataset.
    With a text encoder the DiT takes its (B, 1 + L, dim) output instead of class ids."""
    fill_model_shape(cfg, dataset)
    m = cfg.model
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    if m.init:  # the architecture comes with the weights; model.name is not consulted
        model, _ = load_model(m.init, kernels=m.kernels, source="model.init")
        if model.step_levels != step_levels:
            raise ConfigError(f"model.init: {m.init} has step_levels={model.step_levels}, the objective needs {step_levels}")
        # the file's time embedders were trained at their frequencies: another scale is not a continuation
        scales = {"sigma_scale": model.sigma_scale, **({"jump_scale": model.jump_scale} if model.time_inputs == 2 else {})}
        differ = {k: v for k, v in scales.items() if getattr(m, k) != v}
        if differ:
            raise ConfigError(f"model.init: {m.init} embeds time at " + ", ".join(f"{k}={v:g}" for k, v in differ.items())
                              + ", but the config asks for " + ", ".join(f"model.{k}={getattr(m, k):g}" for k in differ)
                              + " (0 = auto picks 1 for meanflow(_fd), 1000 otherwise); set "
                              + " ".join(f"model.{k}={v:g}" for k, v in differ.items()) + " to continue from it")
        if model.time_inputs != m.time_inputs:
            model = with_time_inputs(model, m.time_inputs, m.init, m.jump_scale)
        return model.train()
    return build_dit(m.name, m.in_channels, m.image_size, m.num_classes, kernels=m.kernels, step_levels=step_levels,
                     text_dim=text.dim if text else 0, text_tokens=text.tokens if text else 0,
                     time_inputs=m.time_inputs, jump_scale=m.jump_scale, sigma_scale=m.sigma_scale)


def with_time_inputs(model, time_inputs, source, jump_scale=1000.0):
    """A one-time model grown into a two-time one (its new jump embedder outputs zero, so the
    function is unchanged): start MeanFlow or two-time SCFM from a flow-matching model."""
    if (model.time_inputs, time_inputs) != (1, 2):
        raise ConfigError(f"model.init: {source} has time_inputs={model.time_inputs}; model.time_inputs={time_inputs} "
                         "cannot be made from it (only 1 -> 2)")
    grown = DiT(**{**model.config(), "time_inputs": 2, "jump_scale": jump_scale}, kernels=model.kernels)
    missing, unexpected = grown.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("jump_embed.") for k in missing), (missing, unexpected)
    return grown


def build_text_encoder(cfg, dataset, device):
    """The frozen caption encoder when model.text_encoder is set (None otherwise)."""
    if not cfg.model.text_encoder:
        if cfg.sample.prompts:
            raise ConfigError("sample.prompts is set but model.text_encoder is not: a class-conditional model "
                              "samples classes, not prompts")
        return None
    if not dataset.get("has_captions"):
        raise ConfigError(f"model.text_encoder is set but the shards {cfg.data.shards!r} carry no captions "
                          f"(their dataset.json lacks has_captions; write them with a captioned source)")
    return TextEncoder(cfg.model.text_encoder, cfg.model.text_max_length, device, cache_size=cfg.model.text_cache)


def sample_prompts(cfg, shards, max_columns=8):
    """The sample grid's prompts, one per column: sample.prompts, or the first distinct
    training captions."""
    prompts = list(cfg.sample.prompts)
    if prompts:
        return prompts
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    try:  # a broken json is the loader's to skip and count; here it is just not a prompt
                        caption = json.loads(tar.extractfile(member).read()).get("caption")
                    except (ValueError, AttributeError):
                        caption = None
                    if isinstance(caption, str) and caption not in prompts:
                        prompts.append(caption)
                if len(prompts) >= max_columns:
                    return prompts
    return prompts


@torch.no_grad()
def sample_grids(model, cfg, run_dir, step, device, columns, vae=None, text=None, write=True):
    """One PNG per step count in `sample.steps`, named and titled with it: a header row
    names the columns (classes, or prompts for text models) and sample.num_images images
    fill rows of them, each row another noise draw. Latents are decoded through the shards'
    VAE (outside autocast: VAEs misbehave in 16-bit). `columns` is (class ids or prompts,
    labels). `write=False`: only the forwards (the other ranks of a sharded EMA, whose
    forwards are collective)."""
    s = cfg.sample
    values, labels = columns
    ncol, C, H = len(values), model.in_channels, model.image_size
    rows = max(1, s.num_images // ncol)
    cond = text(list(values) * rows) if text else torch.tensor(list(values) * rows, device=device)
    null = text.null if text else model.null_class
    noise = seeded_noise((rows * ncol, C, H, H), s.seed, device)
    paths = []
    for steps in s.steps:
        with autocast(precision(cfg, device), device):
            x = euler_sample(model, noise, cond, steps, s.shift, s.cfg_scale, null,
                             step_inputs=model.sampling_inputs, time_inputs=model.time_inputs)
        path = Path(run_dir) / "samples" / f"step{step:07d}_{steps}steps.png"
        paths.append(path)
        if not write:
            continue
        x = decode(vae, x.float()) if vae is not None else x
        path.parent.mkdir(parents=True, exist_ok=True)
        title = (f"training step {step}: {steps_label(steps)}, slow EMA, cfg {s.cfg_scale:g}, shift {s.shift:g}, "
                 f"seed {s.seed}")
        save_labeled_grid(path, list(x.split(ncol)), labels, title=title)
    return paths


def train(cfg):
    shards = resolve_shards(cfg.data.shards)  # fails early, naming the pattern
    dist = init_distributed()
    lock = run_folder.claim(cfg, dist)  # before anything is written into run.dir
    try:
        return _train(cfg, shards, dist, lock)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg, shards, dist, lock):
    device, run_dir = dist.device, Path(cfg.run.dir)
    dataset = read_dataset_info(shards)
    objective = build(cfg.objective, cfg.model.time_inputs, cfg.train.max_steps)
    text = build_text_encoder(cfg, dataset, device)
    model = build_model(cfg, dataset, objective.step_levels, text).to(device)
    zero3 = cfg.deepspeed.zero_stage == 3
    # under ZeRO-3 each rank keeps only its partition of the EMAs, as of the student
    ema = DualEma(model, cfg.ema.fast_decay, cfg.ema.slow_decay, cfg.ema.restart_every, sharded=zero3)
    engine, ds = build_engine(cfg, model, dist.world_size)
    micro = ds["train_micro_batch_size_per_gpu"]
    mode = precision(cfg, device)
    generator = torch.Generator(device).manual_seed(cfg.train.seed + dist.rank)

    step, batches, wandb_id, consecutive_skips = 0, 0, None, 0
    ckpt = resolve_resume(cfg.train.resume, run_dir, dist)
    # the stream count fixes the sample order: from the checkpoint, and refused here if this layout cannot serve it
    data_state = json.loads((Path(ckpt) / "meta.json").read_text()).get("data") if ckpt is not None else None
    try:
        streams = run_streams(cfg.data.streams, data_state, ckpt, len(shards), dist.world_size, cfg.data.num_workers)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if ckpt is not None:
        check_same_model(ckpt, model.config(), cfg.model.name)
        position = reshard.data_position(ckpt, cfg.train.batch_size, dist.world_size, micro)
        meta, shared, rank_state = load_checkpoint(engine, ckpt, dist)
        ema.load_state_dict(shared["ema"])
        step, wandb_id = meta["step"], shared.get("wandb_id")
        consecutive_skips = shared.get("consecutive_skips", 0)
        if position is None:  # the same world size and micro batch: exact
            batches = rank_state["batches"]
            generator.set_state(rank_state["generator"])
            torch.set_rng_state(rank_state["torch_cpu"])
            if device.type == "cuda":
                torch.cuda.set_rng_state(rank_state["torch_cuda"], device)
        else:  # the global sample count carries the data position; the generators are reseeded
            batches = position
            generator.manual_seed(reshard.reseed(cfg.train.seed, dist.rank, step))
            torch.manual_seed(reshard.reseed(cfg.train.seed + 1, dist.rank, step))
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        print(f"flowpre: {cfg.model.name} {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
              f"{dist.world_size} rank(s), ZeRO {cfg.deepspeed.zero_stage}, {mode}, objective {cfg.objective.name}"
              + (f", resumed from {ckpt} at step {step}" if ckpt else ""), flush=True)
    # resume=auto without a checkpoint is this run started over: what it logged will be redone
    resumed = ckpt is not None or cfg.train.resume == "auto"
    report = Reporter(cfg, run_dir, dist.is_main, step, resumed=resumed, wandb_id=wandb_id)

    loader = ShardLoader(shards, batch_size=micro, rank=dist.rank, world_size=dist.world_size,
                         num_workers=cfg.data.num_workers, seed=cfg.train.seed, hflip=cfg.data.hflip,
                         shuffle_buffer=cfg.data.shuffle_buffer, start_batch=batches, streams=streams,
                         known=(data_state or {}).get("known"))
    batch_iter = iter(loader)
    # debugging and tests: which samples each rank trained on at which step
    sample_log = os.environ.get(SAMPLE_LOG_ENV)
    if sample_log:
        Path(sample_log).mkdir(parents=True, exist_ok=True)
        sample_log = open(Path(sample_log) / f"rank{dist.rank:05d}-{os.getpid()}.txt", "a")
    # distillation mode: a frozen exported model supplies part of the targets
    teacher = load_model(cfg.objective.teacher, device, kernels=cfg.model.kernels,
                         source="objective.teacher")[0].requires_grad_(False) \
        if cfg.objective.teacher else None
    nets = Nets(student=engine, ema_fast=ema.fast, ema_slow=ema.slow, teacher=teacher,
                null_cond=text.null if text else model.null_class)
    vae = vae_for_dataset(dataset, device) if dist.is_main else None  # latent shards: decode samples
    # a sharded EMA's forward is collective: then every rank samples, and rank 0 writes
    samplers = dist.is_main or ema.sharded
    if text and samplers:
        prompts = sample_prompts(cfg, shards)
        columns = (prompts, prompts)
        if not prompts:
            raise ConfigError(f"no captions found in {cfg.data.shards!r} for the sample grid: set sample.prompts")
    else:
        columns = class_columns(model.num_classes, dataset.get("class_names"))
    flops_per_image, peak = 3 * model.forward_flops(), peak_flops(device)
    meter, start_step, t_start = Meter(device, objective.groups), step, time.perf_counter()
    guard = StepGuard(engine, dist.rank, cfg.train.max_skipped_steps, consecutive_skips)
    preemption, stop = Preemption(dist.rank), False

    def save(step):
        known = {k: v for rank_known in gather_objects(loader.known) for k, v in rank_known.items()}
        meta = {"step": step, "world_size": dist.world_size, "zero_stage": cfg.deepspeed.zero_stage,
                "data": {"streams": loader.streams, "known": known},
                "micro_batch": micro, "samples": batches * micro * dist.world_size,
                "global_batch": cfg.train.batch_size, "model": model.config(), "model_name": cfg.model.name,
                "dataset": dataset, "objective": cfg.objective.name,
                "target_guidance": cfg.objective.guidance_scale,  # sampled at cfg 1 when != 1 (weights.py)
                "text_encoder": text.describe() if text else None,
                # the hardware, for the model card (export --format folder)
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
        rank_state = {"batches": batches, "generator": generator.get_state(), "torch_cpu": torch.get_rng_state(),
                      "torch_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        shared = {"ema": ema.state_dict(), "step": step, "wandb_id": report.wandb.id,
                  "consecutive_skips": guard.consecutive}
        run_folder.check_still_held(lock, run_dir)
        return save_checkpoint(engine, run_dir, step, shared, rank_state, dist, meta, keep=cfg.train.keep_checkpoints)

    while step < cfg.train.max_steps:
        step += 1
        for micro_step in range(ds["gradient_accumulation_steps"]):
            batch = next(batch_iter)
            batches += 1
            if sample_log:
                sample_log.write("".join(f"{step} {k}\n" for k in batch["keys"]))
            x = batch["x"].to(device, non_blocking=True)
            cond = text(batch["captions"]) if text else batch["cond"].to(device, non_blocking=True)
            with autocast(mode, device):
                t = objective({"x": x, "cond": cond}, nets, generator, step=step)  # a pure function of step
                pred = engine(t.x, t.sigma, t.cond, **t.extra_inputs)
            # pred as autocast left it (bf16 on CUDA): the loss reads it in place and accumulates in fp32
            loss, group_losses = K.flow_loss(pred, t.target, t.loss_weight(pred), t.group,
                                             len(objective.groups), backend=cfg.model.kernels)
            loss = guard.inject(loss, step)
            engine.backward(loss)
            guard.observe(loss)
            if micro_step == ds["gradient_accumulation_steps"] - 1:  # all ranks agree on skipping and stopping
                stop = guard.agree(preemption.requested)
            engine.step()
            meter.add(loss, group_losses, t.group, x.shape[0])
        if not guard.finish(step, lambda: (complete_checkpoints(run_dir) or [(0, None)])[-1][1]):
            ema.update(engine.module, step, zero3)
        report.advance()

        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            record = {"step": step, **meter.read(dist.world_size), "lr": engine.get_lr()[0],
                      "grad_norm": engine.get_global_grad_norm(), "corrupt_samples": loader.corrupt_count,
                      "skipped_steps": guard.total}
            record["mfu"] = record["samples_per_s"] / dist.world_size * flops_per_image / peak if peak else None
            record["grad_norm"] = finite_or_none(record["grad_norm"])
            record.update({k: float(v) for k, v in t.info.items()})  # the objective's own scalars
            # no-grad forwards of EMAs / teacher, in units of the student's forward + backward
            record["objective_overhead"] = record.pop("extra_forward_images", 0.0) / (3 * micro)
            record["ema_bytes_per_rank"] = ema.local_bytes()
            record.update({f"ema_dist_{k}": v for k, v in ema.distance_to(engine.module, zero3).items()})
            report.log(record)
            meter.reset()
        if cfg.sample.every and step % cfg.sample.every == 0 and step < cfg.train.max_steps and samplers:
            grids = sample_grids(ema.slow, cfg, run_dir, step, device, columns, vae, text, write=dist.is_main)
            if dist.is_main:
                report.images(step, grids)
        if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
            save(step)
        if stop:
            break

    elapsed = time.perf_counter() - t_start
    preemption.restore()  # from here on a signal ends the process as usual
    saved = cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0
    preempted = stop and step < cfg.train.max_steps  # a signal during the last step: just finish
    if saved:
        last = checkpoints_root(run_dir) / f"step{step:09d}"
    else:
        last = save(step) if cfg.train.final_checkpoint or preempted else None
    if preempted and dist.is_main:
        print(f"\npreempted at step {step} of {cfg.train.max_steps} (signal received"
              f"{': ' + preemption.signal if preemption.signal else ' by another rank'}); checkpoint: {last}\n"
              f"  continue with the same command and train.resume=auto", flush=True)
    if not preempted and last is None:  # train.final_checkpoint=false
        if dist.is_main:
            trained = (step - start_step) * cfg.train.batch_size
            print(f"\ndone: {step} steps, {trained / max(elapsed, 1e-9):.1f} img/s over this session; no final "
                  f"checkpoint (train.final_checkpoint=false)\n  metrics: {run_dir / 'metrics.jsonl'}", flush=True)
    elif not preempted:
        weights = run_dir / "model.safetensors"
        if samplers:
            grids = sample_grids(ema.slow, cfg, run_dir, step, device, columns, vae, text, write=dist.is_main)
        if dist.is_main:
            report.images(step, grids)
            state, saved_meta, which = checkpoint_weights(last, "slow")  # the checkpoint just written
            save_weights(state, weights, saved_meta, which)
            trained = (step - start_step) * cfg.train.batch_size
            print(f"\ndone: {step} steps, {trained / max(elapsed, 1e-9):.1f} img/s over this session "
                  f"({trained} images in {elapsed:.0f} s)\n"
                  f"  samples: {grids[-1].parent} (last: {', '.join(p.name for p in grids)})\n"
                  f"  metrics: {run_dir / 'metrics.jsonl'}\n  weights: {weights} (slow EMA)", flush=True)
    report.close()
    if sample_log:
        sample_log.close()
    barrier()
    return run_dir
