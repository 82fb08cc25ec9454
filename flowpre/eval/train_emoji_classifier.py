"""Train the emoji subgroup classifier behind prompt adherence (emoji_classifier.py).

    python -m flowpre.eval.train_emoji_classifier --out flowpre/eval/weights/emoji_subgroups_cnn.safetensors

Data: the real images of `twemoji-subgroups:train` at 32x32 (the emoji a text model trains
on); `twemoji-subgroups:heldout` is only measured, never used to choose anything (the
epochs, augmentation and sizes are fixed here, and were not tuned on it).

Augmentation, because the classifier will judge generated images, which are never exact
copies: random scale (0.85-1.15) and shift (up to 15% of the side) on a white background,
horizontal flips (a mirrored emoji keeps its subgroup), and Gaussian noise of a random
strength up to 0.1. Label smoothing 0.1.

Deterministic: one seeded generator for the order and the augmentation, and one CPU thread
(torch's reductions and oneDNN's convolutions then run in a fixed order), so the same seed
gives the same weights and metadata on a given machine (same_classifier compares two files);
another CPU family may choose other kernels and differ in the last bits. About 2 minutes on one core. The accuracies, seed, epochs, the
number and a hash of the training files go into the file's metadata, so every evaluation
that uses the file shows what it was.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from flowpre.eval.classifier import fit_one_cycle, load_split
from flowpre.eval.emoji_classifier import IMAGE_SIZE, WEIGHTS, EmojiCNN, group_of, predict

SOURCE = "twemoji-subgroups"


def augment(x, gen):
    """Random scale, shift and flip on white, then noise; x (B, 3, 32, 32) in [-1, 1]."""
    B = x.shape[0]
    scale = 0.85 + 0.3 * torch.rand(B, generator=gen)
    shift = (torch.rand(B, 2, generator=gen) * 2 - 1) * 0.3  # grid units: 2 = the whole side
    flip = torch.where(torch.rand(B, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = flip / scale, 1 / scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # grid_sample fills outside with 0: shifted by -1 first, that 0 is white
    x = F.grid_sample(x - 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 1
    noise = torch.rand(B, 1, 1, 1, generator=gen) * 0.1
    return (x + noise * torch.randn(x.shape, generator=gen)).clamp(-1, 1)


def accuracy(net, x, y, class_names):
    """(subgroup-class accuracy, group accuracy) of net on (x, y)."""
    pred = predict(net, x)
    groups = [group_of(c) for c in class_names]
    same_group = torch.tensor([groups[p] == groups[t] for p, t in zip(pred.tolist(), y.tolist())])
    return (pred == y).float().mean().item(), same_group.float().mean().item()


def train(out=WEIGHTS, epochs=40, batch_size=64, lr=3e-3, weight_decay=5e-4, seed=0, limit=None, log=print):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(out, epochs, batch_size, lr, weight_decay, seed, limit, log)
    finally:
        torch.set_num_threads(threads)


def _train(out, epochs, batch_size, lr, weight_decay, seed, limit, log):
    torch.manual_seed(seed)
    x_train, y_train, info, metas = load_split(f"{SOURCE}:train", image_size=IMAGE_SIZE, limit=limit, with_meta=True)
    x_held, y_held, _ = load_split(f"{SOURCE}:heldout", image_size=IMAGE_SIZE, limit=limit)
    class_names = info["class_names"]
    net = EmojiCNN(len(class_names))
    start = time.time()

    def report(epoch, loss):
        if (epoch + 1) % 10 == 0 or epoch + 1 == epochs:
            net.eval()
            log(f"epoch {epoch + 1}/{epochs}: train loss {loss:.3f}, held-out accuracy "
                f"{accuracy(net, x_held, y_held, class_names)[0]:.3f} ({time.time() - start:.0f} s)")

    fit_one_cycle(net, x_train, y_train, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                  gen=torch.Generator().manual_seed(seed), augment=augment, label_smoothing=0.1, after_epoch=report)
    elapsed = time.time() - start
    net.eval()
    train_acc, train_group = accuracy(net, x_train, y_train, class_names)
    held_acc, held_group = accuracy(net, x_held, y_held, class_names)
    files = hashlib.sha256("\n".join(sorted(m["file"] for m in metas)).encode()).hexdigest()
    meta = {"config": json.dumps(net.config), "dataset": SOURCE, "image_size": str(IMAGE_SIZE),
            "class_names": json.dumps(class_names), "train_accuracy": f"{train_acc:.4f}",
            "train_group_accuracy": f"{train_group:.4f}", "heldout_accuracy": f"{held_acc:.4f}",
            "heldout_group_accuracy": f"{held_group:.4f}", "train_images": str(len(x_train)),
            "heldout_images": str(len(x_held)), "train_files_sha256": files, "epochs": str(epochs),
            "batch_size": str(batch_size), "lr": str(lr), "seed": str(seed), "torch_threads": "1",
            "torch": torch.__version__}  # no wall time: the same training gives the same file
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(out), metadata=meta)
    log(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, {len(class_names)} classes): accuracy train "
        f"{train_acc:.3f}, held-out {held_acc:.3f} (group {held_group:.3f}), {elapsed:.0f} s on one thread")
    return meta


def same_classifier(a, b):
    """Whether two classifier files hold the same tensors and metadata. Not their bytes:
    safetensors writes the metadata in a different order in every process."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    def meta(path):
        with safe_open(str(path), framework="pt") as f:
            return f.metadata()

    ta, tb = load_file(str(a)), load_file(str(b))
    return meta(a) == meta(b) and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(WEIGHTS))
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="at most N images per split (tests)")
    a = p.parse_args(argv)
    train(a.out, a.epochs, a.batch_size, a.lr, seed=a.seed, limit=a.limit, log=lambda *m: print(*m, flush=True))


if __name__ == "__main__":
    main()
