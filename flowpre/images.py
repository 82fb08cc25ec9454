"""Image grids: (B, C, H, W) tensors in [-1, 1] to PNG."""
import numpy as np
import torch
from PIL import Image


def to_uint8(x):
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(x, ncol, pad=2):
    imgs = to_uint8(x)
    B, H, W, C = imgs.shape
    nrow = (B + ncol - 1) // ncol
    grid = np.full((nrow * (H + pad) + pad, ncol * (W + pad) + pad, C), 255, dtype=np.uint8)
    for i in range(B):
        r, c = divmod(i, ncol)
        grid[pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = imgs[i]
    return Image.fromarray(grid[..., 0] if C == 1 else grid)


def save_grid(x, path, ncol):
    make_grid(x, ncol).save(path)
