"""Train the Fashion-MNIST classifier behind FD and class accuracy.

    OMP_NUM_THREADS=2 python -m flowpre.eval.train_classifier --out flowpre/eval/weights/fashion_cnn.safetensors

Deterministic for a given seed and thread count on a given machine and torch version
(the shipped file, 91.65% on test, does not retrain bit-for-bit here: 91.86% on 2026-11-29;
its loop, `fit_one_cycle` in classifier.py, is shared with the emoji classifier). The test accuracy, seed,
epochs and training time go into the file's metadata, so a changed net is visible
in every evaluation that uses it.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from flowpre.eval.classifier import WEIGHTS, FashionCNN, batched, fit_one_cycle, load_split


def hflip(x, gen):
    """Horizontal flips of half the batch: every Fashion-MNIST class stays what it is, and
    the net overfits less."""
    flip = torch.rand(len(x), generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def evaluate_accuracy(net, x, y, batch_size=1000):
    net.eval()
    logits = batched(net, x, batch_size)
    return (logits.argmax(1) == y).float().mean().item()


def train(out=WEIGHTS, epochs=5, batch_size=128, lr=3e-3, weight_decay=1e-4, seed=0, log=print):
    torch.manual_seed(seed)
    x_train, y_train, _ = load_split("fashion-mnist", "train")
    x_test, y_test, _ = load_split("fashion-mnist", "test")
    net = FashionCNN()
    start = time.time()

    def report(epoch, loss):
        log(f"epoch {epoch + 1}/{epochs}: train loss {loss:.4f}, test accuracy "
            f"{evaluate_accuracy(net, x_test, y_test):.4f} ({time.time() - start:.0f} s)")

    fit_one_cycle(net, x_train, y_train, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                  gen=torch.Generator().manual_seed(seed), augment=hflip, after_epoch=report)
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
