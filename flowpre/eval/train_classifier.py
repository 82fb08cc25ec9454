"""Train the Fashion-MNIST classifier behind FD and class accuracy.

    OMP_NUM_THREADS=2 python -m flowpre.eval.train_classifier --out flowpre/eval/weights/fashion_cnn.safetensors

Deterministic for a given seed and thread count (CPU). The test accuracy, seed,
epochs and training time go into the file's metadata, so a changed net is visible
in every evaluation that uses it.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from flowpre.eval.classifier import WEIGHTS, FashionCNN, batched, load_split


def evaluate_accuracy(net, x, y, batch_size=1000):
    net.eval()
    logits = batched(net, x, batch_size)
    return (logits.argmax(1) == y).float().mean().item()


def train(out=WEIGHTS, epochs=5, batch_size=128, lr=3e-3, weight_decay=1e-4, seed=0, log=print):
    torch.manual_seed(seed)
    x_train, y_train, _ = load_split("fashion-mnist", "train")
    x_test, y_test, _ = load_split("fashion-mnist", "test")
    net = FashionCNN()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = (len(x_train) + batch_size - 1) // batch_size
    # One-cycle: a warm start and a decay to ~0 gets most of the accuracy of a long run in a few epochs.
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    start = time.time()
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(x_train), generator=gen)
        total, count = 0.0, 0
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            xb = x_train[idx]
            # Horizontal flips keep every Fashion-MNIST class what it is and curb overfitting.
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = F.cross_entropy(net(xb), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, count = total + loss.item() * len(idx), count + len(idx)
        acc = evaluate_accuracy(net, x_test, y_test)
        log(f"epoch {epoch + 1}/{epochs}: train loss {total / count:.4f}, test accuracy {acc:.4f} "
            f"({time.time() - start:.0f} s)")
    elapsed = time.time() - start
    acc = evaluate_accuracy(net, x_test, y_test)
    meta = {"config": json.dumps(net.config), "dataset": "fashion-mnist",
            "test_accuracy": f"{acc:.4f}", "epochs": str(epochs), "seed": str(seed),
            "train_seconds": f"{elapsed:.0f}", "torch_threads": str(torch.get_num_threads())}
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(out), metadata=meta)
    log(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB): test accuracy {acc:.4f}, {elapsed:.0f} s "
        f"on {torch.get_num_threads()} threads")
    return acc, elapsed


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(WEIGHTS))
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    train(a.out, a.epochs, a.batch_size, a.lr, seed=a.seed, log=lambda *m: print(*m, flush=True))


if __name__ == "__main__":
    main()
