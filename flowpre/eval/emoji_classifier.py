"""The emoji subgroup classifier behind prompt adherence (adherence.py).

A small CNN that looks at a 32x32 RGB emoji and says which class of the
`twemoji-subgroups` source it belongs to (a Unicode subgroup such as animal-mammal, or
"<group>: other" for the small subgroups of a group; flowpre/data/twemoji_subgroups.py).
It is trained on the real images of the source's `train` split only (the emoji a text
model trains on), so its accuracy on the real `heldout` images is an honest number: the
ceiling of what a generated held-out emoji can score. The weights ship in the repository
(`weights/emoji_subgroups_cnn.safetensors`, ~0.6 MB, written by
`python -m flowpre.eval.train_emoji_classifier`), with the class names, accuracies and
training settings in their metadata.

Inputs are (B, 3, H, W) in [-1, 1], what the sampler produces; images of another size are
resized to 32x32 (area averaging down, bilinear up) first.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from flowpre.eval.classifier import batched, read_classifier_file

WEIGHTS = Path(__file__).parent / "weights" / "emoji_subgroups_cnn.safetensors"
IMAGE_SIZE = 32


class EmojiCNN(nn.Module):
    """Three conv blocks (32 -> 16 -> 8 -> 4), pooled to 2x2, a 128-d hidden layer and the class head.

    The 2x2 pool keeps where things are (a flag fills the frame, a heart sits in the middle)
    at a quarter of the weights a 4x4 map would need."""

    def __init__(self, num_classes, channels=(32, 64, 128), hidden=128, dropout=0.3):
        super().__init__()
        layers, c_in = [], 3
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            c_in = c
        self.conv = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2))
        self.fc = nn.Linear(c_in * 4, hidden)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_classes)
        self.num_classes = num_classes
        self.config = {"num_classes": num_classes, "channels": list(channels), "hidden": hidden, "dropout": dropout}

    def forward(self, x):
        x = to_classifier_size(x)
        return self.head(self.drop(F.relu(self.fc(self.conv(x).flatten(1)))))


def to_classifier_size(x):
    if x.shape[1] != 3:
        raise ValueError(f"the emoji classifier takes RGB images (B, 3, H, W), got {tuple(x.shape)}")
    if x.shape[-2:] == (IMAGE_SIZE, IMAGE_SIZE):
        return x
    if x.shape[-1] > IMAGE_SIZE:
        return F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="area")
    return F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)


def load_emoji_classifier(path=WEIGHTS, device="cpu"):
    """(EmojiCNN in eval mode, metadata with `class_names` as a list)."""
    state, meta = read_classifier_file(path, "flowpre.eval.train_emoji_classifier")
    if "class_names" not in meta:
        raise ValueError(f"{path} is not an emoji subgroup classifier (no class_names in its metadata)")
    meta["class_names"] = json.loads(meta["class_names"])
    net = EmojiCNN(**json.loads(meta["config"]))
    net.load_state_dict(state)
    return net.to(device).eval(), meta


def group_of(class_name):
    """"Animals & Nature: animal-mammal" -> "Animals & Nature"."""
    return class_name.split(": ", 1)[0]


@torch.no_grad()
def predict(net, images, batch_size=500):
    """(N, 3, H, W) in [-1, 1] -> (N,) predicted class ids (on the CPU)."""
    device = next(net.parameters()).device
    return batched(lambda x: net(x).argmax(1), images, batch_size, device).long()
