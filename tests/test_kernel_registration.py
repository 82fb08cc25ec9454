"""The kernels' torch custom ops are registered once, by one module copy.

A second copy of kernels/ (a bare `import kernels` with the repo on sys.path, as the
benchmarks once did) re-registers every torch.ops.flowpre op; torch frees the first
registration, and flowpre's model, which holds the first copy, calls freed memory from
then on: random std::bad_alloc and segfaults many tests later. conftest.py checks the
registrations after every test; these tests check that the check and the import guard work.
"""
import os
import subprocess
import sys

from conftest import stale_kernel_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")


def _python(code, **env):
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "1", **env})


def test_this_process_calls_live_registrations():
    import flowpre.kernels  # noqa: F401

    assert stale_kernel_ops() == []
    assert not any(m == "kernels" or m.startswith("kernels.") for m in sys.modules)


def test_a_bare_kernels_import_is_refused_with_the_right_name():
    r = _python(f"import sys; sys.path.insert(0, {ROOT!r}); import flowpre.kernels; from kernels import adaln")
    assert r.returncode != 0
    assert "ImportError: kernels/ is the package flowpre.kernels" in r.stderr and "'kernels'" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "kernels.bench", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0 and "flowpre.kernels" in r.stderr, r.stderr


def test_a_second_registration_is_caught_and_named():
    """Redefining one op the way a second module copy would: the check names exactly that op."""
    r = _python(f"""
import sys, torch
sys.path.insert(0, {TESTS!r})
from conftest import stale_kernel_ops
import flowpre.kernels
print("before", stale_kernel_ops())

@torch.library.custom_op("flowpre::flow_loss_forward_probe_absent", mutates_args=())
def unrelated(x: torch.Tensor) -> torch.Tensor:
    return x.clone()
print("unrelated", stale_kernel_ops())

@torch.library.custom_op("flowpre::adaln_modulate_forward", mutates_args=())
def again(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
          out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    raise AssertionError("never called")
print("after", stale_kernel_ops())
""")
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert lines["before"] == "[]" and lines["unrelated"] == "[]", r.stdout
    assert lines["after"] == "['flowpre.kernels.adaln: flowpre::adaln_modulate_forward']", r.stdout
