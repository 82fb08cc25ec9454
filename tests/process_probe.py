"""Per-test readings of the test process's native state, for hunting leaks across tests.

Enabled by FLOWPRE_TEST_PROBE=FILE (conftest.py): after each test one JSON line with the
test id, its outcome and the process's memory mappings, threads, resident and virtual
size and open file descriptors, and the CPU seconds the test used, in this process and in the
processes it started and waited for (a launch's ranks included): unlike wall time, that does
not depend on what else the machine runs, so suite trims can be compared on a busy machine.
A native allocation that fails with plenty of free RAM
(std::bad_alloc) is usually a limit on one of these (vm.max_map_count, the address
space), so their growth over the suite names the test that leaks.
"""
import json
import os
import resource
import threading
import time


def cpu_s():
    """(this process, its waited-for children): user + system CPU seconds so far."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def reading():
    with open("/proc/self/maps") as f:
        maps = sum(1 for _ in f)
    return {"maps": maps, "threads": _status_kib("Threads"), "py_threads": sorted(t.name for t in threading.enumerate()),
            "rss_mib": _status_kib("VmRSS") // 1024, "vm_mib": _status_kib("VmSize") // 1024,
            "fds": len(os.listdir("/proc/self/fd"))}


class Probe:
    def __init__(self, path):
        self.out = open(path, "a", buffering=1)
        self.cpu = cpu_s()

    def pytest_runtest_logreport(self, report):
        if report.when == "call":
            self.call_s = report.duration
        if report.when == "teardown" or (report.when == "call" and report.outcome == "failed"):
            now = cpu_s()
            self.out.write(json.dumps({"test": report.nodeid, "when": report.when, "outcome": report.outcome,
                                       "call_s": round(getattr(self, "call_s", 0.0), 3),
                                       "cpu_s": round(now[0] - self.cpu[0], 2),
                                       "children_cpu_s": round(now[1] - self.cpu[1], 2),
                                       "time": round(time.time(), 1), **reading()}) + "\n")
            self.call_s, self.cpu = 0.0, now
