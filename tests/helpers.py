"""Running `flowpre` in subprocesses, as users and launchers do."""
import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

# tests launch ranks on free ports: fixed ones collide when two suites (or a suite and an
# experiment's launch) share a machine, EADDRINUSE in a random test
from flowpre.train.distributed import free_port  # noqa: F401 - re-exported for the tests

TINY = ["model.name=DiT-2x32x2/4", "train.batch_size=8", "train.lr=0.001", "train.log_every=1",
        "data.num_workers=0", "data.shuffle_buffer=64", "sample.num_images=4", "sample.steps=[1,2]",
        "sample.every=0", "train.checkpoint_every=0", "ema.fast_decay=0.9", "ema.slow_decay=0.95"]


def env(**extra):
    e = dict(os.environ)
    # the venv's tools first: DeepSpeed JIT-builds an extension with whichever ninja is on
    # PATH, and two ninja versions alternating rebuild it (minutes) in every subprocess
    e["PATH"] = os.path.dirname(sys.executable) + os.pathsep + e.get("PATH", "")
    e.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1",
             TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR",
                                                 os.path.expanduser("~/.cache/flowpre/torch_extensions")))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TRITON_INTERPRET"):
        e.pop(k, None)
    e.update(extra)
    return e


def flowpre(*args, timeout=600, extra_env=None, check=True):
    r = subprocess.run([sys.executable, "-m", "flowpre.cli", *args], capture_output=True, text=True,
                       timeout=timeout, env=env(**(extra_env or {})))
    if check and r.returncode != 0:
        raise AssertionError(f"flowpre {' '.join(args)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r


def train(run_dir, shards, *overrides, config=None, **kw):
    args = ["train"] + (["--config", str(config)] if config else ["--config", str(write_empty_config(run_dir))])
    return flowpre(*args, f"run.dir={run_dir}", f"data.shards={shards}", *(TINY if config is None else []),
                   *overrides, **kw)


def write_empty_config(run_dir):
    path = Path(str(run_dir) + ".yaml")
    path.write_text("objective:\n  name: fm\n")
    return path


def launch(launcher_args, run_dir, shards, *overrides, timeout=600):
    """Two ranks under torchrun / the deepspeed launcher."""
    module_flag = "--module" if "deepspeed.launcher.runner" in launcher_args else "-m"
    cmd = launcher_args + [module_flag, "flowpre.cli", "train", "--config", str(write_empty_config(run_dir)),
                           f"run.dir={run_dir}", f"data.shards={shards}", *TINY, *overrides]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env())
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def weights(path):
    return load_file(str(path))


def exported(run_dir, out, ema="slow"):
    """The weights `flowpre export --run RUN_DIR --out OUT --ema EMA` writes, exported in this
    process by the function the command calls (checkpoint pick and verification included): a
    test comparing runs' weights needs no process per export (the command has its own tests)."""
    from flowpre.export import export

    path, _ = export(run_dir=run_dir, out=out, ema=ema)
    return weights(path)


def random_dit(seed=0, **kw):
    """A small DiT whose zero-initialised layers (adaLN-Zero, output) are drawn at random, so
    that its output depends on every input (a fresh DiT outputs v = 0)."""
    import torch

    from flowpre.models.dit import DiT

    torch.manual_seed(seed)
    model = DiT(**{"in_channels": 1, "image_size": 8, "patch": 4, "hidden": 32, "depth": 2, "heads": 2,
                   "num_classes": 3, "kernels": "torch", **kw})
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return model.eval()


def save_tiny_bert(path):
    """A 2-layer random BERT with a word-level tokenizer, saved as a local transformers folder."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + "a dog face red heart grinning woman scientist".split()
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(str(path))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=32)).save_pretrained(str(path))
    return path


def save_tiny_vae(path, latent_channels=4, size=16):
    """A random 2-block diffusers AutoencoderKL (downsampling 2), saved as a local folder."""
    import diffusers
    import torch

    torch.manual_seed(0)
    diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=size, scaling_factor=0.5,
        shift_factor=0.1).save_pretrained(str(path))
    return path
