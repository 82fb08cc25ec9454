"""MeanFlow and its JVP-free variant: flow-map objectives for two-time models (METHOD.md section 8).

u(z, r, t) is the average velocity from sigma = t down to sigma = r <= t, so one jump is
z_r = z_t - (t - r) u(z_t, r, t). The DiT is a two-time model (model.time_inputs=2): it
gets sigma = t and sigma_end = r. With z_t = (1 - t) x + t eps and v = eps - x,

    target = v - (t - r) stopgrad(du/dt),     du/dt = v . d_z u + d_t u
           = the JVP of u at (z_t, t, r) with tangent (v, 1, 0)          (`meanflow`)
           ~ [u(z_t + d+ v, t + d+, r) - u(z_t - d- v, t - d-, r)] / (d+ + d-)   (`meanflow_fd`)

z_t +- d v is exactly the point at sigma t +- d on the same (x, eps) line, so the central
difference follows the same derivative without forward-mode AD; it runs on every kernel
backend and ZeRO stage.

Choices where METHOD.md is silent (each a config key or stated here):
- (t, r): two draws of the objective's sigma sampler (logit-normal by default; MeanFlow's
  paper uses mean -0.4, set objective.logit_mean), sorted so t >= r. Exactly
  round(B * fm_fraction) samples, chosen by a random permutation, get r = t (flow matching,
  target v, group "fm"); the rest are jumps (group "sc"). Exact counts, as in SCFM, keep the
  JVP / finite-difference batch a fixed size on every rank and step.
- The JVP is taken through the bare student without gradient: the target is stop-gradient
  anyway, and the training loop's own forward makes the prediction that is regressed. That
  costs one more forward on the jump share than the paper's joint primal + tangent pass, and
  keeps the one objective signature (the loop never sees a JVP). The JVP forward runs where
  forward mode has rules (DiT.forward_mode_kernels): the fused Triton kernels when they serve
  the model (attention by its flash-style JVP kernel), else the PyTorch references with SDPA's
  math path (its fused kernels refuse forward AD).
- Finite difference: gap `fd_delta` on each side, shrunk per sample so t + d+ <= 1 and
  t - d- >= (t + r) / 2 > r. When one side is shrunk the stencil is one-sided-biased (first
  order) rather than refusing the sample. Its two forwards run in fp32 with autocast off: in
  bf16 the rounding of u (about 4e-3 relative) over a gap of 1e-2 would swamp du/dt.
  `fd_network` picks the student (the JVP's network) or its fast EMA (a smoother target).
- CFG in the target (off at guidance_scale w = 1, guidance_mix k = 0): for samples that keep
  their condition, v is replaced by w v + k u(z_t, t, t | c) + (1 - w - k) u(z_t, t, t | null),
  the student's own instantaneous velocities, without gradient; label-dropped samples keep v.
- Loss weighting: adaptive (p = 1, c = 1e-3) unless objective.loss_weighting says otherwise.
"""
import torch

from flowpre.config import ConfigError
from flowpre.models.dit import forward_mode_kernels
from flowpre.sampling import null_like

from .base import FM, GROUPS, SC, Targets, adaptive_weighting, bare_module, drop_labels
from .flow_matching import noise_like, sample_sigma


def _col(t):
    return t.view(-1, 1, 1, 1)


