"""Steps whose loss or gradient norm is not finite are skipped, on every rank alike.

A skipped step consumes its batch and counts as a step (the data position and the step
counter move on, as in Megatron), but nothing learns from it: no optimizer update, no LR
scheduler step, no EMA update. DeepSpeed's own overflow machinery does the bookkeeping:
its engine, when `optimizer.overflow` is set after a step, leaves the LR scheduler alone
and counts `engine.skipped_steps`, which its checkpoints carry, so resume stays exact.

Who notices what:
- ZeRO 1-3 in fp32 (0.19.8) already treat a non-finite global grad norm as an overflow:
  they skip the inner optimizer step, clear the gradients and set `overflow`, agreed
  across ranks (the norm is all-reduced).
- Everything else is ours. The inner (client) optimizer's `step` is wrapped: before it
  updates anything, the ranks all-reduce whether any rank saw a non-finite loss in this
  step's micro batches or holds a non-finite gradient in its part of the optimizer's
  parameters. That covers ZeRO-0 (plain data parallel: DeepSpeed checks nothing there) and
  a NaN loss whose gradients happen to be finite (e.g. masked out by a zero weight).
  On a skip the wrapper sets the engine's `optimizer.overflow`, so the engine treats it
  exactly like DeepSpeed's own.

The loss flag rides on the per-step all-reduce that also carries the preemption flag
(`agree`), so a skip costs no extra collective beyond the one in the wrapper.
"""
import functools
import math
import os

import torch

# Fault injection for tests: "STEP[:RANK],..." or "FIRST-LAST[:RANK]" makes the loss NaN at those
# steps (on that rank only, or on all). Read once when the run starts.
NAN_ENV = "FLOWPRE_FAULT_NAN_AT"


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps; the message names the step and the last good checkpoint."""


def parse_faults(text):
    """'3:1,7-9' -> {(3, 1), (7, None), (8, None), (9, None)}."""
    faults = set()
    for item in filter(None, (t.strip() for t in (text or "").split(","))):
        steps, _, rank = item.partition(":")
        first, _, last = steps.partition("-")
        try:
            lo, hi = int(first), int(last or first)
            who = int(rank) if rank else None
        except ValueError:
            raise ValueError(f"{NAN_ENV}={text!r}: expected STEP[-STEP][:RANK],... (got {item!r})") from None
        faults.update((s, who) for s in range(lo, hi + 1))
    return faults


def _all_reduce_max(t):
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t


class StepGuard:
    def __init__(self, engine, rank, max_consecutive, consecutive=0):
        self.engine, self.rank, self.max_consecutive = engine, rank, max_consecutive
        self.consecutive = consecutive  # carried in checkpoints
        self.faults = parse_faults(os.environ.get(NAN_ENV))
        self.loss_bad = None  # device flag over this step's micro batches
        self.loss_skip = False
        self.decided = None  # this step's decision once the inner optimizer was reached
        self.skipped_before = engine.skipped_steps
        inner = engine.basic_optimizer
        step = inner.step  # bound method (possibly the LR scheduler's wrapper); called through

        @functools.wraps(step)  # keeps the LR scheduler's marker that it wraps optimizer.step
        def guarded_step(*args, **kwargs):
            if self.decided is None:
                self.decided = self._decide(inner)
            if self.decided:
                return None
            return step(*args, **kwargs)

        inner.step = guarded_step  # instance attribute: not part of the optimizer's state_dict

    @property
    def total(self):
        """Skipped steps over the whole run (DeepSpeed's counter, carried in its checkpoints)."""
        return self.engine.skipped_steps

    def inject(self, loss, step):
        if (step, None) in self.faults or (step, self.rank) in self.faults:
            return loss * float("nan")
        return loss

    def observe(self, loss):
        bad = ~torch.isfinite(loss.detach())
        self.loss_bad = bad if self.loss_bad is None else self.loss_bad | bad

    def agree(self, stop_requested):
        """Once per step, before the optimizer step, on every rank: one all-reduce of (this step's loss
        was not finite somewhere, a rank was asked to stop). Returns whether to stop after this step."""
        local = torch.zeros(2, device=self.loss_bad.device)
        local[0] = self.loss_bad.float()
        local[1] = float(bool(stop_requested))
        loss_skip, stop = _all_reduce_max(local).tolist()
        self.loss_skip, self.loss_bad, self.decided = loss_skip > 0, None, None
        return stop > 0

    def _decide(self, inner):
        grads = [p.grad for g in inner.param_groups for p in g["params"] if p.grad is not None]
        bad = torch.zeros(1, device=grads[0].device if grads else "cpu")
        if grads:  # one fused norm per tensor; a non-finite element makes its norm non-finite
            norms = torch._foreach_norm(grads)
            bad[0] = (~torch.isfinite(torch.stack(norms).float())).any().float()
        skip = self.loss_skip or bool(_all_reduce_max(bad).item())
        self.engine.optimizer.overflow = skip  # the engine then skips the LR scheduler and counts it
        return skip

    def finish(self, step, last_checkpoint):
        """After the step: was it skipped? Stops the run after too many in a row (`last_checkpoint`:
        a callable giving the newest complete checkpoint, for the message)."""
        skipped = self.engine.skipped_steps > self.skipped_before
        self.skipped_before = self.engine.skipped_steps
        self.consecutive = self.consecutive + 1 if skipped else 0
        if skipped and self.rank == 0:
            why = "loss" if self.loss_skip else "gradient norm"
            print(f"flowpre: step {step} skipped: non-finite {why} on at least one rank; no optimizer, LR or "
                  f"EMA update ({self.consecutive} in a row, {self.total} in this run)", flush=True)
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"step {step}: {self.consecutive} consecutive steps had a non-finite loss or gradient norm "
                f"(train.max_skipped_steps={self.max_consecutive}); stopping. Last good checkpoint: "
                f"{last_checkpoint() or 'none'} (resume from it with a lower train.lr or more train.warmup_steps)")
        return skipped


def finite_or_none(x):
    """For metrics.jsonl: a non-finite float becomes null (JSON has no NaN)."""
    return float(x) if x is not None and math.isfinite(float(x)) else None
