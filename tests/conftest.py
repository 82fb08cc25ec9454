"""Test set-up shared by every test.

The Triton interpreter must be switched on before any kernel module is imported
(@triton.jit reads TRITON_INTERPRET when it decorates), so it is set here, at the
top of the first file pytest imports. On a CUDA machine the real kernels run.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/flowpre/torch_extensions"))

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


@pytest.fixture
def kernel_device():
    """Where kernel tests run: CUDA when present, else the CPU through the interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
