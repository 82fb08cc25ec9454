"""Run folders that never lose or mix data: one writer at a time, no run on top of another's files.

Before anything is written, rank 0 (the only rank that writes the folder's shared files):

1. checks `run.dir` itself: it must be a folder (created if missing) that this process can write;
2. takes the folder's lock, `flowpre.lock`: a JSON record of its holder (host, pid, start time,
   a heartbeat refreshed every `run.lock_timeout / 8` seconds while training, a random token).
   The file is created with a hard link of a complete temporary file, which fails if the lock
   exists (atomic on local filesystems and on NFS, unlike O_EXCL on old NFS clients). A lock
   that exists is
   - live, and the new run is refused naming its holder, when its process runs on this host,
     or, on another host, when its heartbeat is newer than `run.lock_timeout` or moves while
     we watch it for up to that long (watching, not comparing clocks: nodes' clocks differ);
   - stale, and taken over with a warning naming the old holder, when its process on this host
     is gone (a SIGKILL, an OOM kill: no need to wait) or its heartbeat stood still for
     `run.lock_timeout` (a node lost, a job killed by the scheduler);
3. with `train.resume=none`, refuses a folder holding another run's state (checkpoints, metrics,
   a config), naming its newest checkpoint, unless `run.overwrite=true`, which first moves the
   old contents into `run.dir/replaced-<UTC time>/` (nothing is deleted).

A holder that finds its lock taken over (it was stalled longer than the timeout, e.g. suspended)
stops at its next checkpoint instead of writing into a folder that is no longer its own.
"""
import datetime
import json
import os
import socket
import threading
import time
import warnings
from pathlib import Path

from flowpre.atomic import temporary_sibling, write_text

from .checkpoint import checkpoints_root, complete_checkpoints
from .distributed import broadcast_from_main

LOCK = "flowpre.lock"
REPLACED = "replaced-"
RUN_FILES = ("config.yaml", "metrics.jsonl")  # with checkpoints/: what makes a folder another run's


class RunFolderError(RuntimeError):
    """A run folder that cannot be used as asked; the message names it and the ways on."""


# --- the folder ------------------------------------------------------------------------

def check_dir(run_dir):
    """`run.dir` exists as a folder this process can create files in (a real probe: access()
    answers for the local permission bits, which root-squashed NFS does not honour)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"run.dir={run_dir} exists and is not a folder: choose another run.dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = temporary_sibling(run_dir / "write-probe")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise RunFolderError(f"run.dir={run_dir} cannot be written ({e.strerror or e}): choose another "
                             "run.dir or fix its permissions") from None


def run_state(run_dir):
    """What another run left in `run_dir`: the names of its files, [] when there is none."""
    run_dir = Path(run_dir)
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    root = checkpoints_root(run_dir)
    if root.is_dir() and any(root.iterdir()):
        found.append("checkpoints/")
    return found


def describe_state(run_dir):
    ckpts = complete_checkpoints(run_dir)
    newest = f"newest checkpoint {ckpts[-1][1]} (step {ckpts[-1][0]})" if ckpts else "no complete checkpoint"
    return f"{newest}; {', '.join(run_state(run_dir))}"


def move_aside(run_dir):
    """Every entry of `run_dir` but the lock and earlier replaced-* folders into a new
    `replaced-<UTC time>/` inside it (renames within one folder: nothing is copied or deleted)."""
    run_dir = Path(run_dir)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dest, n = run_dir / f"{REPLACED}{stamp}", 1
    while dest.exists():
        n += 1
        dest = run_dir / f"{REPLACED}{stamp}-{n}"
    dest.mkdir()
    for entry in sorted(run_dir.iterdir()):
        if entry == dest or entry.name == LOCK or entry.name.startswith((REPLACED, f".{LOCK}.")):
            continue
        os.rename(entry, dest / entry.name)
    return dest


def refuse_used(run_dir, overwrite):
    """A new run (train.resume=none) into `run_dir`: refused when it holds another run's state,
    or that state moved aside with `overwrite`; returns the replaced-* folder or None."""
    if not run_state(run_dir):
        return None
    if overwrite:
        return move_aside(run_dir)
    raise RunFolderError(f"run.dir={run_dir} holds another run ({describe_state(run_dir)}), and "
                         "train.resume=none starts a new one: continue it with train.resume=auto, "
                         "give the new run another run.dir, or set run.overwrite=true to move the old "
                         f"files into {run_dir}/{REPLACED}<time>/ first")


# --- the lock --------------------------------------------------------------------------

def _process_start(pid):
    """The start time of process `pid` in clock ticks since boot (Linux), None where unknown:
    with the pid it tells a holder from a later process that reused its pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else fields[19]  # a zombie has ended: it writes nothing


def _alive_here(holder):
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    if Path("/proc").is_dir():
        started, recorded = _process_start(pid), holder.get("pid_start")
        return started is not None and (recorded is None or started == recorded)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, someone else's
        return True
    return True


def describe_holder(holder):
    start = holder.get("start", "?")
    beat = holder.get("heartbeat")
    age = f", heartbeat {time.time() - beat:.0f} s ago" if isinstance(beat, (int, float)) else ""
    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}{job}, started {start}{age}"


