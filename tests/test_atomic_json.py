"""flowpre/atomic.py and flowpre/strict_json.py: whole-or-nothing file replacement, and JSON that a
parser refusing NaN and Infinity reads."""
import json
import random
import stat

import numpy as np
import pytest
import torch

from flowpre import strict_json
from flowpre.atomic import atomic_path, write_text


def strict_loads(text):
    def refuse(word):
        raise ValueError(f"{word} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_become_null_anywhere():
    rng = random.Random(0)
    values = [rng.uniform(-1e3, 1e3) for _ in range(20)]
    bad = rng.sample(range(20), 6)
    for i, v in zip(bad, [float("nan"), float("inf"), -float("inf"), np.float32("nan"), np.float64("inf"),
                          torch.tensor(float("nan"))]):
        values[i] = v
    record = {"loss": values[0], "nested": {"list": values[1:10], "tuple": tuple(values[10:])},
              "np": np.float32(1.5), "int": np.int64(7), "flag": True, "none": None, "text": "NaN"}
    with pytest.raises(ValueError):
        strict_loads(json.dumps(record, default=float))  # what plain json writes is refused
    back = strict_loads(strict_json.dumps(record))
    flat = [back["loss"], *back["nested"]["list"], *back["nested"]["tuple"]]
    assert [i for i, v in enumerate(flat) if v is None] == sorted(bad)
    assert all(flat[i] == pytest.approx(float(values[i])) for i in range(20) if i not in bad)
    assert back["np"] == 1.5 and back["int"] == 7 and back["flag"] is True and back["text"] == "NaN"
    with pytest.raises(TypeError):
        strict_json.dumps({"x": object()})


def test_atomic_path_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "out" / "file.json"
    strict_json.write(path, {"v": 1})
    assert strict_loads(path.read_text()) == {"v": 1}
    assert stat.S_IMODE(path.stat().st_mode) & 0o044  # readable by colleagues, as any new file
    with pytest.raises(OSError):
        with atomic_path(path) as tmp:
            tmp.write_text('{"v": 2, "half')
            raise OSError(28, "No space left on device")
    assert strict_loads(path.read_text()) == {"v": 1} and sorted(p.name for p in path.parent.iterdir()) == ["file.json"]
    write_text(path, "replaced\n")
    assert path.read_text() == "replaced\n"
