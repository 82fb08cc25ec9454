"""Plain flow matching (METHOD.md section 2), the anchor loss and the baseline.

x_sigma = (1 - sigma) x + sigma eps, target v = eps - x, sigma from the configured
sampler: uniform or logit-normal(mean, std), either optionally shifted.
"""
import torch

from flowpre.sampling import shift_sigma

from .base import FM, GROUPS, Targets, adaptive_weighting, drop_labels, jump_inputs


def sample_sigma(n, cfg, device, generator):
    """Training sigmas (n,) in (0, 1) from `cfg.sigma_sampler`, then `cfg.sigma_shift`."""
    if cfg.sigma_sampler == "uniform":
        u = torch.rand(n, device=device, generator=generator)
    elif cfg.sigma_sampler == "logit_normal":
        z = torch.randn(n, device=device, generator=generator)
        u = torch.sigmoid(cfg.logit_mean + cfg.logit_std * z)
    else:
        raise ValueError(f"objective.sigma_sampler: unknown sampler {cfg.sigma_sampler!r}")
    return shift_sigma(u, cfg.sigma_shift)


def noise_like(x, generator):
    return torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)


class FlowMatching:
    groups = GROUPS
    step_levels = 0

    def __init__(self, cfg, time_inputs=1):
        self.cfg, self.time_inputs = cfg, time_inputs
        self.adaptive = adaptive_weighting(cfg, default=False)

    def __call__(self, batch, nets, generator, step=None):  # step: the training step (curricula)
        x_data, cond = batch["x"], batch["cond"]
        B = x_data.shape[0]
        sigma = sample_sigma(B, self.cfg, x_data.device, generator)
        eps = noise_like(x_data, generator)
        s = sigma.view(B, 1, 1, 1)
        return Targets(
            x=(1 - s) * x_data + s * eps,
            sigma=sigma,
            cond=drop_labels(cond, self.cfg.cond_drop_prob, nets.null_cond, generator),
            target=eps - x_data,
            weight=torch.ones(B, device=x_data.device),
            group=torch.full((B,), FM, device=x_data.device, dtype=torch.long),
            sigma_mid=sigma, sigma_next=sigma, extra_inputs=jump_inputs(self.time_inputs, sigma),
            adaptive=self.adaptive,
        )
