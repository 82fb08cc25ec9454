"""Time grids and the Euler sampler (sigma = 1 is noise, sigma = 0 is data).

One grid function serves training and sampling: N steps, u_j = 1 - j/N, optionally
shifted, sigma_j = s*u_j / (1 + (s - 1)*u_j). Sampling starts at SIGMA_MAX rather than
exactly 1 and ends at 0.
"""
import torch

SIGMA_MAX = 1.0 - 1e-5


def shift_sigma(u, shift):
    """Map u in [0, 1] to s*u / (1 + (s-1)*u); shift > 1 spends more time near noise."""
    if isinstance(shift, torch.Tensor) or shift != 1.0:
        return shift * u / (1 + (shift - 1) * u)
    return u


def time_grid(num_steps, shift=1.0, device=None, dtype=torch.float32):
    """(num_steps + 1,) descending sigmas from 1 to 0."""
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    u = 1 - torch.arange(num_steps + 1, device=device, dtype=torch.float64) / num_steps
    return shift_sigma(u, shift).to(dtype)


def null_like(cond, null_cond):
    """The null condition broadcast to cond's shape: a class id (int) for (B,) class ids,
    or one sample's text encoding (tokens, dim) for (B, tokens, dim) text conditions."""
    return torch.as_tensor(null_cond).to(device=cond.device, dtype=cond.dtype).expand_as(cond)


def guided_velocity(model, x, sigma, cond, null_cond, cfg_scale, **model_kwargs):
    """v_u + w (v_c - v_u) on every channel; one batched forward for both halves."""
    if cfg_scale == 1.0:
        return model(x, sigma, cond, **model_kwargs)
    null = null_like(cond, null_cond)
    both = {k: torch.cat([v, v]) for k, v in model_kwargs.items()}
    v = model(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([cond, null]), **both)
    v_cond, v_uncond = v.chunk(2)
    return v_uncond + cfg_scale * (v_cond - v_uncond)


@torch.no_grad()
def euler_sample(model, noise, cond, num_steps, shift=1.0, cfg_scale=1.0, null_cond=None, step_inputs=None,
                 time_inputs=1):
    """Integrate from noise (sigma ~ 1) to data with `num_steps` Euler steps.

    model(x, sigma, cond, **kwargs) -> velocity; `step_inputs(num_steps, batch)` may
    return extra model inputs (the shortcut baseline's step-size level). A two-time model
    (time_inputs=2) is told where each step ends: (sigma_j, sigma_{j+1}) at step j, so its
    output is the average velocity of the jump and one step lands where the flow would.
    """
    if cfg_scale != 1.0 and null_cond is None:
        raise ValueError("classifier-free guidance needs the null condition")
    sigmas = time_grid(num_steps, shift, device=noise.device, dtype=noise.dtype).clamp(max=SIGMA_MAX)
    kwargs = step_inputs(num_steps, noise.shape[0]) if step_inputs else {}
    x = noise
    for j in range(num_steps):
        sigma = sigmas[j].expand(x.shape[0])
        if time_inputs == 2:
            kwargs["sigma_end"] = sigmas[j + 1].expand(x.shape[0])
        v = guided_velocity(model, x, sigma, cond, null_cond, cfg_scale, **kwargs)
        x = x - (sigmas[j] - sigmas[j + 1]) * v.to(x.dtype)
    return x


def seeded_noise(shape, seed, device):
    """Noise that depends only on the seed (drawn on the CPU, so identical on every device)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device)
