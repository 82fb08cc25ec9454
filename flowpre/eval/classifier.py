"""A small Fashion-MNIST classifier: class accuracy of samples and the feature space of FD.

FID's InceptionV3 sees 28x28 grayscale clothes upscaled to 299x299 RGB, far from its
ImageNet training data, and costs about half a second per image on a CPU. This net
is trained on the data itself, runs thousands of images per second on a CPU, and
its penultimate layer (128-d) gives a Frechet distance ("FD") that is cheap enough
to track every step count of every model. The weights ship in the repository
(`weights/fashion_cnn.safetensors`, written by `python -m flowpre.eval.train_classifier`).

Inputs are (B, 1, 28, 28) in [-1, 1], exactly what flowpre's data pipeline and
sampler produce.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHTS = Path(__file__).parent / "weights" / "fashion_cnn.safetensors"
FEATURE_DIM = 128


class FashionCNN(nn.Module):
    """Three conv blocks (28 -> 14 -> 7 -> 3) and a 128-d hidden layer; ~0.4 MB of fp32.

    BatchNorm makes a few epochs enough; the third pool floors 7 to 3 so the
    flattened map is 576 wide and the hidden layer stays small (a 7x7 map into
    128 units alone would be 1.6 MB).
    """

    def __init__(self, num_classes=10, channels=(16, 32, 64), hidden=FEATURE_DIM, dropout=0.3):
        super().__init__()
        layers, c_in = [], 1
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            c_in = c
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in * 3 * 3, hidden)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_classes)
        self.num_classes = num_classes
        self.config = {"num_classes": num_classes, "channels": list(channels), "hidden": hidden, "dropout": dropout}

    def features(self, x):
        """(B, 1, 28, 28) in [-1, 1] -> (B, 128), the penultimate activations (post-ReLU,
        like Inception's pool features)."""
        if x.shape[1:] != (1, 28, 28):
            raise ValueError(f"FashionCNN expects (B, 1, 28, 28) images, got {tuple(x.shape)}")
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x):
        return self.head(self.drop(self.features(x)))


def read_classifier_file(path, trainer):
    """(state dict, metadata dict) of a shipped classifier; a missing file names the module
    (`trainer`, e.g. flowpre.eval.train_classifier) that writes it."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier weights {path} not found; train them with "
                                f"python -m {trainer} --out {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    return load_file(str(path)), meta


def load_classifier(path=WEIGHTS, device="cpu"):
    """(FashionCNN in eval mode, metadata dict) from a safetensors file."""
    state, meta = read_classifier_file(path, "flowpre.eval.train_classifier")
    net = FashionCNN(**json.loads(meta.get("config", "{}")))
    net.load_state_dict(state)
    return net.to(device).eval(), meta


@torch.no_grad()
def batched(fn, images, batch_size=1000, device="cpu"):
    """Apply `fn` to (N, C, H, W) float images in batches; returns the concatenated CPU output."""
    out = [fn(images[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.empty(0)


def fit_one_cycle(net, x, y, *, epochs, batch_size, lr, weight_decay, gen, augment=None, label_smoothing=0.0,
                  after_epoch=None):
    """Train `net` on (x, y) with AdamW and a one-cycle schedule: a warm start and a decay to
    about 0 get most of a long run's accuracy in a few epochs. `gen` alone orders the batches
    and feeds `augment(batch, gen)`, so a seed fixes the run; `after_epoch(epoch, mean loss)`."""
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = (len(x) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            xb = x[idx] if augment is None else augment(x[idx], gen)
            loss = F.cross_entropy(net(xb), y[idx], label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if after_epoch is not None:
            after_epoch(epoch, total / len(order))


SPLIT_NAMES = ("train", "test", "heldout")


def load_split(spec: str, split: str | None = None, limit: int | None = None, image_size: int | None = None,
               with_meta: bool = False):
    """Images of a flowpre source split as ((N, C, H, W) float in [-1, 1], (N,) long labels, info),
    and with `with_meta` each sample's metadata (captions) as a fourth item.

    `spec` is a source spec (`fashion-mnist`, `digits`, `twemoji-subgroups`, `folder:PATH`)
    optionally followed by `:split`; without one the test split is used where the source has
    one, else train. `image_size` resizes sources that can be resized (twemoji, folders).
    The scaling (uint8 / 127.5 - 1) is the data pipeline's.
    """
    from flowpre.data.sources import open_source

    name, _, tail = spec.rpartition(":")
    if name and tail in SPLIT_NAMES:
        spec, split = name, split or tail
    src = open_source(spec, image_size)
    split = split or ("test" if "test" in src.info.splits else src.info.splits[0])
    if split not in src.info.splits:
        raise ValueError(f"source {spec!r} has no split {split!r} (it has: {', '.join(src.info.splits)})")
    images, labels, metas = [], [], []
    for i, (img, cls, meta) in enumerate(src.samples(split)):
        if limit is not None and i >= limit:
            break
        images.append(img)
        labels.append(cls)
        metas.append(meta)
    if not images:
        raise ValueError(f"source {spec!r} split {split!r} has no images")
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    out = x.contiguous(), torch.tensor(labels, dtype=torch.long), {**src.info.to_dict(), "split": split}
    return (*out, metas) if with_meta else out
