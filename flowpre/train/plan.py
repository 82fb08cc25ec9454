"""`flowpre train ... --plan`: what a run will cost, without training.

Parameter count, FLOPs per training image, global batch arithmetic, and a per-rank
memory estimate for each ZeRO stage. The memory model (bytes per parameter P, R ranks):

    weights fp32 4P   (ZeRO-3: 4P/R)     bf16 autocast copies 2P (not under ZeRO-3)
    grads   fp32 4P   (ZeRO-2/3: 4P/R)
    AdamW   fp32 8P   (ZeRO-1/2/3: 8P/R)
    EMAs    fp32 8P   (fast + slow; ZeRO-3: 8P/R, partitioned like the student)
    activations per image and block: 34*N*h bytes in 16-bit with flash attention
    (Korthikanti et al. 2022 without the N^2 score term); with activation checkpointing
    only each block's fp32 input, 4*N*h, plus one block being recomputed.

It is an estimate: allocator fragmentation, communication buckets and the CUDA context
(~0.5-1 GiB) come on top.
"""
from flowpre.config import ConfigError
from flowpre.models.dit import build_dit

GIB = 2 ** 30


def memory_per_rank(params, stage, ranks, act_bytes_per_image, micro_batch, autocast=True):
    shard = lambda n, on: n / ranks if on else n  # noqa: E731
    parts = {
        "weights": shard(4 * params, stage >= 3),
        "bf16_copies": 2 * params if autocast and stage < 3 else 0,
        "grads": shard(4 * params, stage >= 2),
        "optimizer": shard(8 * params, stage >= 1),
        "emas": shard(8 * params, stage >= 3),
        "activations": act_bytes_per_image * micro_batch,
    }
    parts["total"] = sum(parts.values())
    return parts


def activation_bytes_per_image(model, checkpointing):
    n, h, depth = model.grid ** 2, model.hidden, model.depth
    per_block = 34 * n * h
    if checkpointing:
        return depth * 4 * n * h + per_block
    return depth * per_block


def make_plan(cfg, world_size):
    m = cfg.model
    if not (m.in_channels and m.image_size and m.num_classes):
        raise ConfigError("--plan needs model.in_channels, model.image_size and model.num_classes "
                          "(or shards with a dataset.json to read them from)")
    import torch
    text_dim = 0
    if m.text_encoder:  # the cross-attention's size comes from the encoder's config; no weights loaded
        import json

        from flowpre.text import resolve_text_encoder

        enc = json.loads((resolve_text_encoder(m.text_encoder) / "config.json").read_text())
        text_dim = enc.get("hidden_size") or enc.get("d_model") or enc.get("text_config", {}).get("hidden_size", 0)
    with torch.device("meta"):
        model = build_dit(m.name, m.in_channels, m.image_size, m.num_classes, text_dim=text_dim,
                          text_tokens=1 + m.text_max_length if text_dim else 0)
    params = sum(p.numel() for p in model.parameters())
    per_step = cfg.train.grad_accum * world_size
    if cfg.train.batch_size % per_step:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not divisible by train.grad_accum "
                          f"({cfg.train.grad_accum}) x world size ({world_size})")
    micro = cfg.train.batch_size // per_step
    act = activation_bytes_per_image(model, cfg.train.activation_checkpointing)
    return {
        "model": m.name, "params": params, "tokens": model.grid ** 2,
        "forward_flops_per_image": model.forward_flops(), "train_flops_per_image": 3 * model.forward_flops(),
        "world_size": world_size, "global_batch": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum,
        "micro_batch_per_rank": micro, "train_flops_per_step": 3 * model.forward_flops() * cfg.train.batch_size,
        "activation_bytes_per_image": act, "activation_checkpointing": cfg.train.activation_checkpointing,
        "memory_per_rank": {stage: memory_per_rank(params, stage, world_size, act, micro) for stage in range(4)},
    }


def print_plan(plan):
    p = plan
    print(f"model {p['model']}: {p['params'] / 1e6:.1f}M parameters, {p['tokens']} tokens per image")
    print(f"FLOPs per image: forward {p['forward_flops_per_image'] / 1e9:.1f} G, "
          f"training (3x) {p['train_flops_per_image'] / 1e12:.3f} T")
    print(f"batch: global {p['global_batch']} = micro {p['micro_batch_per_rank']} x grad_accum {p['grad_accum']} "
          f"x {p['world_size']} ranks; {p['train_flops_per_step'] / 1e15:.2f} PFLOP per optimizer step")
    print(f"activations: {p['activation_bytes_per_image'] / 2**20:.1f} MiB per image"
          + (" (activation checkpointing)" if p["activation_checkpointing"] else ""))
    keys = ["weights", "bf16_copies", "grads", "optimizer", "emas", "activations", "total"]
    print("memory per rank, GiB: " + " ".join(f"{k:>11s}" for k in keys))
    for stage, parts in p["memory_per_rank"].items():
        print(f"  ZeRO-{stage}              " + " ".join(f"{parts[k] / GIB:11.2f}" for k in keys))
