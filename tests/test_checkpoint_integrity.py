"""Damaged checkpoints: sizes and SHA-256 in meta.json; resume=auto falls back past a damaged
checkpoint, an explicit resume path to one is an error naming the file, old checkpoints load."""
import hashlib
import json
import os
import random

import pytest

from flowpre.data.shards import write_shards
from flowpre.train.integrity import DamagedCheckpoint, check, manifest, problems

from helpers import train


def test_manifest_catches_truncation_flip_and_loss(tmp_path):
    rng = random.Random(0)
    folder = tmp_path / "step000000002"
    (folder / "sub").mkdir(parents=True)
    blobs = {"a.pt": rng.randbytes(5000), "sub/b.pt": rng.randbytes(333), "c.pt": rng.randbytes(1)}
    for name, data in blobs.items():
        (folder / name).write_bytes(data)
    files = manifest(folder)
    assert files == {n: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in blobs.items()}
    assert [f for f, _ in problems(folder)] == [str(folder / "meta.json")]  # no meta.json yet: unreadable
    (folder / "meta.json").write_text(json.dumps({"step": 2, "files": files}))
    assert problems(folder) == []
    check(folder)

    data = bytearray(blobs["a.pt"])
    i = rng.randrange(len(data))
    data[i] ^= 1 << rng.randrange(8)  # one bit: same size, different hash
    (folder / "a.pt").write_bytes(bytes(data))
    with open(folder / "sub" / "b.pt", "r+b") as f:
        f.truncate(100)
    os.remove(folder / "c.pt")
    found = dict(problems(folder))
    assert set(found) == {str(folder / n) for n in blobs}
    assert "corrupted" in found[str(folder / "a.pt")] and "truncated" in found[str(folder / "sub" / "b.pt")]
    assert found[str(folder / "c.pt")] == "missing"
    with pytest.raises(DamagedCheckpoint, match="a.pt"):
        check(folder)

    (folder / "meta.json").write_text(json.dumps({"step": 2}))  # written before checksums existed
    assert problems(folder) is None
    with pytest.warns(UserWarning, match="cannot be verified"):
        check(folder)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    write_shards("digits", out, shard_size=200, split="train", limit=400)
    return str(out / "train-*.tar")


def _flip_byte(path, seed):
    data = bytearray(path.read_bytes())
    i = random.Random(seed).randrange(len(data))
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_resume_falls_back_past_damaged_checkpoints(tmp_path, digits):
    run = tmp_path / "run"
    common = ["train.checkpoint_every=2", "train.keep_checkpoints=3"]
    train(run, digits, "train.max_steps=6", *common)
    ck = run / "checkpoints"
    meta6 = json.loads((ck / "step000000006" / "meta.json").read_text())
    assert {"flowpre_shared.pt", "flowpre_rank00000.pt", "mp_rank_00_model_states.pt"} <= set(meta6["files"])
    assert all(len(v["sha256"]) == 64 and v["size"] > 0 for v in meta6["files"].values())

    truncated = ck / "step000000006" / "mp_rank_00_model_states.pt"
    with open(truncated, "r+b") as f:
        f.truncate(truncated.stat().st_size // 2)
    optim = next((ck / "step000000004").glob("*optim_states.pt"))
    _flip_byte(optim, 1)
    meta2 = json.loads((ck / "step000000002" / "meta.json").read_text())
    del meta2["files"]  # as an older flowpre wrote it
    (ck / "step000000002" / "meta.json").write_text(json.dumps(meta2))

    r = train(run, digits, "train.max_steps=8", f"train.resume={ck / 'step000000006'}", *common, check=False)
    assert r.returncode != 0 and str(truncated) in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]

    r = train(run, digits, "train.max_steps=8", "train.resume=auto", *common)
    assert str(truncated) in r.stderr and str(optim) in r.stderr and "cannot be verified" in r.stderr
    assert "resumed from" in r.stdout and "step000000002 at step 2" in r.stdout
    assert (ck / "step000000008" / "meta.json").is_file()


def test_every_checkpoint_damaged_is_a_named_error(tmp_path):
    """resume=auto with no intact checkpoint left stops (the CLI prints it cleanly) instead of starting over."""
    from flowpre.train.checkpoint import resolve_resume

    for step in (2, 4):
        folder = tmp_path / "checkpoints" / f"step{step:09d}"
        folder.mkdir(parents=True)
        (folder / "flowpre_shared.pt").write_bytes(bytes(range(200)))
        (folder / "meta.json").write_text(json.dumps({"step": step, "files": manifest(folder)}))
        (folder / "flowpre_shared.pt").write_bytes(bytes(range(100)))  # truncated after the fact
    with pytest.raises(DamagedCheckpoint, match="every checkpoint"):
        resolve_resume("auto", tmp_path)
