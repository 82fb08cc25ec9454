"""benchmarks/kill_soak.py, short: three SIGKILLs (random moments or mid-checkpoint) of a 2-rank
run, each followed by resume=auto; the final exports equal the uninterrupted run's bit for bit."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import env

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a few minutes: five 2-rank launches
def test_kill_soak_three_kills(tmp_path):
    out = tmp_path / "soak.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kill_soak.py"), "--k", "3",
                        "--checkpoint-every", "3", "--seed", "1", "--workdir", str(tmp_path / "w"), "--out", str(out)],
                       capture_output=True, text=True, timeout=1200, env=env())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "3/3" in r.stdout
    record = json.loads(out.read_text())
    assert record["bitwise_equal"] and record["passed"] == 3 and len(record["kills"]) == 3
    assert all(k["rc"] != 0 for k in record["kills"])  # each kill really ended a run
    for k in record["kills"]:  # nothing of a killed run outlives it: each run resumes where the last checkpoint is
        assert k["resumed_from"] < record["steps"]
