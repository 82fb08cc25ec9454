"""A preloaded interpreter for the tests' `python -m flowpre.cli` calls (opt-in: FLOWPRE_TEST_FORK=1).

Why: a tiny `flowpre train` spends about 3 of its 5 CPU seconds importing torch, Triton,
DeepSpeed, torch._dynamo (torch.optim's first optimizer) and inductor (DeepSpeed's ZeRO
optimizer check imports its Muon module, which torch.compiles at import). On the loaded 2-core
CI machine the suite is CPU-bound, so those imports are minutes of wall time.

How: one server per pytest process (per xdist worker) imports them once, then forks a child per
call. The child runs `python -m MODULE ARGS` as a fresh interpreter would: runpy as
__main__, the caller's argv, working directory, environment and stdio files, and it leaves
through the interpreter's normal shutdown (atexit handlers run; a SystemExit sets the code).
The server sends back the exit status (-N for signal N, as subprocess does) and the child's CPU.

What differs from a fresh interpreter is what libraries read from the environment at import.
So a call is served only where its environment equals the server's start environment outside
RUNTIME_ENV (variables read at run time: the test's name, the fault injections, the rank
variables); any other difference (TRITON_INTERPRET=1, a changed OMP_NUM_THREADS) runs a fresh
process, as does every call while the server is not sure it is single-threaded (a fork of a
multi-threaded process copies only the forking thread). Variables the imports set
(setdefault) are given to every child, as its own imports would have set them.
"""
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time

RUNTIME_ENV = ("PYTEST_CURRENT_TEST", "FLOWPRE_FAULT_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
               "MASTER_PORT")
PRELOAD = ("torch", "triton", "deepspeed", "torch._dynamo", "deepspeed.runtime.zero.muon.muon_optimizer",
           "flowpre.train.loop", "flowpre.data.shards", "flowpre.models.dit", "flowpre.export",
           "flowpre.eval.evaluate", "flowpre.pipeline", "safetensors.torch")


def send(sock, message, fds=()):
    data = json.dumps(message).encode()
    socket.send_fds(sock, [struct.pack("!I", len(data))], list(fds)) if fds else sock.sendall(struct.pack("!I", len(data)))
    sock.sendall(data)


def receive(sock, max_fds=0):
    head, fds, _, _ = socket.recv_fds(sock, 4, max_fds) if max_fds else (sock.recv(4), [], 0, None)
    if len(head) < 4:
        return None, fds
    size, data = struct.unpack("!I", head)[0], b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None, fds
        data += chunk
    return json.loads(data), fds


def runtime_only(name):
    return any(name == k or (k.endswith("_") and name.startswith(k)) for k in RUNTIME_ENV)


def differences(a, b):
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and not runtime_only(k))


# --- the server (this file run as a script, its socket on fd argv[1]) -------------------------

def native_threads():
    return len(os.listdir("/proc/self/task"))


def serve(sock):
    """Preload, then fork a child per request; returns (request, fds) in a child, None at EOF."""
    start_env = dict(os.environ)
    for name in PRELOAD:
        try:
            __import__(name)
        except ImportError:
            pass
    added = {k: v for k, v in os.environ.items() if k not in start_env}
    send(sock, {"env": start_env, "threads": native_threads()})
    while True:
        request, fds = receive(sock, max_fds=2)
        if request is None:
            return None
        if native_threads() != 1:  # never fork a multi-threaded process
            send(sock, {"refused": f"{native_threads()} threads"})
            for fd in fds:
                os.close(fd)
            continue
        pid = os.fork()
        if pid == 0:
            sock.close()
            request["env"] = {**added, **request["env"]}
            return request, fds
        for fd in fds:
            os.close(fd)
        send(sock, {"pid": pid})
        _, status, usage = os.wait4(pid, 0)
        send(sock, {"returncode": os.waitstatus_to_exitcode(status), "cpu_s": usage.ru_utime + usage.ru_stime})


def become(request, fds):
    """Turn this forked child into the caller's `python -m MODULE ARGS`."""
    import runpy

    out, err = fds
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(out, 1)
    os.dup2(err, 2)
    os.close(out)
    os.close(err)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    sys.path[0] = request["cwd"]  # python -m puts the working directory first
    sys.argv = ["-m", *request["argv"]]
    # not imported yet, as in a fresh interpreter (runpy warns, and its module code would run twice)
    sys.modules.pop(request["module"], None)
    runpy.run_module(request["module"], run_name="__main__", alter_sys=True)


# --- the client (imported by tests/helpers.py) -------------------------------------------------

class Server:
    def __init__(self, env):
        self.sock, theirs = socket.socketpair()
        self.proc = subprocess.Popen([sys.executable, __file__, str(theirs.fileno())], pass_fds=[theirs.fileno()],
                                     env=env, stdin=subprocess.DEVNULL)
        theirs.close()
        hello, _ = receive(self.sock)
        self.env = hello["env"] if hello else None
        self.served_cpu_s = 0.0  # the children's CPU (tests/process_probe.py adds it to each test's)

    def run(self, cmd, env, timeout, cwd=None):
        """subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
        for cmd = [this python, -m, MODULE, ARGS...], or None where it needs a fresh process."""
        if (self.env is None or self.proc.poll() is not None or len(cmd) < 3 or cmd[:2] != [sys.executable, "-m"]
                or differences(self.env, env)):
            return None
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            send(self.sock, {"module": cmd[2], "argv": list(map(str, cmd[3:])), "env": env,
                             "cwd": os.path.abspath(cwd or os.getcwd())},
                 fds=[out.fileno(), err.fileno()])
            reply, _ = receive(self.sock)
            if reply is None or "refused" in reply:
                return None
            self.sock.settimeout(timeout)
            started = time.monotonic()
            try:
                done, _ = receive(self.sock)
            except socket.timeout:
                os.kill(reply["pid"], 9)
                self.sock.settimeout(None)
                receive(self.sock)
                raise subprocess.TimeoutExpired(cmd, timeout, read(out), read(err)) from None
            finally:
                self.sock.settimeout(None)
            if done is None:
                raise RuntimeError(f"the CLI server died while running {cmd[3:]} "
                                   f"({time.monotonic() - started:.0f} s in)")
            self.served_cpu_s += done["cpu_s"]
            return subprocess.CompletedProcess(cmd, done["returncode"], read(out), read(err))


def read(f):
    f.seek(0)
    return f.read().decode(errors="replace")


_server = None


def server(env):
    """This process's server, started on first use with `env` (None when not opted in)."""
    global _server
    if os.environ.get("FLOWPRE_TEST_FORK") != "1":
        return None
    if _server is None:
        _server = Server(env)
    return _server


if __name__ == "__main__":
    job = serve(socket.socket(fileno=int(sys.argv[1])))
    if job is not None:
        become(*job)
