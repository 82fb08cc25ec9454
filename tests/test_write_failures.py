"""Writes that fail half way (a full disk, an injected ENOSPC): a checkpoint that cannot be written
stops the run with one line naming the file and the free space, removes its half-written folder and
leaves the previous checkpoint loadable; an export that fails leaves the previous file as it was."""
import errno
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowpre import weights as weights_layer
from flowpre.data.shards import write_shards
from flowpre.export import export

from helpers import TINY, env, free_port, train, weights, write_empty_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    write_shards("digits", out, shard_size=200, split="train", limit=400)
    return str(out / "train-*.tar")


def leftovers(folder):
    return sorted(p.name for p in Path(folder).rglob("*") if p.name.startswith(".") and p.name.endswith("tmp")
                  or p.name.startswith(".tmp-step"))


def test_checkpoint_write_failure_keeps_previous_and_export_is_atomic(tmp_path, digits, monkeypatch):
    run = tmp_path / "run"
    common = ["train.max_steps=6", "train.checkpoint_every=2"]
    r = train(run, digits, *common, extra_env={"FLOWPRE_FAULT_WRITE_FAIL_AT_CHECKPOINT": "4"}, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stdout[-2000:] + r.stderr[-3000:]
    line = [l for l in r.stderr.splitlines() if "flowpre train: error:" in l]
    assert len(line) == 1, r.stderr[-3000:]
    ckpts = run / "checkpoints"
    assert str(ckpts / ".tmp-step000000004" / "flowpre_rank00000.pt") in line[0] and "No space left" in line[0]
    assert "MiB free there" in line[0] and f"previous checkpoint {ckpts / 'step000000002'} is intact" in line[0]
    assert not (ckpts / "step000000004").exists() and leftovers(run) == []
    assert not (run / "flowpre.lock").exists()

    out = tmp_path / "w.safetensors"
    export(run, out)  # the previous checkpoint verifies and exports
    good = out.read_bytes()
    assert weights(out)

    def fails_half_way(tensors, filename, metadata=None):  # safetensors' writer hitting a full disk
        Path(filename).write_bytes(good[: len(good) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", filename)
    monkeypatch.setattr(weights_layer, "save_file", fails_half_way)
    with pytest.raises(OSError, match="No space left"):
        export(run, out, ema="fast")
    assert out.read_bytes() == good and leftovers(tmp_path) == []
    monkeypatch.undo()

    r = train(run, digits, *common, "train.resume=auto")  # space again: it continues from step 2
    assert "at step 2" in r.stdout and (ckpts / "step000000006" / "meta.json").is_file()


def test_checkpoint_write_failure_on_one_rank_stops_both(tmp_path, digits):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "-m", "flowpre.cli", "train", "--config", str(write_empty_config(run)),
           f"run.dir={run}", f"data.shards={digits}", *TINY, "train.max_steps=4", "train.checkpoint_every=2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                       env=env(FLOWPRE_FAULT_WRITE_FAIL_AT_CHECKPOINT="4:1"))
    assert r.returncode != 0
    errors = [l for l in r.stderr.splitlines() if "flowpre train: error: checkpoint not written" in l]
    assert len(errors) == 2 and all("flowpre_rank00001.pt" in l for l in errors), r.stderr[-4000:]
    assert (run / "checkpoints" / "step000000002" / "meta.json").is_file()
    assert not (run / "checkpoints" / "step000000004").exists() and leftovers(run) == []


def test_an_error_is_one_write_so_ranks_do_not_merge_their_lines(tmp_path, monkeypatch):
    """Both ranks of the test above print their error to one stderr. Under PYTHONUNBUFFERED (the
    tests' and many SLURM scripts' setting) print() wrote the text and its newline apart, and one
    loaded run joined the two ranks' lines into one: each error must be a single write."""
    from flowpre import cli

    class Recorder:
        def __init__(self):
            self.writes = []

        def write(self, text):
            self.writes.append(text)
            return len(text)

        def flush(self):
            pass

    stderr = Recorder()
    monkeypatch.setattr(sys, "stderr", stderr)
    with pytest.raises(SystemExit):
        cli.main(["train", "--config", str(tmp_path / "missing.yaml")])
    errors = [w for w in stderr.writes if "flowpre train: error:" in w]
    assert len(errors) == 1 and errors[0].endswith("\n") and "missing.yaml" in errors[0], stderr.writes


def _can_mount_tmpfs(where):
    where.mkdir()
    r = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {where}"],
                       capture_output=True)
    return shutil.which("unshare") and r.returncode == 0


def test_full_tmpfs_during_a_checkpoint(tmp_path, digits):
    """A real full disk: a run whose checkpoints (about 1.3 MB each) fill a 6 MB tmpfs, mounted in a
    user and mount namespace of its own (skipped where the machine does not allow one)."""
    disk = tmp_path / "disk"
    if not _can_mount_tmpfs(disk):
        pytest.skip("cannot mount a tmpfs here (no user namespaces)")
    run, out = disk / "run", tmp_path / "w.safetensors"
    args = [f"run.dir={run}", f"data.shards={digits}", *TINY, "train.max_steps=20", "train.checkpoint_every=1",
            "train.keep_checkpoints=20", "train.final_checkpoint=false"]
    config = write_empty_config(tmp_path / "c")
    script = (f"mount -t tmpfs -o size=6m tmpfs {disk} && "
              f"{sys.executable} -m flowpre.cli train --config {config} {' '.join(args)} 2>{tmp_path}/err; "
              f"echo rc=$? > {tmp_path}/rc; ls -a {run}/checkpoints > {tmp_path}/ls; "
              f"{sys.executable} -m flowpre.cli export --run {run} --out {out} > {tmp_path}/export 2>&1")
    subprocess.run(["unshare", "-rm", "sh", "-c", script], timeout=600, env=env(), check=False)
    err, listing = (tmp_path / "err").read_text(), (tmp_path / "ls").read_text().split()
    assert (tmp_path / "rc").read_text().strip() == "rc=2" and "Traceback" not in err, err[-3000:]
    line = next(l for l in err.splitlines() if "flowpre train: error:" in l)
    assert "checkpoint not written" in line and "MiB free there" in line and str(run / "checkpoints") in line
    assert not [n for n in listing if n.startswith(".tmp-step")], listing
    saved = sorted(int(n[4:]) for n in listing if n.startswith("step"))
    assert saved and saved[-1] < 20
    assert f"(step {saved[-1]}," in (tmp_path / "export").read_text()  # the newest one is complete
    assert all(torch.isfinite(t).all() for t in weights(out).values())
