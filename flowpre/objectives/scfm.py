"""SCFM: velocity self-distillation mixed into flow-matching pretraining (METHOD.md section 3).

Per batch, a fixed share `fm_fraction` of the samples (chosen by a random permutation)
gets the plain flow-matching target; the rest gets a self-distillation target built
without gradient on a random shifted grid:

    N = 2^k uniform in {2, 4, ..., n_max}, shift s ~ U[shift_min, shift_max], a in {0, 2, ..., N-2}
    x_a    = (1 - sigma_a) x + sigma_a eps
    v1     = F_fast(x_a, sigma_a, c)             (fast EMA; or the frozen teacher on the fine grid)
    x_mid  = x_a - d1 v1
    v2     = F_slow(x_mid, sigma_{a+1}, c)       (slow EMA)
    target = (d1 v1 + d2 v2) / (d1 + d2)

Choices where METHOD.md is silent (each a config key):
- The split uses exact counts, round(B * fm_fraction) flow-matching samples, rather than a
  coin per sample, so every EMA forward has a fixed batch size: no host sync, no
  recompilation, and the cost is the same every step.
- Without guidance distillation (guidance_scale = 1) label dropout applies to every
  sample, so the unconditional model also learns to jump; with it, self-distillation
  samples keep their true class and regress the guided chord.
- `n_weighting` = uniform (METHOD.md) or `small`, which weights grid size 2^k by 1/k to
  spend more of the batch on long jumps (the weak 1-step regime of METHOD.md section 7).
- `step_conditioning` (METHOD.md section 7's variant for models trained from scratch): the
  DiT gets a step-size input with levels 0 .. log2(n_max). Level l < log2(n_max) means
  "jump on a grid of 2^l steps"; the top level means "fine / flow matching". The student's
  SC jump spans two cells of a grid of N, i.e. one cell of N/2: level log2(N) - 1. The
  EMAs take the fine steps of grid N at level min(log2 N, top). FM samples train the top
  level. A sampler of N steps feeds min(log2 N, top) (DiT.sampling_inputs), so N >= n_max
  samples with the flow-matching level. Not combined with a teacher (which has no levels).
- Two times (model.time_inputs=2, METHOD.md section 8): the student's jump is conditioned on
  its end sigma_{a+2}, the fast EMA's fine step on sigma_{a+1}, the slow EMA's on sigma_{a+2},
  flow-matching samples on sigma_end = sigma. Except on the finest grid (N = n_max): there
  the fine steps are instantaneous (sigma_end = their start), the flow-matching velocity.
  A fine step of grid N is a student jump of grid 2N, so below n_max it is trained; at
  n_max nothing trains it, and with their own ends there the recursion never reaches flow
  matching: the jumps then form a self-consistent family of their own, and in the pilot
  (docs/results/fashion_flowmaps_pilot.md, `scfm_tuned_2t_unanchored`) that collapsed to
  class accuracy at chance with a chord loss of 0.003. Anchoring the finest level to flow
  matching is what Shortcut Models do with their finest step size.
  A teacher gets its end only if it is itself a two-time model (a one-time teacher's
  instantaneous velocity on the fine teacher grid is what distillation mode used before).
"""
import math

import torch

from flowpre.sampling import guided_velocity, shift_sigma

from .base import FM, GROUPS, SC, Targets, adaptive_weighting, drop_labels, jump_inputs
from .flow_matching import noise_like, sample_sigma


