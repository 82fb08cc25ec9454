"""The flow-map curriculum (`objective.curriculum`): start as flow matching, widen the jumps.

In fractions of train.max_steps: for the first `curriculum_warmup` of training every sample
is flow matching (r = t); over the next `curriculum_ramp` the jump share rises linearly from
0 to its final 1 - fm_fraction and the largest allowed jump t - r from 0 to 1; after that the
objective is the plain one. Why: the instantaneous velocity must form first, and long-jump
supervision early on damages it (Kim et al. 2511.19065; AlphaFlow, SoFlow's annealed gap).

A pure function of the step, so a resumed run (which restores the step) continues it exactly,
whatever the world size. Step None (a caller outside training: benchmarks, probes) means the
schedule is over, i.e. the plain objective.

How the jump cap is applied (a choice; the papers differ): each jump is scaled,
t - r -> max_jump * (t - r), rather than clamped at max_jump, so the jump lengths keep their
distribution's shape with no pile-up at the cap.
"""
from __future__ import annotations

from flowpre.config import ConfigError


class Curriculum:
    def __init__(self, cfg, max_steps):
        if max_steps is None or max_steps < 1:
            raise ConfigError(f"objective.curriculum needs train.max_steps (got {max_steps!r})")
        if cfg.curriculum_warmup + cfg.curriculum_ramp > 1:
            raise ConfigError(f"objective.curriculum_warmup + objective.curriculum_ramp must be <= 1 "
                              f"(got {cfg.curriculum_warmup} + {cfg.curriculum_ramp})")
        self.final_share = 1.0 - cfg.fm_fraction
        self.warmup, self.ramp, self.max_steps = cfg.curriculum_warmup, cfg.curriculum_ramp, max_steps

    def progress(self, step):
        """0 during the warm-up, rising linearly to 1 at its end + the ramp, 1 after (and for None)."""
        if step is None:
            return 1.0
        done = step / self.max_steps
        if done <= self.warmup:
            return 0.0
        if self.ramp == 0:
            return 1.0
        return min(1.0, (done - self.warmup) / self.ramp)

    def at(self, step):
        """(jump_share, max_jump) at training step `step` (1-based, as the loop counts)."""
        p = self.progress(step)
        return self.final_share * p, p


class NoCurriculum:
    """The plain objective at every step: the configured jump share, jumps up to the whole range."""

    def __init__(self, cfg):
        self.final_share = 1.0 - cfg.fm_fraction

    def at(self, step):
        return self.final_share, 1.0


def schedule(cfg, max_steps):
    return Curriculum(cfg, max_steps) if cfg.curriculum else NoCurriculum(cfg)
