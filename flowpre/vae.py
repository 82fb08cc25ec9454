"""Latent space: a local diffusers AutoencoderKL, and the latent.npy sample format.

Training in latent space (as DiT does) means the shards hold VAE latents and the
model never sees pixels; the sampler decodes its output through the same VAE.

    latent = (mean of the encoder's distribution - shift_factor) * scaling_factor
    image  = decoder(latent / scaling_factor + shift_factor)

Encoding takes the distribution's mean rather than a sample: shards are written
once, and a deterministic latent makes the same images give byte-identical shards.
(DiT samples from the distribution at every epoch; with a VAE of small posterior
variance, as SD's, the difference is negligible.)

diffusers is an optional dependency (`pip install flowpre[vae]`); it is imported
only when a VAE is loaded, so the latent.npy helpers below work without it. Weights
are only ever read from a local folder: nothing is downloaded at run time.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

LATENT_KEY = "latent.npy"  # sample suffix in the shards


def load_vae(path, device="cpu", dtype=torch.float32):
    """AutoencoderKL from a local folder written by save_pretrained, in eval mode, frozen."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise ImportError("latent training needs diffusers: pip install flowpre[vae] "
                          "(or pip install diffusers)") from e
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a VAE folder: no config.json (expected a local "
                                "diffusers AutoencoderKL saved with save_pretrained)")
    try:
        # low_cpu_mem_usage=False: the default wants `accelerate` and warns without it
        vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True, torch_dtype=dtype,
                                            low_cpu_mem_usage=False)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"{folder} is not a loadable diffusers AutoencoderKL folder: {e}") from e
    return vae.to(device).eval().requires_grad_(False)


def vae_for_dataset(dataset: dict, device="cpu"):
    """The VAE that decodes a model's outputs to pixels, or None for a pixel-space dataset.
    `dataset` is read_dataset_info's dict (also in checkpoints' meta and export metadata)."""
    latent = (dataset or {}).get("latent")
    # synthetic latents (flowpre/data/synthetic.py) have no VAE: their grids stay latents
    return None if latent is None or latent.get("vae") is None else load_vae(latent["vae"], device)


def _factors(vae) -> tuple[float, float]:
    scale = getattr(vae.config, "scaling_factor", None)
    shift = getattr(vae.config, "shift_factor", None)  # only newer VAEs (SD3, FLUX) have one
    return float(1.0 if scale is None else scale), float(shift or 0.0)


def downsample_factor(vae) -> int:
    """Pixels per latent along each axis (one stride-2 stage per extra block)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_meta(vae, path, height: int, width: int) -> dict:
    """The dataset.json "latent" entry for images of height x width."""
    f = downsample_factor(vae)
    if height % f or width % f:
        raise ValueError(f"image size {height}x{width} is not a multiple of the VAE's downsampling "
                         f"factor {f}; resize the images (folder sources: --image-size)")
    scale, shift = _factors(vae)
    return {"channels": int(vae.config.latent_channels), "height": height // f, "width": width // f,
            "scaling_factor": scale, "shift_factor": shift, "vae": str(Path(path).expanduser().resolve())}


@torch.no_grad()
def encode(vae, x: torch.Tensor) -> torch.Tensor:
    """Images (B, C, H, W) in [-1, 1] -> scaled latents (B, c, H/f, W/f), deterministic (the mean)."""
    scale, shift = _factors(vae)
    p = next(vae.parameters())
    mean = vae.encode(x.to(p.device, p.dtype)).latent_dist.mean
    return (mean.float() - shift) * scale


@torch.no_grad()
def decode(vae, z: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images (B, C, H, W) in [-1, 1] (clamped: the decoder overshoots a little)."""
    scale, shift = _factors(vae)
    p = next(vae.parameters())
    x = vae.decode((z.float() / scale + shift).to(p.device, p.dtype)).sample
    return x.float().clamp_(-1.0, 1.0)


def encode_uint8(vae, images: list[np.ndarray]) -> np.ndarray:
    """uint8 (H, W, C) images -> float16 latents (B, c, h, w). Grayscale is replicated to
    the VAE's input channels (image VAEs are RGB)."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    want = int(vae.config.in_channels)
    if x.shape[1] != want:
        if x.shape[1] != 1:
            raise ValueError(f"{x.shape[1]}-channel images cannot feed a VAE with {want} input channels")
        x = x.expand(-1, want, -1, -1)
    return encode(vae, x).cpu().numpy().astype(np.float16)


def latent_bytes(latent: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(latent, dtype=np.float16), allow_pickle=False)
    return buf.getvalue()


def read_latent(data: bytes, shape: tuple[int, int, int]) -> np.ndarray:
    """latent.npy bytes -> float16 (c, h, w); ValueError says what is wrong (the reader counts
    the sample as corrupt)."""
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # numpy raises several types for garbage
        raise ValueError(f"unreadable latent.npy ({e})") from None
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"latent shape {tuple(arr.shape)} but the dataset is {tuple(shape)}")
    if arr.dtype.kind != "f" or not np.isfinite(arr).all():
        raise ValueError(f"latent is not finite floats (dtype {arr.dtype})")
    return arr