class MeanFlow:
    groups = GROUPS
    step_levels = 0

    def __init__(self, cfg, time_inputs=1, finite_difference=False):
        if time_inputs != 2:
            raise ConfigError(f"objective.name={cfg.name} needs model.time_inputs=2: the network must be told "
                              f"where its jump ends (got model.time_inputs={time_inputs})")
        if cfg.teacher:
            raise ConfigError(f"objective.teacher is not supported with objective.name={cfg.name}")
        self.cfg, self.finite_difference = cfg, finite_difference
        self.adaptive = adaptive_weighting(cfg, default=True)
        self.guided = cfg.guidance_scale != 1.0 or cfg.guidance_mix != 0.0

    def times(self, B, device, generator, dtype=torch.float32):
        """(t, r, jump_idx): sorted sigma pairs, r = t outside jump_idx."""
        a = sample_sigma(B, self.cfg, device, generator).to(dtype)
        b = sample_sigma(B, self.cfg, device, generator).to(dtype)
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        perm = torch.randperm(B, device=device, generator=generator)
        n_fm = round(B * self.cfg.fm_fraction)
        r = r.index_copy(0, perm[:n_fm], t[perm[:n_fm]])
        return t, r, perm[n_fm:]

    @torch.no_grad()
    def guided_target_velocity(self, student, z, t, v, cond, kept, null_cond):
        """w v + k u_c + (1 - w - k) u_u on samples that kept their condition (`kept`), else v."""
        w, k = self.cfg.guidance_scale, self.cfg.guidance_mix
        n = z.shape[0]
        both = student(torch.cat([z, z]), torch.cat([t, t]), torch.cat([cond, null_like(cond, null_cond)]),
                       sigma_end=torch.cat([t, t])).to(v.dtype)
        u_cond, u_uncond = both[:n], both[n:]
        guided = w * v + k * u_cond + (1 - w - k) * u_uncond
        return torch.where(_col(kept), guided, v)

    @torch.no_grad()
    def time_derivative(self, nets, z, t, r, v, cond):
        """du/dt along the interpolation line at (z_t, t -> r), (n, C, H, W), without gradient."""
        if not self.finite_difference:
            student = bare_module(nets.student)
            with forward_mode_kernels(student):
                def u(z_, t_, r_):
                    return student(z_, t_, cond, sigma_end=r_)
                _, dudt = torch.func.jvp(u, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
            return dudt
        net = bare_module(nets.student) if self.cfg.fd_network == "student" else nets.ema_fast
        delta = self.cfg.fd_delta
        wide = torch.promote_types(z.dtype, torch.float32)  # fp32 at least; float64 stays float64
        t32, r32, z32, v32 = t.to(wide), r.to(wide), z.to(wide), v.to(wide)
        d_plus = torch.clamp(1 - t32, max=delta)
        d_minus = torch.clamp((t32 - r32) / 2, max=delta)
        with torch.autocast(z.device.type, enabled=False):
            u_plus = net(z32 + _col(d_plus) * v32, t32 + d_plus, cond, sigma_end=r32).to(wide)
            u_minus = net(z32 - _col(d_minus) * v32, t32 - d_minus, cond, sigma_end=r32).to(wide)
        gap = _col(d_plus + d_minus).clamp(min=1e-12)  # 0 only if t = r = 1, where t - r = 0 too
        return (u_plus - u_minus) / gap

    def __call__(self, batch, nets, generator):
        x_data, cond = batch["x"], batch["cond"]
        B, device = x_data.shape[0], x_data.device
        # times as wide as the data (float64 in the derivative checks), fp32 at least
        t, r, jump_idx = self.times(B, device, generator, torch.promote_types(x_data.dtype, torch.float32))
        eps = noise_like(x_data, generator)
        z = (1 - _col(t)) * x_data + _col(t) * eps
        v = eps - x_data
        dropped = drop_labels(cond, self.cfg.cond_drop_prob, nets.null_cond, generator)
        if self.guided:
            kept = (dropped == cond).flatten(1).all(1) if cond.ndim > 1 else dropped == cond
            v = self.guided_target_velocity(bare_module(nets.student), z, t, v, cond, kept, nets.null_cond)
        target = v.clone()
        group = torch.full((B,), FM, device=device, dtype=torch.long)
        info = {}
        if jump_idx.numel():
            j = jump_idx
            dudt = self.time_derivative(nets, z[j], t[j], r[j], v[j], dropped[j]).to(target.dtype)
            target[j] = v[j] - _col(t[j] - r[j]).to(target.dtype) * dudt
            group[j] = SC
            info["sc_jump_mean"] = (t[j] - r[j]).mean()
            info["dudt_rms"] = dudt.float().pow(2).mean().sqrt()
        # no-grad work in units of one image's forward: the JVP's primal + tangent pass doubles
        # every matmul (the tangent of W x is W dx), the finite difference is two fp32 forwards;
        # CFG in the target adds two on every sample
        info["extra_forward_images"] = 2.0 * jump_idx.numel() + (2.0 * B if self.guided else 0.0)
        return Targets(x=z, sigma=t, cond=dropped, target=target, weight=torch.ones(B, device=device), group=group,
                       extra_inputs={"sigma_end": r}, info=info, sigma_mid=(t + r) / 2, sigma_next=r,
                       adaptive=self.adaptive)
