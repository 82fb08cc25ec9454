"""The samples an evaluation scores: seeded noise per sample index (independent of batch size
and device), the Euler sampler, 8-bit quantisation. evaluate.py (FD, FID) and adherence.py
(prompt adherence) both draw through here, so neither imports the other for it."""
import torch

NOISE_BLOCK = 1024  # samples per independently seeded noise block


class NoiseBank:
    """Noise for sample i drawn from block i // NOISE_BLOCK seeded by (seed, block), so a
    sample's noise does not depend on batch size, device or how many samples are drawn."""

    def __init__(self, shape, seed):
        self.shape, self.seed, self.cache = tuple(shape), seed, {}

    def block(self, b):
        if b not in self.cache:
            from flowpre.sampling import seeded_noise

            self.cache = {b: seeded_noise((NOISE_BLOCK, *self.shape), self.seed * 1_000_003 + b, "cpu")}
        return self.cache[b]

    def get(self, start, end):
        parts = []
        i = start
        while i < end:
            b, off = divmod(i, NOISE_BLOCK)
            take = min(end - i, NOISE_BLOCK - off)
            parts.append(self.block(b)[off:off + take])
            i += take
        return torch.cat(parts)


def quantize(x):
    """[-1, 1] floats -> the nearest 8-bit level (what saving a PNG does), still in [-1, 1];
    NaN/inf (a diverged model) become 0 / the clamp ends rather than poisoning the statistics."""
    x = torch.nan_to_num(x.float(), nan=0.0).clamp(-1, 1)
    return ((x + 1) * 127.5).round() / 127.5 - 1


def generate(model, num_samples, steps, seed, shift, cfg, batch_size, device, num_conditions=None, encode=None,
             null=None):
    """Yield (images in [-1, 1] on the device, requested conditions, non-finite count) per batch.

    Conditions cycle: sample i asks for i mod num_conditions (default: the model's classes).
    Text models pass `encode` (condition ids -> the encoder's output) and its `null`."""
    from flowpre.sampling import euler_sample

    bank = NoiseBank((model.in_channels, model.image_size, model.image_size), seed)
    for start in range(0, num_samples, batch_size):
        end = min(start + batch_size, num_samples)
        noise = bank.get(start, end).to(device)
        cond = torch.arange(start, end, device=device) % (num_conditions or model.num_classes)
        x = euler_sample(model, noise, encode(cond) if encode else cond, steps, shift, cfg,
                         null if encode else model.null_class,
                         step_inputs=model.sampling_inputs, time_inputs=model.time_inputs)
        bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
        yield quantize(x), cond, bad
