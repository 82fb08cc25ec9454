"""Test set-up shared by every test.

The Triton interpreter must be switched on before any kernel module is imported
(@triton.jit reads TRITON_INTERPRET when it decorates), so it is set here, at the
top of the first file pytest imports. On a CUDA machine the real kernels run.
"""
import hashlib
import os
import subprocess
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# One extension cache per Python environment: DeepSpeed's JIT ops are built against one
# torch's headers, so two venvs sharing a cache rebuild it in turn (minutes each, behind
# a lock every other DeepSpeed process waits on) - seen as 600 s test timeouts.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser(
    "~/.cache/flowpre/torch_extensions/" + hashlib.sha1(sys.prefix.encode()).hexdigest()[:12]))
from flowpre.train.distributed import remove_stale_build_locks  # noqa: E402

remove_stale_build_locks(os.environ["TORCH_EXTENSIONS_DIR"])

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    from interpreter_guard import install as _install_interpreter_guard  # noqa: E402

    _install_interpreter_guard()
if torch.cuda.is_available():
    os.environ.pop("DS_ACCELERATOR", None)

import pytest  # noqa: E402


def pytest_configure(config):
    if os.environ.get("FLOWPRE_TEST_PROBE"):
        from process_probe import Probe

        config.pluginmanager.register(Probe(os.environ["FLOWPRE_TEST_PROBE"]), "flowpre-process-probe")
    config.addinivalue_line("markers", "slow: takes more than ~30 s on the 2-core CPU machine")
    config.addinivalue_line("markers", "cuda: needs a CUDA device")


# DeepSpeed JIT-builds two C++ ops on first use, behind a lock every other DeepSpeed process
# waits on: its shared-memory collectives (any CPU run, from the first DeepSpeed test on) and
# CPU Adam (the offload test, -O3: 1.5-2.5 min on these 2 cores). Started when the session is
# collected, in that order, the CPU Adam build runs beside the tests before the offload test
# instead of holding it up; building both at once slowed the first DeepSpeed test by as much
# as it saved (measured: 149 s against 71 s). Detached, so that a session ending first
# leaves a finished build, not a stale lock. A gain where a core is idle; on a machine
# already busy it moves the work, it does not remove it.
PREBUILD = {"test_optimizer_offload_trains": ("from deepspeed.comm.torch import build_shm_op; build_shm_op(); "
                                              "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()")}


def pytest_collection_finish(session):
    code = [PREBUILD[item.originalname] for item in session.items if item.originalname in PREBUILD]
    # under pytest-xdist every worker collects everything: one of them starts the build
    first_worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0") == "gw0"
    if code and first_worker and not session.config.option.collectonly:
        from helpers import env

        # started by a short-lived launcher, so the build is not this process's child: reaped by
        # the next Popen of whichever test, its CPU (about 190 s) showed in the probe as that test's
        launcher = ("import subprocess, sys; subprocess.Popen([sys.executable, '-c', sys.argv[1]], "
                    "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)")
        subprocess.run([sys.executable, "-c", launcher, code[0]], env=env(), check=True)


def stale_kernel_ops():
    """The torch custom ops that flowpre.kernels calls but torch no longer has registered.

    Defining an op a second time (its module run again under another name or from its file)
    makes torch free the first registration; the first copy's calls then read freed memory.
    That was the suite's random std::bad_alloc and segfaults, so every test is checked."""
    from torch._library.custom_ops import OPDEFS, CustomOpDef

    stale = []
    for name, module in list(sys.modules.items()):
        if name.startswith("flowpre.kernels") and module is not None:
            for value in vars(module).values():
                if isinstance(value, CustomOpDef) and OPDEFS.get(value._qualname) is not value:
                    stale.append(f"{name}: {value._qualname}")
    return sorted(set(stale))


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item):
    stale = stale_kernel_ops()
    if stale:
        pytest.exit(f"{item.nodeid} re-registered flowpre's custom ops; every later kernel call would read "
                    f"freed memory: {stale[:3]} (import the kernels as flowpre.kernels only)", returncode=3)


@pytest.fixture
def kernel_device():
    """Where kernel tests run: CUDA when present, else the CPU through the interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
