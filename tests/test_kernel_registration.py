"""The kernels' torch custom ops are registered once, by one module copy.

A second copy of the kernels (a bare `import kernels` of the old top-level kernels/
folder, as the benchmarks and transformers' package probe once did) re-registers every
torch.ops.flowpre op; torch frees the first registration, and flowpre's model, which holds the first copy, calls freed memory from
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
    # a module named `kernels` from elsewhere (Hugging Face's package, which transformers probes
    # for) is no copy of ours; one from this repo would be. Under pytest-xdist a worker can run
    # this file after tests that imported transformers, and one loaded run did (run 4 of 4)
    copies = {}
    for name, module in list(sys.modules.items()):
        if name == "kernels" or name.startswith("kernels."):
            where = [getattr(module, "__file__", None) or "", *getattr(module, "__path__", [])]
            if any(str(w).startswith(ROOT) for w in where if w):
                copies[name] = where
    assert copies == {}, copies


def test_a_second_name_for_the_kernels_is_refused():
    flowpre_dir = os.path.join(ROOT, "flowpre")
    r = _python(f"import sys; sys.path.insert(0, {flowpre_dir!r}); import flowpre.kernels; from kernels import adaln")
    assert r.returncode != 0
    assert "ImportError: flowpre/kernels/ is the package flowpre.kernels" in r.stderr and "'kernels'" in r.stderr, r.stderr


def test_transformers_from_the_repo_root_leaves_the_kernels_alone():
    """transformers probes for Hugging Face's `kernels` package by importing the name `kernels`.
    When the kernels lived in a top-level kernels/ folder, that probe, run from the repo root
    (`python -m ...` puts it on sys.path), imported them a second time: the re-registration."""
    r = _python(f"""
import sys
sys.path[:0] = [{ROOT!r}, {TESTS!r}]
import flowpre.kernels
from conftest import stale_kernel_ops
import transformers.modeling_utils
import importlib.util
spec = importlib.util.find_spec("kernels")
print("kernels", None if spec is None else spec.origin)
print("stale", stale_kernel_ops())
""")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines() if line.startswith(("kernels", "stale")))
    assert not lines["kernels"].startswith(ROOT), lines  # no folder of this repo answers to `kernels`
    assert lines["stale"] == "[]", lines


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
