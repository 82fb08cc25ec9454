"""wandb in offline mode: files in the run folder, one run id across a resume."""
import torch

from flowpre.data.shards import write_shards

from helpers import metrics, train


def test_wandb_offline_and_resume_keeps_run_id(tmp_path):
    digits = tmp_path / "digits"
    write_shards("digits", digits, shard_size=100, limit=200)
    run = tmp_path / "run"
    common = ["logging.wandb=offline", "logging.project=flowpre-test", "logging.tags=ci,tiny", "train.log_every=2",
              "sample.every=2", "train.checkpoint_every=2"]
    train(run, str(digits / "train-*.tar"), "train.max_steps=2", *common)
    shared = torch.load(run / "checkpoints" / "step000000002" / "flowpre_shared.pt", weights_only=False)
    run_id = shared["wandb_id"]
    assert run_id and len(list((run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))) == 1
    train(run, str(digits / "train-*.tar"), "train.max_steps=4", "train.resume=auto", *common)
    # the resumed process appended to the same wandb run id
    assert len(list((run / "wandb").glob(f"offline-run-*-{run_id}"))) == 2
    assert not [p for p in (run / "wandb").glob("offline-run-*") if not p.name.endswith(run_id)]
    m = metrics(run)
    for key in ("loss", "lr", "samples_per_s", "grad_norm", "ema_dist_slow", "eta_s"):
        assert key in m[-1]