class SCFM:
    groups = GROUPS

    def __init__(self, cfg, time_inputs=1):
        self.cfg, self.time_inputs = cfg, time_inputs
        self.adaptive = adaptive_weighting(cfg, default=False)
        self.step_levels = int(math.log2(cfg.n_max)) + 1 if cfg.step_conditioning else 0
        if cfg.step_conditioning and cfg.teacher:
            raise ValueError("objective.step_conditioning cannot be combined with objective.teacher: "
                             "the teacher has no step-size input")
        if cfg.n_max < 2 or cfg.n_max & (cfg.n_max - 1):
            raise ValueError(f"objective.n_max must be a power of two >= 2, got {cfg.n_max}")
        if cfg.shift_min > cfg.shift_max:
            raise ValueError(f"objective.shift_min ({cfg.shift_min}) > objective.shift_max ({cfg.shift_max})")
        if cfg.teacher_grid < 2 or cfg.teacher_grid % 2:
            raise ValueError(f"objective.teacher_grid must be an even number >= 2, got {cfg.teacher_grid}")
        k = torch.arange(1, int(math.log2(cfg.n_max)) + 1, dtype=torch.float64)
        self.log2_n = k
        probs = torch.ones_like(k) if cfg.n_weighting == "uniform" else 1.0 / k
        self.n_probs = (probs / probs.sum()).float()

    def split(self, batch_size):
        n_fm = round(batch_size * self.cfg.fm_fraction)
        n_sc = batch_size - n_fm
        n_teacher = round(n_sc * self.cfg.teacher_fraction) if self.cfg.teacher else 0
        return n_fm, n_sc, n_teacher

    def grid_points(self, n, device, generator, n_teacher=0):
        """(sigma_a, sigma_{a+1}, sigma_{a+2}, N) for n samples; the first n_teacher on the teacher grid."""
        k_idx = torch.multinomial(self.n_probs.to(device), n, replacement=True, generator=generator)
        N = (2 ** (k_idx + 1)).float()
        if n_teacher:
            N[:n_teacher] = float(self.cfg.teacher_grid)
        shift = self.cfg.shift_min + (self.cfg.shift_max - self.cfg.shift_min) * torch.rand(n, device=device, generator=generator)
        a = 2 * torch.floor(torch.rand(n, device=device, generator=generator) * (N / 2))  # {0, 2, ..., N-2}
        sig = [shift_sigma(1 - (a + j) / N, shift) for j in range(3)]
        return sig[0], sig[1], sig[2], N

    @torch.no_grad()
    def distill_targets(self, x_data, eps, cond, nets, generator, n_teacher):
        """Self-distillation inputs and chord targets for a batch that is all SC samples."""
        n = x_data.shape[0]
        sigma_a, sigma_mid, sigma_next, N = self.grid_points(n, x_data.device, generator, n_teacher)
        s = sigma_a.view(n, 1, 1, 1)
        x_a = (1 - s) * x_data + s * eps
        w, null = self.cfg.guidance_scale, nets.null_cond
        fine = {}  # step-conditioned: the EMAs take the fine steps at level min(log2 N, top)
        if self.step_levels:
            fine = {"step_level": torch.log2(N).round().long().clamp(max=self.step_levels - 1)}
        # two times: each fine step's own end, but instantaneous on the finest grid (see above)
        finest = N >= self.cfg.n_max
        fast = {**fine, **jump_inputs(self.time_inputs, torch.where(finest, sigma_a, sigma_mid))}
        slow = {**fine, **jump_inputs(self.time_inputs, torch.where(finest, sigma_mid, sigma_next))}
        v1_parts = []
        if n_teacher:
            tk = jump_inputs(getattr(nets.teacher, "time_inputs", 1), sigma_mid[:n_teacher])
            v1_parts.append(guided_velocity(nets.teacher, x_a[:n_teacher], sigma_a[:n_teacher], cond[:n_teacher], null, w,
                                            **tk))
        if n > n_teacher:
            v1_parts.append(guided_velocity(nets.ema_fast, x_a[n_teacher:], sigma_a[n_teacher:], cond[n_teacher:], null, w,
                                            **{k: v[n_teacher:] for k, v in fast.items()}))
        v1 = torch.cat(v1_parts).float()
        d1 = (sigma_a - sigma_mid).view(n, 1, 1, 1)
        d2 = (sigma_mid - sigma_next).view(n, 1, 1, 1)
        x_mid = x_a - d1 * v1
        v2 = guided_velocity(nets.ema_slow, x_mid, sigma_mid, cond, null, w, **slow).float()
        target = (d1 * v1 + d2 * v2) / (d1 + d2)
        return x_a, sigma_a, sigma_mid, sigma_next, target, N

    def __call__(self, batch, nets, generator, step=None):  # step: the training step (curricula)
        x_data, cond = batch["x"], batch["cond"]
        B, device = x_data.shape[0], x_data.device
        n_fm, n_sc, n_teacher = self.split(B)
        if n_teacher and nets.teacher is None:
            raise ValueError("objective.teacher is set but no teacher network was given")
        perm = torch.randperm(B, device=device, generator=generator)
        sc_idx = perm[n_fm:]

        # flow matching for everyone, then the SC share is overwritten
        sigma = sample_sigma(B, self.cfg, device, generator)
        eps = noise_like(x_data, generator)
        s = sigma.view(B, 1, 1, 1)
        x = (1 - s) * x_data + s * eps
        target = eps - x_data
        dropped = drop_labels(cond, self.cfg.cond_drop_prob, nets.null_cond, generator)
        group = torch.full((B,), FM, device=device, dtype=torch.long)
        sigma_mid, sigma_next = sigma.clone(), sigma.clone()
        level = torch.full((B,), self.step_levels - 1, device=device, dtype=torch.long)  # FM: the top level
        info = {}
        if n_sc:
            sc_cond = cond[sc_idx] if self.cfg.guidance_scale != 1.0 else dropped[sc_idx]
            x_sc, sig_a, sig_mid, sig_next, tgt_sc, N = self.distill_targets(
                x_data[sc_idx], eps[sc_idx], sc_cond, nets, generator, n_teacher)
            x, target = x.index_copy(0, sc_idx, x_sc.to(x.dtype)), target.index_copy(0, sc_idx, tgt_sc.to(target.dtype))
            sigma, sigma_mid, sigma_next = (t.index_copy(0, sc_idx, v) for t, v in
                                            ((sigma, sig_a), (sigma_mid, sig_mid), (sigma_next, sig_next)))
            dropped = dropped.index_copy(0, sc_idx, sc_cond)
            group[sc_idx] = SC
            level[sc_idx] = torch.log2(N).round().long() - 1  # one jump = one cell of a grid of N/2
            info["sc_grid_mean"] = N.mean()
            info["sc_jump_mean"] = (sig_a - sig_next).mean()
        info["extra_forward_images"] = 2 * n_sc * (1 if self.cfg.guidance_scale == 1.0 else 2)
        extra = {"step_level": level} if self.step_levels else {}
        return Targets(x=x, sigma=sigma, cond=dropped, target=target, weight=torch.ones(B, device=device),
                       group=group, info=info, sigma_mid=sigma_mid, sigma_next=sigma_next,
                       extra_inputs={**extra, **jump_inputs(self.time_inputs, sigma_next)}, adaptive=self.adaptive)
