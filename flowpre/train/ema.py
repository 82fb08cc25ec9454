"""fp32 exponential moving averages of the student (a fast and a slow one).

METHOD.md: both EMAs are fp32 whatever the training precision (a bf16 EMA with decay
0.999 stops moving: 0.001 * update falls below bf16's resolution), start as copies of
the student, are updated after every optimizer step, and may be restarted (student
copied in) every K steps.

Under ZeRO-3 the student's parameters are partitioned across ranks; the update
gathers them one child module at a time (bounded memory) so every rank's EMA sees the
full, current weights and all ranks hold identical EMAs.
"""
import contextlib
import copy

import torch


def _gathered(params, zero3):
    if not zero3:
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _student_chunks(module):
    """(ema-side name prefix, parameters) per top-level child, for chunked gathering."""
    for name, child in module.named_children():
        params = list(child.named_parameters())
        if params:
            yield name, params
    own = list(module.named_parameters(recurse=False))
    if own:
        yield "", own


class DualEma:
    def __init__(self, student, fast_decay=0.99, slow_decay=0.999, restart_every=0):
        """`student` must not be partitioned yet: build before deepspeed.initialize."""
        self.decays = {"fast": fast_decay, "slow": slow_decay}
        self.restart_every = restart_every
        self.nets = {k: copy.deepcopy(student).float().requires_grad_(False).eval() for k in self.decays}

    @property
    def fast(self):
        return self.nets["fast"]

    @property
    def slow(self):
        return self.nets["slow"]

    @torch.no_grad()
    def update(self, student, step, zero3=False):
        """Call after optimizer step `step` (1-based) with the engine's module."""
        restart = self.restart_every > 0 and step % self.restart_every == 0
        targets = {k: dict(net.named_parameters()) for k, net in self.nets.items()}
        for prefix, named in _student_chunks(student):
            params = [p for _, p in named]
            with _gathered(params, zero3):
                names = [f"{prefix}.{n}" if prefix else n for n, _ in named]
                src = [p.detach().float() for p in params]
                for key, decay in self.decays.items():
                    dst = [targets[key][n] for n in names]
                    if restart:
                        torch._foreach_copy_(dst, src)
                    else:
                        torch._foreach_lerp_(dst, src, 1.0 - decay)

    def state_dict(self):
        return {k: net.state_dict() for k, net in self.nets.items()}

    def load_state_dict(self, state):
        for k, net in self.nets.items():
            net.load_state_dict(state[k])

    def distance_to(self, student, zero3=False):
        """Relative L2 distance of each EMA to the student (a health signal for logging)."""
        sq = {k: 0.0 for k in self.nets}
        norm = 0.0
        targets = {k: dict(net.named_parameters()) for k, net in self.nets.items()}
        with torch.no_grad():
            for prefix, named in _student_chunks(student):
                with _gathered([p for _, p in named], zero3):
                    for n, p in named:
                        full = f"{prefix}.{n}" if prefix else n
                        pf = p.detach().float()
                        norm += pf.pow(2).sum()
                        for k in self.nets:
                            sq[k] += (targets[k][full] - pf).pow(2).sum()
        return {k: float((v / max(float(norm), 1e-30)) ** 0.5) for k, v in sq.items()}
