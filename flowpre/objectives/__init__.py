"""Training objectives, all with the signature of base.py."""
from .base import FM, GROUPS, SC, Nets, Targets
from .flow_matching import FlowMatching
from .scfm import SCFM
from .shortcut import Shortcut


def build(cfg):
    """The objective named by `cfg.name` (the `objective` section of the config)."""
    if cfg.name == "fm":
        return FlowMatching(cfg)
    if cfg.name == "scfm":
        return SCFM(cfg)
    if cfg.name == "shortcut":
        return Shortcut(cfg)
    raise ValueError(f"objective.name: {cfg.name!r} is not implemented yet")


__all__ = ["build", "Nets", "Targets", "GROUPS", "FM", "SC", "FlowMatching", "SCFM", "Shortcut"]
