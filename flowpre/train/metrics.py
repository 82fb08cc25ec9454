"""Training metrics: device-side accumulation (no host sync per step), metrics.jsonl,
throughput and MFU.

MFU counts only the student's forward + backward (3x the forward FLOPs per image);
the objective's extra no-grad forwards are reported separately as `teacher_flops_ratio`.
"""
import json
import time
from pathlib import Path

import torch

from flowpre import strict_json

from .distributed import all_reduce_sum

# dense bf16 peak per GPU, FLOP/s (TARGETS.md)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "GH200": 989e12}


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16.items():
        if key in name:
            return peak
    return None


class MetricsLog:
    """Appends one JSON object per logged step to RUN/metrics.jsonl (main rank only)."""

    def __init__(self, run_dir, enabled, resume_step=None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        if enabled and resume_step is not None and self.path.exists():
            # drop what was logged after the checkpoint we resume from: it will be redone
            keep = [l for l in self.path.read_text().splitlines() if l and json.loads(l)["step"] <= resume_step]
            self.path.write_text("".join(l + "\n" for l in keep))

    def write(self, record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(strict_json.dumps(record) + "\n")  # a skipped step's NaN loss: null


class Meter:
    """Sums losses per group on the device; `read()` syncs once per log interval."""

    def __init__(self, device, groups):
        self.device, self.groups = device, tuple(groups)
        self.reset()

    def reset(self):
        self.loss = torch.zeros((), device=self.device)
        self.group_sum = torch.zeros(len(self.groups), device=self.device)
        self.group_count = torch.zeros(len(self.groups), device=self.device)
        self.micro_steps = 0
        self.samples = 0
        self.t0 = time.perf_counter()

    def add(self, loss, group_losses, group, batch_size):
        counts = torch.bincount(group, minlength=len(self.groups)).float()
        self.loss += loss.detach()
        self.group_sum += group_losses.detach().float() * counts
        self.group_count += counts
        self.micro_steps += 1
        self.samples += batch_size

    def read(self, world_size):
        """Means over the interval and over ranks; samples_per_s over all ranks."""
        packed = all_reduce_sum(torch.cat([self.loss[None], self.group_sum, self.group_count]))
        packed = packed.tolist()
        elapsed = time.perf_counter() - self.t0
        n = len(self.groups)
        sums, counts = packed[1:1 + n], packed[1 + n:]
        out = {"loss": packed[0] / max(self.micro_steps * world_size, 1)}
        sc = [i for i, g in enumerate(self.groups) if g.startswith("sc")]
        sc_count = sum(counts[i] for i in sc)
        out["loss_fm"] = sums[0] / counts[0] if counts[0] > 0 else None
        out["loss_sc"] = sum(sums[i] for i in sc) / sc_count if sc_count > 0 else None
        for i, g in enumerate(self.groups):
            if g not in ("fm", "sc"):
                out[f"loss_{g}"] = sums[i] / counts[i] if counts[i] > 0 else None
        out["samples_per_s"] = self.samples * world_size / elapsed
        return out
