"""Images in Python from an exported model, called the way diffusers' pipelines are.

    import flowpre, torch
    pipe = flowpre.load("fashion-dit")                  # a model folder or a .safetensors export
    ids = pipe.get_label_ids(["Sneaker", "Bag"])        # class models; pipe.labels lists the names
    out = pipe(class_labels=ids, num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    out.images[0].save("sneaker.png")

Text models take `prompt=` (and `negative_prompt=`, `num_images_per_prompt=`) as diffusers'
text-to-image pipelines do; class models take `class_labels=` as DiTPipeline does (ids, or
names, which get_label_ids turns into ids). The pipeline reads from the weights' metadata
what a caller would otherwise have to know: whether the DiT takes one time, two times (the
jump's end, METHOD.md section 8) or a step-size level (Shortcut Models), the null condition
for guidance, the text encoder and the VAE its shards were written with.

Noise is drawn for the whole request at once from `generator` (on the generator's device,
CPU by default) and then cut into batches, so images depend on the seed and not on
`batch_size` or the device: `pipe(class_labels=ids, generator=torch.Generator().manual_seed(s))`
gives exactly the images of `flowpre sample --seed s` (which runs through this class).

Precision: `dtype` is the compute dtype of the DiT's forward, under autocast with the fp32
weights, as in training (bf16 on CUDA by default, fp32 on the CPU); the Euler state, the
text encoder and the VAE stay fp32. Nothing is downloaded: the text encoder and the VAE are
the local folders recorded at training time, or the ones passed as `text_encoder=` / `vae=`.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowpre.images import to_uint8
from flowpre.sampling import euler_sample
from flowpre.weights import load_model

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class PipelineError(ValueError):
    """A request the model cannot serve, or a part of it that is missing; the message names it."""


@dataclass
class FlowpreOutput:
    """What a pipeline call returns (diffusers' ImagePipelineOutput): `images` is a list of PIL
    images, a (B, H, W, C) numpy array or a (B, C, H, W) tensor in [0, 1], or the sampler's
    raw output for output_type="latent"."""
    images: Any


def load(path, device=None, dtype=None, vae=None, text_encoder=None, kernels="auto", source=None):
    """The pipeline of an exported model: a model folder (`flowpre export --format folder`) or a
    .safetensors file (`flowpre export`). device: default CUDA when there is one; dtype: the
    forward's compute dtype (default bf16 on CUDA, fp32 elsewhere); vae / text_encoder: local
    folders to use instead of the ones recorded in the weights; kernels: auto | triton | torch."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if dtype not in DTYPES:
        raise PipelineError(f"dtype must be one of {', '.join(map(str, DTYPES))}, got {dtype}")
    source = source or str(path)
    model, meta = load_model(path, device, kernels=kernels, source=source)
    text = _text_encoder(model, meta, device, text_encoder, source) if model.text_dim else None
    if text_encoder is not None and text is None:
        raise PipelineError(f"text_encoder: {source} is class-conditional; it takes no text encoder")
    decoder = _vae(meta, device, vae, source)
    return FlowprePipeline(model, meta, device, dtype, text, decoder, source)


def _text_encoder(model, meta, device, override, source):
    from flowpre.text import TextEncoder

    recorded = meta.get("text_encoder") or {}
    spec = override or recorded.get("path")
    if not spec:
        raise PipelineError(f"{source} is text-conditioned but records no text encoder; pass text_encoder=FOLDER")
    try:
        text = TextEncoder(spec, recorded.get("max_length") or model.text_tokens - 1, device)
    except (OSError, ValueError) as e:  # TextEncoderError is a ValueError (ConfigError)
        raise PipelineError(f"{source} is text-conditioned and needs its text encoder {spec}, which cannot be "
                            f"loaded ({e}); pass text_encoder=FOLDER (a local transformers folder)") from None
    if (text.tokens, text.dim) != (model.text_tokens, model.text_dim):
        raise PipelineError(f"text encoder {spec} gives {text.tokens}x{text.dim} conditions but {source} was trained "
                            f"on {model.text_tokens}x{model.text_dim} ones: not the encoder it was trained with")
    return text


def _vae(meta, device, override, source):
    """The latent model's decoder, or None for a pixel model (and for synthetic latents)."""
    from flowpre.vae import load_vae

    latent = (meta.get("dataset") or {}).get("latent")
    if latent is None:
        if override is not None:
            raise PipelineError(f"vae: {source} is a pixel-space model; it takes no VAE")
        return None
    path = override or latent.get("vae")
    if path is None:
        return None
    if not isinstance(path, (str, Path)):
        return path  # an AutoencoderKL object, already loaded
    try:
        return load_vae(path, device)
    except (OSError, ValueError, ImportError) as e:
        raise PipelineError(f"{source} is a latent model: it decodes through the VAE {path} recorded when its "
                            f"shards were written, which cannot be loaded ({e}); pass vae=FOLDER (a local "
                            "diffusers AutoencoderKL folder), or output_type='latent' with vae=None") from None


class FlowprePipeline:
    """An exported DiT with what it needs to make images: see the module docstring."""

    def __init__(self, model, meta, device, dtype, text=None, vae=None, source="model"):
        self.model, self.config, self.text_encoder, self.vae = model, meta, text, vae
        self.device, self.dtype, self.source = torch.device(device), dtype, source
        self._progress = {}
        names = (meta.get("dataset") or {}).get("class_names") or []
        self.class_names = [] if model.text_dim else [
            names[i] if i < len(names) else f"class {i}" for i in range(model.num_classes)]
        # name -> id as DiTPipeline builds it: each full name, and each comma-separated synonym
        self.labels = {}
        for i, name in enumerate(self.class_names):
            for key in [name, *(part.strip() for part in name.split(",") if "," in name)]:
                self.labels.setdefault(key, i)

    from_pretrained = staticmethod(load)

    def __repr__(self):
        kind = f"text ({self.config['text_encoder']['path']})" if self.model.text_dim else \
            f"{self.model.num_classes} classes"
        return (f"FlowprePipeline({self.source}: {self.model.hidden}x{self.model.depth} DiT, {kind}, "
                f"step {self.config['step']}, {self.device}, {str(self.dtype).removeprefix('torch.')})")

    def to(self, device):
        self.device = torch.device(device)
        for part in (self.model, self.vae):
            if part is not None:
                part.to(self.device)
        if self.text_encoder is not None:
            self.text_encoder.net.to(self.device)
            self.text_encoder.device = self.device
            self.text_encoder.null = self.text_encoder.null.to(self.device)
        return self

    def set_progress_bar_config(self, **kwargs):
        """tqdm options for the progress bar (disable=True hides it, disable=False always shows it)."""
        self._progress = dict(kwargs)

    def get_label_ids(self, label):
        """Class name (or list of names) -> list of class ids."""
        if self.model.text_dim:
            raise PipelineError(f"{self.source} is text-conditioned: it has no classes; give prompt=...")
        names = [label] if isinstance(label, str) else list(label)
        missing = [n for n in names if n not in self.labels]
        if missing:
            raise PipelineError(f"class_labels: {', '.join(map(repr, missing))} "
                                f"{'is not a class' if len(missing) == 1 else 'are not classes'} of {self.source}; "
                                f"its classes: {', '.join(self.class_names)}")
        return [self.labels[n] for n in names]

    # --- the call -----------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, class_labels=None, prompt=None, num_inference_steps=4, guidance_scale=1.0, generator=None,
                 output_type="pil", return_dict=True, negative_prompt=None, num_images_per_prompt=1,
                 latents=None, shift=1.0, batch_size=64):
        """class_labels (class models: ids or names) or prompt (text models: a string or a list),
        each repeated num_images_per_prompt times; latents: the starting noise instead of drawing it."""
        if output_type not in OUTPUT_TYPES:
            raise PipelineError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if num_images_per_prompt < 1:
            raise PipelineError(f"num_images_per_prompt must be at least 1, got {num_images_per_prompt}")
        conditions = self._conditions(class_labels, prompt)
        conditions = [c for c in conditions for _ in range(num_images_per_prompt)]
        noise = self._noise(len(conditions), generator) if latents is None else self._check_latents(latents, len(conditions))
        images = self.denoise(noise, conditions, num_inference_steps, guidance_scale, shift, negative_prompt,
                              decode=output_type != "latent", batch_size=batch_size)
        images = images if output_type == "latent" else self._postprocess(images, output_type)
        return FlowpreOutput(images) if return_dict else (images,)

    def _conditions(self, class_labels, prompt):
        if self.model.text_dim:
            if class_labels is not None:
                raise PipelineError(f"class_labels: {self.source} is text-conditioned; give prompt=...")
            if prompt is None:
                raise PipelineError(f"{self.source} is text-conditioned: give prompt=TEXT (or a list of them)")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            if not prompts or not all(isinstance(p, str) for p in prompts):
                raise PipelineError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
            return prompts
        if prompt is not None:
            raise PipelineError(f"prompt: {self.source} is class-conditional ({self.model.num_classes} classes); "
                                "give class_labels=... (ids, or names: pipe.labels lists them)")
        if class_labels is None:
            raise PipelineError(f"{self.source} is class-conditional: give class_labels=... (ids or names)")
        labels = [class_labels] if isinstance(class_labels, (int, str, np.integer)) or (
            isinstance(class_labels, torch.Tensor) and class_labels.ndim == 0) else list(class_labels)
        if not labels:
            raise PipelineError("class_labels is empty")
        ids = []
        for label in labels:
            if isinstance(label, str):
                ids += self.get_label_ids(label)
                continue
            label = int(label)
            if not 0 <= label < self.model.num_classes:
                raise PipelineError(f"class_labels: {label} is out of range: {self.source} has "
                                    f"{self.model.num_classes} classes (ids 0-{self.model.num_classes - 1})")
            ids.append(label)
        return ids

    def _shape(self, n):
        return (n, self.model.in_channels, self.model.image_size, self.model.image_size)

    def _noise(self, n, generator):
        """Standard normal noise for n images, drawn on the generator's device then moved."""
        if isinstance(generator, (list, tuple)):  # one generator per image, as diffusers allows
            if len(generator) != n:
                raise PipelineError(f"generator: {len(generator)} generators for {n} images")
            return torch.cat([self._noise(1, g) for g in generator])
        where = generator.device if generator is not None else torch.device("cpu")
        return torch.randn(self._shape(n), generator=generator, device=where).to(self.device)

    def _check_latents(self, latents, n):
        if tuple(latents.shape) != self._shape(n):
            raise PipelineError(f"latents: shape {tuple(latents.shape)}, the request needs {self._shape(n)}")
        return latents.to(self.device, torch.float32)

    def _postprocess(self, images, output_type):
        if output_type == "pil":
            from PIL import Image

            if images.shape[1] not in (1, 3):
                raise PipelineError(f"output_type='pil': {self.source} makes {images.shape[1]}-channel images "
                                    "(latents without a VAE); use output_type='pt' or 'np'")
            pixels = to_uint8(images)  # the rounding of flowpre sample's grids
            return [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in pixels]
        unit = (images.clamp(-1, 1) + 1) / 2
        return unit if output_type == "pt" else unit.permute(0, 2, 3, 1).cpu().numpy()

    # --- sampling ----------------------------------------------------------------------

    def _forward(self, x, sigma, cond, **kwargs):
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return self.model(x, sigma, cond, **kwargs).float()

    def _encode(self, conditions, negative_prompt):
        """(cond, null cond) of a batch: class ids and the null class, or text encodings and
        the encoding of the negative prompt (the empty caption by default, as in training)."""
        if not self.model.text_dim:
            return torch.tensor(conditions, device=self.device), self.model.null_class
        cond = self.text_encoder(conditions)
        if negative_prompt is None:
            return cond, self.text_encoder.null
        negatives = [negative_prompt] * len(conditions) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(conditions):
            raise PipelineError(f"negative_prompt: {len(negatives)} for {len(conditions)} images")
        return cond, self.text_encoder(negatives)

    def denoise(self, noise, conditions, num_inference_steps, guidance_scale=1.0, shift=1.0, negative_prompt=None,
                decode=True, batch_size=64):
        """noise (B, C, H, W) and B conditions (class ids, or prompts for text models) -> images
        (B, C', H', W') in [-1, 1], through the VAE for latent models unless decode=False."""
        if int(num_inference_steps) != num_inference_steps or num_inference_steps < 1:
            raise PipelineError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if batch_size < 1:
            raise PipelineError(f"batch_size must be at least 1, got {batch_size}")
        if negative_prompt is not None and not self.model.text_dim:
            raise PipelineError(f"negative_prompt: {self.source} is class-conditional; guidance uses its null class")
        if len(conditions) != noise.shape[0]:
            raise PipelineError(f"{len(conditions)} conditions for {noise.shape[0]} noise samples")
        starts = range(0, noise.shape[0], batch_size)
        bar = self._bar(len(starts) * int(num_inference_steps), len(starts))
        out = []
        for i in starts:
            chunk = conditions[i:i + batch_size]
            negative = negative_prompt if isinstance(negative_prompt, (str, type(None))) else \
                negative_prompt[i:i + batch_size]
            cond, null = self._encode(chunk, negative)
            x = euler_sample(self._forward, noise[i:i + batch_size].to(self.device, torch.float32), cond,
                             int(num_inference_steps), shift, guidance_scale, null,
                             step_inputs=self.model.sampling_inputs, time_inputs=self.model.time_inputs)
            if decode and self.vae is not None:
                from flowpre.vae import decode as vae_decode
                x = vae_decode(self.vae, x)
            out.append(x)
            if bar is not None:
                bar.update(int(num_inference_steps))
        if bar is not None:
            bar.close()
        return torch.cat(out)

    def _bar(self, total, batches):
        """A tqdm bar over model steps: by default only for requests of several batches."""
        options = {"disable": batches < 2, "desc": "flowpre", "unit": "step", **self._progress}
        if options["disable"]:
            return None
        from tqdm.auto import tqdm
        return tqdm(total=total, **options)
