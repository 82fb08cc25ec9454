"""Run folders that never lose or mix data: the run.dir checks, a new run refused on (or moving
aside) another run's files, one writer per folder (a live holder refused, a dead or silent one
taken over), strict JSON in metrics.jsonl."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings

import pytest

from flowpre.data.shards import write_shards
from flowpre.train import run_folder
from flowpre.train.run_folder import LOCK, RunFolderError, RunLock, check_dir, move_aside, refuse_used

from helpers import TINY, env, metrics, train, write_empty_config


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    write_shards("digits", out, shard_size=200, split="train", limit=400)
    return str(out / "train-*.tar")


def strict_lines(path):
    """Every line of a JSONL file through a parser that refuses NaN and Infinity."""
    def refuse(word):
        raise ValueError(f"{path}: {word} is not JSON")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_lock(run, **holder):
    run.mkdir(parents=True, exist_ok=True)
    (run / LOCK).write_text(json.dumps({"token": os.urandom(4).hex(), **holder}))


# --- the folder ------------------------------------------------------------------------------

def test_run_dir_that_is_a_file_or_cannot_be_created(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(RunFolderError, match=f"run.dir={a_file} exists and is not a folder"):
        check_dir(a_file)
    with pytest.raises(RunFolderError, match="cannot be written"):
        check_dir(a_file / "run")  # a folder under a file cannot be made
    check_dir(tmp_path / "new" / "run")
    assert (tmp_path / "new" / "run").is_dir() and not any((tmp_path / "new" / "run").iterdir())


def test_used_folder_is_refused_or_moved_aside(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step000000003").mkdir(parents=True)
    (run / "checkpoints" / "step000000003" / "meta.json").write_text("{}")
    (run / "checkpoints" / "step000000006").mkdir()  # not complete: the newest complete one is named
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "config.yaml").write_text("run: {}\n")
    before = snapshot(run)
    with pytest.raises(RunFolderError) as e:
        refuse_used(run, overwrite=False)
    msg = str(e.value)
    assert f"run.dir={run}" in msg and "step000000003 (step 3)" in msg and "train.resume=auto" in msg
    assert "run.overwrite=true" in msg and "another run.dir" in msg
    assert snapshot(run) == before
    write_lock(run, host="h", pid=1)
    (run / "replaced-20000101T000000Z").mkdir()  # an earlier replacement stays where it is
    dest = refuse_used(run, overwrite=True)
    assert dest.parent == run and dest.name.startswith("replaced-")
    assert snapshot(dest) == before and (run / LOCK).is_file() and (run / "replaced-20000101T000000Z").is_dir()
    assert refuse_used(run, overwrite=False) is None  # nothing of a run left at the top
    assert move_aside(run) != dest  # a second replacement in the same second gets its own folder


# --- the lock --------------------------------------------------------------------------------

def test_lock_records_holder_beats_and_refuses_a_live_second_writer(tmp_path):
    lock = RunLock(tmp_path, timeout=0.4).acquire()
    held = json.loads((tmp_path / LOCK).read_text())
    assert held["host"] == socket.gethostname() and held["pid"] == os.getpid() and held["start"]
    lock.start_heartbeat()
    time.sleep(0.3)
    assert json.loads((tmp_path / LOCK).read_text())["heartbeat"] > held["heartbeat"]
    with pytest.raises(RunFolderError, match=f"pid {os.getpid()} on {socket.gethostname()}"):
        RunLock(tmp_path, timeout=0.4).acquire()  # this process is alive: refused at once
    lock.release()
    assert not (tmp_path / LOCK).exists()
    RunLock(tmp_path, timeout=0.4).acquire().release()


def test_lock_of_a_dead_process_here_is_taken_over_with_a_warning(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    write_lock(tmp_path, host=socket.gethostname(), pid=dead.pid, start="then", heartbeat=time.time())
    with pytest.warns(UserWarning, match=f"taking over the lock of pid {dead.pid} .*its process is gone"):
        lock = RunLock(tmp_path, timeout=1000).acquire()  # no waiting for a timeout
    assert json.loads((tmp_path / LOCK).read_text())["token"] == lock.token
    lock.release()


def test_lock_from_another_host(tmp_path):
    """Old heartbeat: stale at once. Fresh but standing still: stale after the timeout. Moving: refused."""
    write_lock(tmp_path, host="node-gone", pid=7, heartbeat=time.time() - 1000)
    with pytest.warns(UserWarning, match="pid 7 on node-gone.*no heartbeat for more than"):
        RunLock(tmp_path, timeout=60).acquire().release()

    write_lock(tmp_path, host="node-frozen", pid=8, heartbeat=time.time())
    t0 = time.monotonic()
    with pytest.warns(UserWarning, match="node-frozen.*stood still"):
        RunLock(tmp_path, timeout=1.0).acquire().release()
    assert time.monotonic() - t0 >= 1.0

    token, stop = "live", threading.Event()

    def beat():  # another node's flowpre, alive
        while not stop.wait(0.1):
            (tmp_path / LOCK).write_text(json.dumps({"token": token, "host": "node-live", "pid": 9,
                                                     "heartbeat": time.time()}))
    beat_thread = threading.Thread(target=beat)
    beat_thread.start()
    try:
        time.sleep(0.2)
        with pytest.raises(RunFolderError, match="being written by another run .pid 9 on node-live"):
            RunLock(tmp_path, timeout=5.0).acquire()
    finally:
        stop.set()
        beat_thread.join()


def test_holder_notices_its_lock_taken_over(tmp_path):
    lock = RunLock(tmp_path, timeout=0.4).acquire()
    lock.start_heartbeat()
    write_lock(tmp_path, host="node-b", pid=11, heartbeat=time.time())  # another run took it meanwhile
    time.sleep(0.3)
    with pytest.raises(RunFolderError, match="taken over by pid 11 on node-b"):
        run_folder.check_still_held(lock, tmp_path)
    lock.release()
    assert json.loads((tmp_path / LOCK).read_text())["host"] == "node-b"  # not removed: it is not ours


# --- end to end ------------------------------------------------------------------------------

def test_new_run_into_a_used_folder(tmp_path, digits):
    """A 4-step run (step 2's loss NaN, logged as null); the same command again is refused and changes
    nothing; run.overwrite=true moves it into replaced-*/ byte for byte and trains afresh."""
    run = tmp_path / "run"
    common = ["train.max_steps=4", "train.checkpoint_every=2"]
    train(run, digits, *common, extra_env={"FLOWPRE_FAULT_NAN_AT": "2"})
    first = strict_lines(run / "metrics.jsonl")
    assert [m["step"] for m in first] == [1, 2, 3, 4] and first[1]["loss"] is None
    assert first[1]["skipped_steps"] == 1 and all(isinstance(m["loss"], float) for m in first if m["step"] != 2)
    assert not (run / LOCK).exists()  # released at the end
    before = snapshot(run)

    r = train(run, digits, *common, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"run.dir={run} holds another run" in r.stderr and "step000000004 (step 4)" in r.stderr
    assert snapshot(run) == before and not (run / LOCK).exists()

    r = train(run, digits, *common, "run.overwrite=true")
    replaced = [p for p in run.iterdir() if p.name.startswith("replaced-")]
    assert len(replaced) == 1 and f"moved the previous run's files into {replaced[0]}" in r.stdout
    assert snapshot(replaced[0]) == before
    assert [m["step"] for m in strict_lines(run / "metrics.jsonl")] == [1, 2, 3, 4]
    assert (run / "checkpoints" / "step000000004" / "meta.json").is_file()

    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    r = train(a_file, digits, check=False)
    assert r.returncode == 2 and "exists and is not a folder" in r.stderr and "Traceback" not in r.stderr


def test_second_writer_refused_and_sigkilled_runs_lock_taken_over(tmp_path, digits):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "flowpre.cli", "train", "--config", str(write_empty_config(run)), f"run.dir={run}",
           f"data.shards={digits}", *TINY, "train.max_steps=100000", "train.checkpoint_every=2"]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env())
    try:
        deadline = time.time() + 300
        while time.time() < deadline and first.poll() is None and not (run / "checkpoints" / "step000000002").is_dir():
            time.sleep(0.1)
        assert first.poll() is None, "the first run ended early"
        holder = json.loads((run / LOCK).read_text())
        assert holder["pid"] == first.pid
        r = train(run, digits, "train.max_steps=100000", "train.resume=auto", check=False)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert f"is being written by another run (pid {first.pid} on {socket.gethostname()}" in r.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (run / LOCK).is_file()  # a SIGKILL leaves the lock behind
    newest = max(int(p.name[4:]) for p in (run / "checkpoints").glob("step*") if (p / "meta.json").is_file())
    r = train(run, digits, f"train.max_steps={newest + 2}", "train.checkpoint_every=2", "train.resume=auto")
    assert f"taking over the lock of pid {first.pid}" in r.stderr and "its process is gone" in r.stderr
    assert f"at step {newest}" in r.stdout and not (run / LOCK).exists()
    assert [m["step"] for m in metrics(run)] == list(range(1, newest + 3))
