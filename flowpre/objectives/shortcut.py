"""Shortcut Models (Frans et al., ICLR 2025), the baseline of METHOD.md section 4.

The DiT gets a step-size input d = 2^-level, level 0..7 (level 7 = 1/128 is the finest
and doubles as the flow-matching level). A share `bootstrap_fraction` (1/8) of the batch
gets the self-consistency target, computed without gradient from the slow EMA:

    level l ~ U{0..6}, d = 2^-l, sigma on the grid of level l: sigma = 1 - k d, k ~ U{0..2^l - 1}
    v_a = EMA(x, sigma, level l+1);  x' = x - (d/2) v_a;  v_b = EMA(x', sigma - d/2, level l+1)
    target = clip((v_a + v_b) / 2, -4, 4)       regressed by student(x, sigma, level l)

and the rest plain flow matching at the finest level with label dropout, which is how
CFG is learnt (at the finest level). With `guidance_scale` != 1 the EMA velocities of
the bootstrap are guided and those samples keep their true class. Loss per level is
logged as loss_sc_l0 ... loss_sc_l6.
"""
import torch

from flowpre.sampling import guided_velocity

from .base import FM, Targets, adaptive_weighting, drop_labels
from .flow_matching import noise_like, sample_sigma

LEVELS = 8
FINEST = LEVELS - 1
CLIP = 4.0


class Shortcut:
    groups = ("fm",) + tuple(f"sc_l{level}" for level in range(FINEST))
    step_levels = LEVELS

    def __init__(self, cfg, time_inputs=1):
        if time_inputs != 1:  # its step-size embedder is how Shortcut Models are told the jump
            raise ValueError("objective.name=shortcut takes model.time_inputs=1: Shortcut Models condition on "
                             "the step size through their own step-level embedder")
        self.cfg = cfg
        self.adaptive = adaptive_weighting(cfg, default=False)

    @torch.no_grad()
    def bootstrap(self, x_data, eps, cond, nets, generator):
        n, device = x_data.shape[0], x_data.device
        level = torch.randint(0, FINEST, (n,), device=device, generator=generator)
        d = torch.pow(2.0, -level.float())
        k = torch.floor(torch.rand(n, device=device, generator=generator) * torch.pow(2.0, level.float()))
        sigma = 1 - k * d
        s = sigma.view(n, 1, 1, 1)
        x = (1 - s) * x_data + s * eps
        half = (d / 2).view(n, 1, 1, 1)
        w, null = self.cfg.guidance_scale, nets.null_cond

        def velocity(x, sigma):  # the slow EMA one level finer, guided when w != 1
            return guided_velocity(nets.ema_slow, x, sigma, cond, null, w, step_level=level + 1).float()

        v_a = velocity(x, sigma)
        v_b = velocity(x - half * v_a, sigma - d / 2)
        target = ((v_a + v_b) / 2).clamp(-CLIP, CLIP)
        return x, sigma, target, level, sigma - d

    def __call__(self, batch, nets, generator, step=None):  # step: the training step (curricula)
        x_data, cond = batch["x"], batch["cond"]
        B, device = x_data.shape[0], x_data.device
        n_bs = round(B * self.cfg.bootstrap_fraction)
        bs_idx = torch.randperm(B, device=device, generator=generator)[:n_bs]

        sigma = sample_sigma(B, self.cfg, device, generator)
        eps = noise_like(x_data, generator)
        s = sigma.view(B, 1, 1, 1)
        x, target = (1 - s) * x_data + s * eps, eps - x_data
        cond_out = drop_labels(cond, self.cfg.cond_drop_prob, nets.null_cond, generator)
        level = torch.full((B,), FINEST, device=device, dtype=torch.long)
        group = torch.full((B,), FM, device=device, dtype=torch.long)
        sigma_next = sigma.clone()
        if n_bs:
            bs_cond = cond[bs_idx] if self.cfg.guidance_scale != 1.0 else cond_out[bs_idx]
            x_b, sig_b, tgt_b, lvl_b, next_b = self.bootstrap(x_data[bs_idx], eps[bs_idx], bs_cond, nets, generator)
            x, target = x.index_copy(0, bs_idx, x_b.to(x.dtype)), target.index_copy(0, bs_idx, tgt_b.to(target.dtype))
            sigma, sigma_next = sigma.index_copy(0, bs_idx, sig_b), sigma_next.index_copy(0, bs_idx, next_b)
            cond_out, level = cond_out.index_copy(0, bs_idx, bs_cond), level.index_copy(0, bs_idx, lvl_b)
            group[bs_idx] = 1 + lvl_b  # groups: fm, sc_l0 .. sc_l6
        info = {"extra_forward_images": 2 * n_bs * (1 if self.cfg.guidance_scale == 1.0 else 2)}
        return Targets(x=x, sigma=sigma, cond=cond_out, target=target, weight=torch.ones(B, device=device),
                       group=group, extra_inputs={"step_level": level}, info=info,
                       sigma_mid=(sigma + sigma_next) / 2, sigma_next=sigma_next, adaptive=self.adaptive)
