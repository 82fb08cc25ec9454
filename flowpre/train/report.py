"""Where a logged step goes: metrics.jsonl, the console (line or progress bar), wandb.

Only the main rank writes. Throughput and MFU come from the Meter; the objective's
extra no-grad forwards are reported as `objective_overhead` (their FLOPs over the
student's forward + backward FLOPs), separate from MFU, which counts the student only.
"""
import sys
import time

from .metrics import MetricsLog
from .wandb_run import WandbRun


class Reporter:
    def __init__(self, cfg, run_dir, is_main, start_step, resumed, wandb_id=None):
        self.is_main, self.max_steps, self.start_step = is_main, cfg.train.max_steps, start_step
        self.metrics = MetricsLog(run_dir, is_main, resume_step=start_step if resumed else None)
        self.wandb = WandbRun(cfg, run_dir, is_main, resume_id=wandb_id)
        show = cfg.logging.progress == "on" or (cfg.logging.progress == "auto" and sys.stderr.isatty())
        self.bar = None
        if is_main and show:
            from tqdm import tqdm
            self.bar = tqdm(total=self.max_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self.t0 = time.perf_counter()

    def advance(self):
        if self.bar:
            self.bar.update(1)

    def eta_s(self, step):
        done = step - self.start_step
        return (time.perf_counter() - self.t0) / done * (self.max_steps - step) if done else None

    def log(self, record, images=()):
        if not self.is_main:
            return
        record["eta_s"] = self.eta_s(record["step"])
        self.metrics.write(record)
        self.wandb.log(record, images)
        line = (f"step {record['step']:>7d} | loss {record['loss']:.4f} | {record['samples_per_s']:.1f} img/s"
                + (f" | MFU {record['mfu']:.1%}" if record.get("mfu") else "")
                + (f" | ETA {record['eta_s'] / 60:.1f} min" if record["eta_s"] is not None else ""))
        if self.bar:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['samples_per_s']:.1f}")
            self.bar.write(line)
        else:
            print(line, flush=True)

    def images(self, step, paths):
        if self.is_main and paths:
            self.wandb.log({"step": step}, paths)

    def close(self):
        if self.bar:
            self.bar.close()
        self.wandb.finish()
