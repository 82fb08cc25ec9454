"""Training objectives, all with the signature of base.py."""
from .base import FM, GROUPS, SC, Nets, Targets
from .flow_matching import FlowMatching
from .meanflow import MeanFlow
from .scfm import SCFM
from .shortcut import Shortcut


def build(cfg, time_inputs=1, max_steps=None):
    """The objective named by `cfg.name` (the `objective` section of the config), for a DiT with
    `time_inputs` time inputs (model.time_inputs); `max_steps` (train.max_steps) sizes
    objective.curriculum, whose schedule is in fractions of it."""
    if cfg.name == "fm":
        return FlowMatching(cfg, time_inputs)
    if cfg.name == "scfm":
        return SCFM(cfg, time_inputs)
    if cfg.name == "shortcut":
        return Shortcut(cfg, time_inputs)
    if cfg.name in ("meanflow", "meanflow_fd"):
        return MeanFlow(cfg, time_inputs, finite_difference=cfg.name == "meanflow_fd", max_steps=max_steps)
    raise ValueError(f"objective.name: {cfg.name!r} is not implemented yet")


__all__ = ["build", "Nets", "Targets", "GROUPS", "FM", "SC", "FlowMatching", "MeanFlow", "SCFM", "Shortcut"]
