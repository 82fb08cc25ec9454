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
- CFG in the target (MeanFlow's, section 4.2 and its appendix; off at guidance_scale = 1):
  guidance_scale is the *effective* scale w' the trained model samples with at sampler cfg 1,
  guidance_mix is kappa, and omega = w' (1 - kappa). For samples that keep their condition, v
  is replaced by
      v~ = omega v + kappa u(z_t, t, t | c) + (1 - omega - kappa) u(z_t, t, t | null),
  the student's own instantaneous velocities without gradient; label-dropped samples keep v
  (the unconditional field is what the null class learns). Its fixed point is the average
  velocity of the guided field u_null + w' (u_c - u_null), so w' is directly comparable with
  a sampler CFG scale (and with scfm's guidance_scale). du/dt is then taken along v~ (the
  guided field's own direction). Cost: one no-grad forward per kept-label sample for
  u(. | null), one more when kappa > 0 (a dropped label's target is v, so it needs neither).
  Not done: MeanFlow's guidance interval (guidance only for t in a range).
- fd_direction: `v` takes du/dt along the sample's velocity (eps - x, or v~ when guided);
  `predicted` along the student's own no-grad instantaneous velocity u(z_t, t, t | c) (guided
  like v~ when guided), as iMF does. One more forward on the jump share, counted.
- r_sampler: `pair` sorts two draws of the sigma sampler; `logit_normal` draws the second from
  logit-normal(r_logit_mean, r_logit_std) before sorting, so with a negative mean most jumps end
  near r = 0, the end every 1-step sample jumps to.
- objective.curriculum (curriculum.py): the jump share and the largest jump at the step the loop
  passes; logged as jump_share and max_jump. With the curriculum the jump batch changes size
  over the ramp (the same on every rank, since it depends on the step only).
- Loss weighting: adaptive (p = 1, c = 1e-3) unless objective.loss_weighting says otherwise.
"""
import torch

from flowpre.config import ConfigError
from flowpre.models.dit import forward_mode_kernels
from flowpre.sampling import null_like

from .base import FM, GROUPS, SC, Targets, adaptive_weighting, bare_module, drop_labels
from .curriculum import schedule
from .flow_matching import noise_like, sample_sigma


def _col(t):
    return t.view(-1, 1, 1, 1)


class MeanFlow:
    groups = GROUPS
    step_levels = 0

    def __init__(self, cfg, time_inputs=1, finite_difference=False, max_steps=None):
        if time_inputs != 2:
            raise ConfigError(f"objective.name={cfg.name} needs model.time_inputs=2: the network must be told "
                              f"where its jump ends (got model.time_inputs={time_inputs})")
        if cfg.teacher:
            raise ConfigError(f"objective.teacher is not supported with objective.name={cfg.name}")
        self.cfg, self.finite_difference = cfg, finite_difference
        self.adaptive = adaptive_weighting(cfg, default=True)
        self.guided = cfg.guidance_scale != 1.0
        self.omega = cfg.guidance_scale * (1 - cfg.guidance_mix)  # MeanFlow's omega of the effective scale
        self.curriculum = schedule(cfg, max_steps)

    def times(self, B, device, generator, dtype=torch.float32, step=None):
        """(t, r, jump_idx): sorted sigma pairs, r = t outside jump_idx; the jump share and the
        largest jump as the curriculum has them at `step`."""
        share, max_jump = self.curriculum.at(step)
        a = sample_sigma(B, self.cfg, device, generator).to(dtype)
        if self.cfg.r_sampler == "logit_normal":
            b = torch.sigmoid(self.cfg.r_logit_mean + self.cfg.r_logit_std
                              * torch.randn(B, device=device, generator=generator)).to(dtype)
        else:
            b = sample_sigma(B, self.cfg, device, generator).to(dtype)
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        if max_jump < 1:
            r = t - max_jump * (t - r)
        perm = torch.randperm(B, device=device, generator=generator)
        n_fm = round(B * (1 - share))  # = round(B * fm_fraction) off the curriculum, as before it
        r = r.index_copy(0, perm[:n_fm], t[perm[:n_fm]])
        return t, r, perm[n_fm:], share, max_jump

    def guide(self, base, u_cond, u_uncond, kept):
        """omega base + kappa u_c + (1 - omega - kappa) u_u where the condition was kept, else base."""
        k = self.cfg.guidance_mix
        mixed = self.omega * base + (1 - self.omega - k) * u_uncond
        if k:
            mixed = mixed + k * u_cond
        return torch.where(_col(kept), mixed, base)

    @torch.no_grad()
    def instantaneous(self, student, z, t, cond):
        """The student's own u(z, t, t | cond), no gradient, in the dtype of z."""
        return student(z, t, cond, sigma_end=t).to(z.dtype)

    def instantaneous_rows(self, student, z, t, cond, rows, like):
        """(u(z, t, t | cond) on the rows where `rows` is true, NaN elsewhere, the number of rows):
        a row read but never computed poisons the loss rather than training on zeros. The count
        comes from the index the forward needs anyway, so counting costs no second host sync."""
        out = torch.full_like(like, float("nan"))
        idx = rows.nonzero().flatten()
        if idx.numel():
            out[idx] = self.instantaneous(student, z[idx], t[idx], cond[idx]).to(like.dtype)
        return out, idx.numel()

    @torch.no_grad()
    def time_derivative(self, nets, z, t, r, v, cond):
        """du/dt along the tangent (v, dt = 1, dr = 0) at (z_t, t -> r), (n, C, H, W), without gradient."""
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

    def __call__(self, batch, nets, generator, step=None):
        x_data, cond = batch["x"], batch["cond"]
        B, device = x_data.shape[0], x_data.device
        # times as wide as the data (float64 in the derivative checks), fp32 at least
        t, r, jump_idx, share, max_jump = self.times(B, device, generator,
                                                     torch.promote_types(x_data.dtype, torch.float32), step)
        eps = noise_like(x_data, generator)
        z = (1 - _col(t)) * x_data + _col(t) * eps
        v = eps - x_data
        dropped = drop_labels(cond, self.cfg.cond_drop_prob, nets.null_cond, generator)
        student = bare_module(nets.student) if nets.student is not None else None
        j = jump_idx
        forwards = 0.0  # no-grad forwards, in images
        u_cond = u_uncond = kept = None
        if self.guided:
            kept = (dropped == cond).flatten(1).all(1) if cond.ndim > 1 else dropped == cond
            # a dropped label learns the plain velocity, so its guided forwards would be thrown away;
            # only the predicted direction with kappa > 0 reads a dropped jump's u(. | null), its own
            rows = kept.clone()
            if self.cfg.guidance_mix and self.cfg.fd_direction == "predicted":
                rows[j] = True
            u_uncond, n = self.instantaneous_rows(student, z, t, null_like(cond, nets.null_cond), rows, v)
            forwards += n
            if self.cfg.guidance_mix:
                u_cond, n = self.instantaneous_rows(student, z, t, cond, kept, v)
                forwards += n
            v = self.guide(v, u_cond, u_uncond, kept)
        target = v.clone()
        group = torch.full((B,), FM, device=device, dtype=torch.long)
        info = {"jump_share": torch.tensor(share), "max_jump": torch.tensor(max_jump)}
        if j.numel():
            tangent = v[j]
            if self.cfg.fd_direction == "predicted":  # the student's own velocity at the sample's condition
                if u_cond is not None:  # kappa > 0: both velocities are at hand for every sample
                    u_own = torch.where(_col(kept[j]), u_cond[j], u_uncond[j])
                else:
                    u_own = self.instantaneous(student, z[j], t[j], dropped[j]).to(v.dtype)
                    forwards += j.numel()
                tangent = self.guide(u_own, u_own, u_uncond[j], kept[j]) if self.guided else u_own
            dudt = self.time_derivative(nets, z[j], t[j], r[j], tangent, dropped[j]).to(target.dtype)
            target[j] = v[j] - _col(t[j] - r[j]).to(target.dtype) * dudt
            group[j] = SC
            info["sc_jump_mean"] = (t[j] - r[j]).mean()
            info["dudt_rms"] = dudt.float().pow(2).mean().sqrt()
            # the JVP's primal + tangent pass doubles every matmul (the tangent of W x is W dx),
            # the finite difference is two fp32 forwards
            forwards += 2.0 * j.numel()
        info["extra_forward_images"] = forwards
        return Targets(x=z, sigma=t, cond=dropped, target=target, weight=torch.ones(B, device=device), group=group,
                       extra_inputs={"sigma_end": r}, info=info, sigma_mid=(t + r) / 2, sigma_next=r,
                       adaptive=self.adaptive)
