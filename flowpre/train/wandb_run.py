"""Weights & Biases logging (`logging.wandb: off | offline | online`), main rank only.

The wandb run id is stored in every checkpoint, so a resumed run continues the same
wandb run instead of starting a new one. wandb's files go inside the run folder.
"""
import os
import secrets

from flowpre.config import to_dict


class WandbRun:
    def __init__(self, cfg, run_dir, enabled, resume_id=None):
        self.run = None
        if cfg.logging.wandb == "off" or not enabled:
            return
        os.environ.setdefault("WANDB_DIR", str(run_dir))
        os.environ.setdefault("WANDB_CACHE_DIR", str(run_dir / "wandb" / "cache"))
        os.environ.setdefault("WANDB_CONFIG_DIR", str(run_dir / "wandb" / "config"))
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
        tags = [t.strip() for t in cfg.logging.tags.split(",") if t.strip()]
        self.run = wandb.init(project=cfg.logging.project, name=cfg.logging.name or run_dir.name, tags=tags,
                              id=resume_id or secrets.token_hex(4), resume="allow", dir=str(run_dir),
                              mode=cfg.logging.wandb, config=to_dict(cfg))

    @property
    def id(self):
        return self.run.id if self.run else None

    def log(self, record, images=()):
        if not self.run:
            return
        import wandb
        data = {k: v for k, v in record.items() if k != "step" and v is not None}
        for path in images:  # samples/step0000500_n4.png -> samples/n4
            data[f"samples/{path.stem.split('_')[-1]}"] = wandb.Image(str(path))
        self.run.log(data, step=record["step"])

    def finish(self):
        if self.run:
            self.run.finish()
