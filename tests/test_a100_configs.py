"""A100 (sm_80): every launch configuration of every kernel compiles within its shared
memory and without spills, per benchmarks/results/a100_configs.json, which
benchmarks/a100_configs.py writes by compiling each one offline (a few minutes).

The fast checks here: the JSON covers exactly what the kernels can launch today (a config
added or changed without re-running the script fails), every row fits but the documented
few, attention picks its A100 pools on an sm_80 device, and a sample of the tightest rows
recompiled now still reads as the JSON says (needs the ptxas in triton's wheel).
"""
import importlib.util
import json
import types
from pathlib import Path

import pytest
import torch

from flowpre.kernels import attention_kernels, registers

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "a100_configs.json"
# Spills ptxas chooses on sm_80 in tilings chosen by rule, not from a list: it caps these at
# the 128-register occupancy step (the adaLN backward) or spills at 72 registers (a corner
# of the loss's one-program finishing kernel, 32 groups, which flowpre's objectives never
# reach). A few bytes each; fixing the adaLN two needs an arch-aware launch_config.
KNOWN_SPILLS = {("adaln_bwd", True, 768): 16, ("adaln_bwd", False, 3072): 8, ("loss_finish", 32, 2): 8}


def _script():
    spec = importlib.util.spec_from_file_location("a100_configs", ROOT / "benchmarks" / "a100_configs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _case(row):
    return {k: v for k, v in row.items() if k not in ("registers", "stack_bytes", "shared_bytes", "blocks_per_sm",
                                                     "warps_per_sm", "fits", "why_not")}


def _known(row):
    if row["kernel"] == "adaln_bwd":
        return row["kernel"], row["gated"], row["shape"][2]
    if row["kernel"] == "loss_finish":
        return row["kernel"], row["block_g"], row["block_k"]
    return None


@pytest.fixture(scope="module")
def report():
    return json.loads(RESULT.read_text())


def test_result_covers_every_config_the_kernels_launch(report):
    canon = lambda c: json.dumps(c, sort_keys=True)  # noqa: E731
    now = {canon(c) for c in _script().cases(80)}
    recorded = {canon(_case(r)) for r in report["rows"]}
    assert now == recorded, ("configs changed since benchmarks/a100_configs.py wrote the JSON; re-run it:\n"
                             f"new: {sorted(now - recorded)[:5]}\ngone: {sorted(recorded - now)[:5]}")
    assert report["arch"] == "sm_80" and report["shared_per_block_limit"] == 163 * 1024


def test_every_a100_config_fits_but_the_documented_spills(report):
    limit = report["shared_per_block_limit"]
    for r in report["rows"]:
        assert r["shared_bytes"] <= limit and r["registers"] <= 255, r
        if r["stack_bytes"]:
            assert r["stack_bytes"] <= KNOWN_SPILLS.get(_known(r), 0), f"spills: {r}"
        else:
            assert r["fits"], r
    # every autotuned attention config fits outright, and each pool's untuned default is a candidate
    attention = [r for r in report["rows"] if r["kernel"].startswith("attention")]
    assert attention and all(r["fits"] for r in attention)
    for key, runs in report["a100_runs"].items():
        assert runs["untuned"] in runs["autotune_candidates"] and not runs["left_out"], key


def test_attention_tunes_over_the_a100_pools_on_sm80(monkeypatch):
    """The pruner picks the pool by dtype and width, and the table by the device's arch."""
    q = types.SimpleNamespace(element_size=lambda: 2, device="cuda:0")
    args = {"Q": q, "DL": 64, "DH": 16, "M_BUCKET": 1024, "N_BUCKET": 1024}
    for name, outer_is_m in (("fwd", True), ("bwd", False)):
        configs, prune = attention_kernels._table_configs(name, outer_is_m)
        for capability, table in (((8, 0), attention_kernels._TABLES_SM80), ((9, 0), attention_kernels._TABLES)):
            monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
            picked = prune(configs, args)
            want = table[name]["small"]
            outer, inner = ("BLOCK_M", "BLOCK_N") if outer_is_m else ("BLOCK_N", "BLOCK_M")
            assert [(c.kwargs[outer], c.kwargs[inner], c.num_warps, c.num_stages) for c in picked] == \
                [tuple(row) for row in want], (name, capability)
            assert len(prune(configs, {**args, "M_BUCKET": 64, "N_BUCKET": 64})) == 1  # short: untuned


@pytest.mark.skipif(not registers.available(), reason="this triton wheel bundles no ptxas")
def test_tightest_rows_recompile_as_recorded(report):
    """Per kernel, the rows with the most shared memory and the most registers, compiled now."""
    script = _script()
    sample = {}
    for r in report["rows"]:
        for what in ("shared_bytes", "registers"):
            best = sample.get((r["kernel"], what))
            if best is None or r[what] > best[what]:
                sample[r["kernel"], what] = r
    rows = list({json.dumps(_case(r), sort_keys=True): r for r in sample.values()}.values())
    assert len(rows) >= len({r["kernel"] for r in report["rows"]})
    fresh = script._compile_all([_case(r) for r in rows], 80)  # in a child, with the interpreter off
    import triton
    for old, new in zip(rows, fresh):
        if triton.__version__ == report["triton"]:  # the same ptxas: the same cubin
            assert {k: new[k] for k in ("registers", "stack_bytes", "shared_bytes")} == \
                {k: old[k] for k in ("registers", "stack_bytes", "shared_bytes")}, old
        assert new["shared_bytes"] <= report["shared_per_block_limit"], new
        assert new["stack_bytes"] <= KNOWN_SPILLS.get(_known(old), 0), (old, new)
