"""The one signature every objective shares.

    targets = objective(batch, nets, generator, step=None)

batch:  {"x": (B, C, H, W) data in [-1, 1], "cond": (B,) class ids or (B, T, D) text encodings}
nets:   Nets(student, ema_fast, ema_slow, teacher, null_cond); each network is a
        callable (x, sigma, cond, **extra) -> velocity, so tests can pass analytic fields
step:   the training step (1-based), for objectives whose targets follow a schedule
        (objective.curriculum); None outside training, meaning the end of any schedule
Each objective also names its loss groups (`groups`, group 0 is always "fm"; names
starting with "sc" are summed into loss_sc) and the step-size levels its DiT needs
(`step_levels`, 0 for none). It returns Targets; the training loop regresses student(x, sigma, cond, **extra_inputs)
onto target with flow_loss(targets.loss_weight(pred), group) and knows nothing else about the objective.

Two-time models (model.time_inputs=2, METHOD.md section 8) take `sigma_end`, the end of the
jump, as an extra input: every objective puts the end of the student's jump there
(sigma_next; sigma itself for flow-matching samples) through `jump_inputs`.
"""
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

GROUPS = ("fm", "sc")  # group ids: 0 = flow matching, 1 = self-distillation / bootstrap
FM, SC = 0, 1


@dataclass
class Nets:
    student: Callable
    ema_fast: Optional[Callable] = None
    ema_slow: Optional[Callable] = None
    teacher: Optional[Callable] = None
    null_cond: object = None  # the CFG null condition: a class id, or a (T, D) text encoding


@dataclass
class Targets:
    x: torch.Tensor  # (B, C, H, W) network input
    sigma: torch.Tensor  # (B,)
    cond: torch.Tensor  # (B,) or (B, T, D), after label dropout
    target: torch.Tensor  # (B, C, H, W) velocity to regress
    weight: torch.Tensor  # (B,)
    group: torch.Tensor  # (B,) int64, index into GROUPS
    extra_inputs: dict = field(default_factory=dict)  # more model inputs (shortcut's step level)
    info: dict = field(default_factory=dict)  # scalars to log, as tensors (no host sync)
    sigma_mid: Optional[torch.Tensor] = None  # (B,) self-distillation: fine midpoint
    sigma_next: Optional[torch.Tensor] = None  # (B,) end of the student's jump
    adaptive: Optional[tuple] = None  # (p, c) of the adaptive loss weight, None = weight as given

    def loss_weight(self, pred):
        """Per-sample loss weights (B,): `weight`, times stopgrad(1 / (mse_i + c)^p) when adaptive
        (METHOD.md section 8). Needs the prediction, so the loop asks for it after the forward.
        Logs the batch's plain MSE and mean adaptive weight, since the weighted loss is near 1."""
        if self.adaptive is None:
            return self.weight
        p, c = self.adaptive
        with torch.no_grad():
            mse = (pred.detach().float() - self.target.float()).pow(2).flatten(1).mean(1)
            scale = (mse + c).pow(-p)
        self.info["loss_mse"] = mse.mean()
        self.info["adaptive_weight_mean"] = scale.mean()
        return self.weight * scale


def adaptive_weighting(cfg, default):
    """(p, c) when `objective.loss_weighting` asks for the adaptive weight, else None;
    `default` decides "auto" (True for the MeanFlow objectives, which are trained with it)."""
    if cfg.loss_weighting == "adaptive" or (cfg.loss_weighting == "auto" and default):
        return (cfg.loss_weight_p, cfg.loss_weight_c)
    return None


def jump_inputs(time_inputs, sigma_end):
    """The model input naming the jump's end, for two-time models only."""
    return {"sigma_end": sigma_end} if time_inputs == 2 else {}


def bare_module(net):
    """The nn.Module behind a DeepSpeed engine (function transforms and no-grad side forwards
    must not go through the engine's forward bookkeeping)."""
    return getattr(net, "module", net)


def drop_labels(cond, prob, null_cond, generator):
    """Replace each sample's condition by the null condition with probability `prob` (trains CFG)."""
    from flowpre.sampling import null_like

    if prob == 0:
        return cond
    if null_cond is None:
        raise ValueError("label dropout needs nets.null_cond")
    drop = torch.rand(cond.shape[:1], device=cond.device, generator=generator) < prob
    return torch.where(drop.view(-1, *[1] * (cond.ndim - 1)), null_like(cond, null_cond), cond)
