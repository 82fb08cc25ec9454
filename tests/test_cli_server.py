"""The preloaded CLI server (cli_server.py) must be indistinguishable from a fresh `python -m`."""
import subprocess
import sys

import pytest

import cli_server
from helpers import env

# prints what a module run by `python -m` sees, then leaves as its arguments say
PROBE = """
import atexit, os, signal, sys
print("name", __name__, "argv", sys.argv[1:], "path0", sys.path[0] == os.getcwd(), "cwd", os.path.basename(os.getcwd()))
print("env", os.environ.get("FLOWPRE_FAULT_PROBE"), os.environ.get("PYTHONUNBUFFERED"), "stdin", sys.stdin.read())
print("to stderr", file=sys.stderr)
atexit.register(lambda: print("atexit ran", flush=True))
if sys.argv[1] == "exit":
    sys.exit(int(sys.argv[2]))
if sys.argv[1] == "raise":
    raise ValueError("from the probe")
if sys.argv[1] == "signal":
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGTERM)
if sys.argv[1] == "sleep":
    import time
    time.sleep(60)
"""


@pytest.fixture(scope="module")
def served():
    server = cli_server.Server(env())
    yield server
    server.sock.close()
    server.proc.wait(timeout=60)


@pytest.fixture()
def probe_dir(tmp_path):
    (tmp_path / "cli_probe_module.py").write_text(PROBE)
    return tmp_path


@pytest.mark.parametrize("argv", [["plain", "x y"], ["exit", "3"], ["raise"], ["signal"]])
def test_served_call_matches_a_fresh_interpreter(served, probe_dir, argv):
    cmd = [sys.executable, "-m", "cli_probe_module", *argv]
    run_env = env(FLOWPRE_FAULT_PROBE="seen")
    fresh = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=run_env, cwd=probe_dir,
                           stdin=subprocess.DEVNULL)
    forked = served.run(cmd, run_env, timeout=120, cwd=probe_dir)
    assert forked is not None, "the server refused a call whose environment it was started with"
    assert (forked.returncode, forked.stdout) == (fresh.returncode, fresh.stdout)
    assert forked.stderr.splitlines()[-1] == fresh.stderr.splitlines()[-1]
    assert {"plain": 0, "exit": 3, "raise": 1, "signal": -15}[argv[0]] == forked.returncode
    assert "name __main__" in forked.stdout and "path0 True" in forked.stdout and "env seen 1" in forked.stdout


def test_a_served_call_books_its_cpu(served, probe_dir):
    before = served.served_cpu_s
    code = [sys.executable, "-m", "cli_probe_module", "plain"]
    assert served.run(code, env(), timeout=120, cwd=probe_dir).returncode == 0
    assert served.served_cpu_s > before


def test_an_import_time_variable_gets_a_fresh_process(served, probe_dir):
    cmd = [sys.executable, "-m", "cli_probe_module", "plain"]
    assert served.run(cmd, env(TRITON_INTERPRET="1"), timeout=120, cwd=probe_dir) is None
    assert served.run(cmd, env(OMP_NUM_THREADS="2"), timeout=120, cwd=probe_dir) is None
    assert served.run(["python3", "script.py"], env(), timeout=120, cwd=probe_dir) is None


def test_timeout_kills_the_child_and_the_server_goes_on(served, probe_dir):
    cmd = [sys.executable, "-m", "cli_probe_module", "sleep"]
    with pytest.raises(subprocess.TimeoutExpired) as caught:
        served.run(cmd, env(), timeout=3, cwd=probe_dir)
    assert "name __main__" in caught.value.output
    after = served.run([sys.executable, "-m", "cli_probe_module", "exit", "5"], env(), timeout=120, cwd=probe_dir)
    assert after.returncode == 5


def test_flowpre_cli_error_is_the_same_served_and_fresh(served, tmp_path):
    cmd = [sys.executable, "-m", "flowpre.cli", "train", "--config", str(tmp_path / "missing.yaml")]
    fresh = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env(), stdin=subprocess.DEVNULL)
    forked = served.run(cmd, env(), timeout=300)
    assert forked.returncode == fresh.returncode == 2
    assert forked.stderr == fresh.stderr and "missing.yaml" in forked.stderr


def test_helpers_use_the_server_only_when_asked(monkeypatch):
    monkeypatch.setattr(cli_server, "_server", None)
    monkeypatch.delenv("FLOWPRE_TEST_FORK", raising=False)
    assert cli_server.server(env()) is None
    monkeypatch.setenv("FLOWPRE_TEST_FORK", "1")
    started = cli_server.server(env())
    try:
        assert started is cli_server.server(env()) and started.proc.poll() is None
    finally:
        started.sock.close()
        started.proc.wait(timeout=60)