class RunLock:
    """The lock of one run folder, held by rank 0 of the run that writes it."""

    def __init__(self, run_dir, timeout):
        self.path = Path(run_dir) / LOCK
        self.timeout = float(timeout)
        self.token = os.urandom(8).hex()
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
                       "start": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "heartbeat": time.time(), "token": self.token,
                       "slurm_job": os.environ.get("SLURM_JOB_ID")}
        self.lost = None  # a description of whoever took the lock over from us
        self._stop, self._thread, self.held = threading.Event(), None, False

    def _read(self):
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # not flowpre's, or damaged: judged by its age alone
            return {"host": "?", "heartbeat": self.path.stat().st_mtime if self.path.exists() else 0}

    def _create(self):
        tmp = temporary_sibling(self.path)
        tmp.write_text(json.dumps(self.record))
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _why_stale(self, holder, poll):
        """Why the lock of `holder` is stale, or raise RunFolderError when it is live."""
        if holder.get("host") == self.record["host"]:
            if _alive_here(holder):
                raise self._refusal(holder)
            return "its process is gone"
        beat = holder.get("heartbeat")
        if not isinstance(beat, (int, float)) or time.time() - beat > self.timeout:
            return f"no heartbeat for more than run.lock_timeout={self.timeout:g} s"
        print(f"flowpre: {self.path} is held by {describe_holder(holder)}; watching its heartbeat for up to "
              f"{self.timeout:g} s (run.lock_timeout)", flush=True)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            time.sleep(poll)
            now = self._read()
            if now is None or now.get("token") != holder.get("token"):
                return None  # released or taken by another: try again
            if now.get("heartbeat") != beat:
                raise self._refusal(now)
        return f"its heartbeat stood still for run.lock_timeout={self.timeout:g} s"

    def _refusal(self, holder):
        return RunFolderError(f"run.dir={self.path.parent} is being written by another run ({describe_holder(holder)}; "
                              f"lock {self.path}): one writer per run folder. Wait for it to end, stop it, or "
                              "use another run.dir")

    def acquire(self):
        poll = min(1.0, max(self.timeout / 20, 0.05))
        while not self._create():
            holder = self._read()
            if holder is None:
                continue  # released between our two looks
            why = self._why_stale(holder, poll)
            if why is None:
                continue
            # take it over: move it aside first, so that of two runs doing this at once only one succeeds
            aside = temporary_sibling(self.path)
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                continue
            try:
                moved = json.loads(aside.read_text())
            except (OSError, ValueError):
                moved = {}
            if moved.get("token") != holder.get("token"):  # we moved a newer holder's lock: put it back
                try:
                    os.link(aside, self.path)
                except FileExistsError:
                    pass
                aside.unlink(missing_ok=True)
                continue
            aside.unlink()
            warnings.warn(f"run.dir={self.path.parent}: taking over the lock of {describe_holder(holder)}: {why} "
                          "(a killed or lost run)", stacklevel=2)
        self.held = True
        return self

    def _beat(self):
        interval = max(self.timeout / 8, 0.05)
        while not self._stop.wait(interval):
            holder = self._read()
            if holder is None or holder.get("token") != self.token:
                self.lost = describe_holder(holder) if holder else "nobody (the lock file was removed)"
                return
            self.record["heartbeat"] = time.time()
            try:
                write_text(self.path, json.dumps(self.record))
            except OSError:  # a full disk: the next beat tries again; the lock goes stale if it never succeeds
                pass

    def start_heartbeat(self):
        self._thread = threading.Thread(target=self._beat, name="flowpre-run-lock", daemon=True)
        self._thread.start()

    def release(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.held and not self.lost:
            holder = self._read()
            if holder is not None and holder.get("token") == self.token:
                self.path.unlink(missing_ok=True)
        self.held = False


def claim(cfg, dist):
    """Rank 0 checks run.dir, takes its lock and refuses or moves aside another run's state; every
    rank learns the outcome (the same RunFolderError on all of them). Returns the lock on rank 0,
    None elsewhere."""
    run_dir, error, lock = Path(cfg.run.dir), None, None
    if dist.is_main:
        try:
            check_dir(run_dir)
            lock = RunLock(run_dir, cfg.run.lock_timeout).acquire()
            if cfg.train.resume in ("none", ""):
                replaced = refuse_used(run_dir, cfg.run.overwrite)
                if replaced:
                    print(f"flowpre: run.overwrite=true: moved the previous run's files into {replaced}", flush=True)
            lock.start_heartbeat()
        except (RunFolderError, OSError) as e:
            if lock is not None:
                lock.release()
            error = str(e) if isinstance(e, RunFolderError) else f"run.dir={run_dir}: {e}"
    error = broadcast_from_main(error)
    if error:
        raise RunFolderError(error)
    return lock


def check_still_held(lock, run_dir):
    """Collective: every rank raises RunFolderError when rank 0's lock was taken over."""
    lost = broadcast_from_main(lock.lost if lock is not None else None)
    if lost:
        raise RunFolderError(f"run.dir={run_dir}: this run's lock was taken over by {lost} (this run was "
                             "stalled for longer than run.lock_timeout?); stopping without writing more into a "
                             "folder another run now writes")
