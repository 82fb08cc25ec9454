"""tests/process_probe.py: one line per test with its native-state readings and the CPU it
used, its own and its waited-for child processes' (what suite trims are compared by)."""
import json
import subprocess
import sys
from types import SimpleNamespace

from process_probe import Probe


def test_probe_counts_each_tests_cpu_and_its_childrens(tmp_path):
    out = tmp_path / "probe.jsonl"
    probe = Probe(str(out))

    def finish(nodeid):
        for when in ("setup", "call", "teardown"):
            probe.pytest_runtest_logreport(SimpleNamespace(when=when, outcome="passed", nodeid=nodeid, duration=0.5))

    subprocess.run([sys.executable, "-c", "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass"],
                   check=True)
    finish("t::child")
    t = __import__("time").process_time()
    while __import__("time").process_time() - t < 0.3:
        pass
    finish("t::own")
    child, own = (json.loads(line) for line in out.read_text().splitlines())
    assert child["test"] == "t::child" and child["children_cpu_s"] >= 0.35 and child["call_s"] == 0.5
    assert own["test"] == "t::own" and own["cpu_s"] >= 0.25 and own["children_cpu_s"] < 0.05  # per test, not cumulative
    assert own["maps"] > 0 and own["fds"] > 0


def test_suite_cpu_table_sums_a_probe_by_test_and_file(tmp_path, capsys):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "benchmarks"))
    import suite_cpu

    def probe(name, rows):
        path = tmp_path / name
        path.write_text("\n".join(json.dumps({"test": t, "cpu_s": a, "children_cpu_s": b}) for t, a, b in rows))
        return str(path)

    before = probe("a.jsonl", [("tests/x.py::a", 1.0, 9.0), ("tests/x.py::b", 2.0, 0.0), ("tests/y.py::c", 0.5, 0.5)])
    after = probe("b.jsonl", [("tests/x.py::a", 1.0, 4.0), ("tests/x.py::b", 2.0, 0.0), ("tests/y.py::c", 0.5, 0.7)])
    out = json.loads(suite_cpu.main([before, after]).read_text())
    assert out["total_cpu_s"] == [13.0, 8.2] and out["by_file"][1] == {"tests/x.py": 7.0, "tests/y.py": 1.2}
    assert out["by_test"]["tests/x.py::a"] == 5.0
    table = capsys.readouterr().out
    assert "        12.0         7.0  tests/x.py" in table and "3 tests, 0.1 CPU-min" in table
