"""The GPU check's summary.json: device, commit, each stage's status and headline figures,
and the GPU goals, read from the stage folder launchers/gpu_check.sh fills.

    python benchmarks/gpu_check_summary.py STAGE_DIR OUT.json [--rehearsal]

Run after every stage, so a check cut off by its lease still returns what it measured; it
imports nothing heavy (no torch) and never fails on a missing or broken stage file: that
stage's status says what is wrong instead.
"""
import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

# stage name -> (its JSON, its log), as gpu_check.sh writes them
STAGES = {
    "tests": (None, "gpu_tests.log"),
    "train_loop": ("train_loop.json", "train_loop.log"),
    "kernels": ("kernels.json", "bench.log"),
    "adaln_sweep": ("adaln_sweep.json", "adaln_sweep.log"),
    "train_throughput": ("train_throughput.json", "train_throughput.log"),
    "attention_jvp": ("attention_jvp.json", "attention_jvp.log"),
}
# the self-attention shapes of the attention goal (flowpre/kernels/bench.py's ATTN_FULL), as "N:D"
ATTENTION_GOAL_SHAPES = [f"{n}:{d}" for n in (256, 1024, 4096) for d in (64, 72, 128)]


def read_stages(stage_dir):
    """stages.tsv: one line per finished stage, `name rc wall_s cap_s` (rc may be 'skipped: why')."""
    path = stage_dir / "stages.tsv"
    out = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        name, rc, wall, cap = (line.split("\t") + ["", "", ""])[:4]
        out[name] = {"rc": int(rc) if rc.lstrip("-").isdigit() else rc, "wall_s": _number(wall), "cap_s": _number(cap)}
    return out


def _number(text):
    try:
        return int(text)
    except ValueError:
        return None


def status_of(rc, report, errors):
    if isinstance(rc, str):
        return rc  # "skipped: ..."
    if rc == 124:
        return "timeout: cut off by its cap (what it wrote before is kept)"
    if rc in (137, -9):
        return "killed"
    if report is None:
        return f"failed: rc {rc}, no JSON" if rc else "no JSON written"
    if rc:
        return f"failed: rc {rc}"
    return f"errors in {errors} rows" if errors else "ok"


def _rows_with_errors(rows):
    def bad(r):
        return "error" in r or "timing_error" in r or any("error" in v for v in r.get("results", {}).values())
    return sum(1 for r in rows if bad(r))


def tests_figures(log_text):
    """Counts from pytest's last summary line ('3 failed, 40 passed, 2 skipped in 81.2s')."""
    figures = {}
    for line in reversed(log_text.splitlines()):
        words = line.replace(",", " ").split()
        for count, word in zip(words, words[1:]):
            if count.isdigit() and word in ("passed", "failed", "error", "errors", "skipped", "deselected"):
                figures[word.rstrip("s") if word == "errors" else word] = int(count)
        if figures:
            break
    return figures


def _round(value, digits=4):
    return float(f"{value:.{digits}g}") if isinstance(value, float) else value


def train_loop_figures(report):
    """Per run img/s, MFU and overhead; the first row is the headline run (DiT-XL/2 fm ZeRO-2
    unless LOOP_FLAGS changed it: train_loop.plan puts it first)."""
    runs = {}
    for r in report.get("rows", []):
        key = f"{r['model']} {r['objective']} zero{r['zero']}"
        if "skipped" in r:
            runs[key] = r["skipped"]
        elif "img_per_s" in r:
            runs[key] = {"img_per_s": _round(r["img_per_s"]), "mfu": _round(r.get("mfu")),
                         "objective_overhead": _round(r.get("objective_overhead", 0.0)), "rc": r.get("returncode")}
        else:
            runs[key] = f"no metrics (rc {r.get('returncode')})"
    rows = report.get("rows", [])
    headline = {k: rows[0][k] for k in ("model", "objective", "zero")} if rows else None
    return {"headline": headline, "runs": runs, "ratios": {k: _round(v) for k, v in report.get("ratios", {}).items()}}


def kernels_figures(report):
    attention, memory = {}, {}
    for r in report.get("rows", []):
        shape = r.get("shape", [])
        if r["kernel"] == "attention" and len(shape) == 4:
            name = f"{shape[2]}:{r['kv_len']}:{shape[3]}" if "kv_len" in r else f"{shape[2]}:{shape[3]}"
            attention[name] = _round(r.get("speedup_vs_sdpa_fwd_bwd"))
        elif r["kernel"] != "attention":
            t = r.get("results", {}).get("triton", {})
            memory[f"{r['kernel']} {'x'.join(map(str, shape))}"] = {
                "fwd_bwd_pct_copy": _round(t.get("fwd_bwd_graph_pct_copy", t.get("fwd_bwd_pct_copy"))),
                "vs_compiled": _round(r.get("speedup_vs_compiled_fwd_bwd_graph", r.get("speedup_vs_compiled_fwd_bwd")))}
    return {"copy_gbps": _round(report.get("copy_gbps")), "attention_fwd_bwd_vs_sdpa": attention,
            "memory_bound": memory}


def sweep_figures(report):
    timed = [r for r in report.get("rows", []) if "pct_copy" in r]
    best = max(timed, key=lambda r: r["pct_copy"], default=None)
    today = [r for r in timed if r.get("today")]
    return {"today_pct_copy": [_round(r["pct_copy"]) for r in today],
            "best_pct_copy": _round(best["pct_copy"]) if best else None,
            "best_launch": best["launch"] if best else None, "rows_timed": len(timed)}


def throughput_figures(report):
    by = {(r["model"], r["kernels"]): r for r in report.get("rows", []) if "error" not in r}
    out = {}
    for (model, kernels), r in by.items():
        out[f"{model} {kernels}"] = {"img_per_s": _round(r["img_per_s"]), "mfu": _round(r.get("mfu"))}
        torch_row = by.get((model, "torch"))
        if kernels == "triton" and torch_row:
            out[f"{model} triton/torch"] = _round(r["img_per_s"] / torch_row["img_per_s"])
    return out


def jvp_figures(report):
    return {f"{r['shape'][2]}:{r['kv_len']}:{r['shape'][3]}": _round(r.get("speedup_vs_func_jvp"))
            for r in report.get("rows", []) if "shape" in r}


FIGURES = {"train_loop": train_loop_figures, "kernels": kernels_figures, "adaln_sweep": sweep_figures,
           "train_throughput": throughput_figures, "attention_jvp": jvp_figures}


def goals(stages, judged):
    """The GPU goals (issue 25): value, target and whether it is met (None when not judged)."""
    def goal(value, target, higher_is_better=True, note=None):
        met = None
        if judged and value is not None:
            met = value >= target if higher_is_better else value <= target
        out = {"value": value, "target": (">= " if higher_is_better else "<= ") + str(target), "met": met}
        return {**out, "note": note} if note else out

    loop = stages.get("train_loop", {}).get("figures", {})
    head = loop.get("headline") or {"model": "DiT-XL/2", "objective": "fm", "zero": 2}
    model, zero = head["model"], head["zero"]
    run = loop.get("runs", {}).get(f"{model} {head['objective']} zero{zero}")
    mfu = run.get("mfu") if isinstance(run, dict) else None
    ratio = loop.get("ratios", {}).get(f"{model} zero{zero} scfm/fm step time")
    attention = stages.get("kernels", {}).get("figures", {}).get("attention_fwd_bwd_vs_sdpa", {})
    at_goal = [attention.get(s) for s in ATTENTION_GOAL_SHAPES if attention.get(s) is not None]
    memory = stages.get("kernels", {}).get("figures", {}).get("memory_bound", {})
    adaln = [v["fwd_bwd_pct_copy"] for k, v in memory.items()
             if k.startswith("gated_residual_adaln") and v.get("fwd_bwd_pct_copy") is not None]
    jvp = [v for v in stages.get("attention_jvp", {}).get("figures", {}).values() if v is not None]
    return {
        "train DiT-XL/2 bf16 ZeRO-2 MFU": goal(mfu, 0.55, note=f"run: {model} {head['objective']} ZeRO-{zero}"),
        "scfm / fm step time": goal(ratio, 1.2, higher_is_better=False, note=f"{model} ZeRO-{zero}"),
        "attention fwd+bwd vs SDPA, worst of the 9 shapes": goal(
            min(at_goal) if at_goal else None, 1.2, note=f"{len(at_goal)} of 9 shapes measured"),
        "gated adaLN fwd+bwd % of copy bandwidth, worst shape": goal(min(adaln) if adaln else None, 85),
        "fused JVP vs math-path JVP, worst shape": goal(min(jvp) if jvp else None, 5),
    }


def summarise(stage_dir, rehearsal=False):
    stage_dir = Path(stage_dir)
    env_path = stage_dir / "env.json"
    env = _load(env_path) or {}
    finished = read_stages(stage_dir)
    stages = {}
    for name, (json_name, log_name) in STAGES.items():
        if name not in finished:
            stages[name] = {"status": "not run (the check ended before it)"}
            continue
        entry = {"status": None, **finished[name]}
        report = _load(stage_dir / json_name) if json_name else None
        try:
            if name == "tests":
                log = stage_dir / log_name
                entry["figures"] = tests_figures(log.read_text(errors="replace") if log.exists() else "")
                rc, failed = entry["rc"], entry["figures"].get("failed", 0) + entry["figures"].get("error", 0)
                entry["status"] = status_of(rc, {}, 0) if rc != 1 else f"failed: {failed} tests"
                if not entry["figures"] and rc == 0:
                    entry["status"] = "no pytest summary line in the log"
            else:
                rows = report.get("rows", []) if isinstance(report, dict) else []
                entry["status"] = status_of(entry["rc"], report, _rows_with_errors(rows))
                if isinstance(report, dict):
                    entry["figures"] = FIGURES[name](report)
                    if name == "train_loop":  # a failed run is a row with a return code
                        failed = [k for k, v in entry["figures"]["runs"].items()
                                  if (isinstance(v, dict) and v["rc"] not in (0, None))
                                  or (isinstance(v, str) and v.startswith("no metrics"))]
                        if failed and entry["status"] == "ok":
                            entry["status"] = f"runs failed: {', '.join(failed)}"
        except Exception as e:  # noqa: BLE001 - the summary must come back whatever a stage wrote
            entry["status"] = f"{entry.get('status', 'unread')}; summary error: {type(e).__name__}: {e}"[:300]
        stages[name] = entry
    return {"rehearsal": rehearsal,
            "note": "CPU rehearsal: code paths checked, nothing measured" if rehearsal else None,
            "device": env.get("device", "unknown"), "commit": env.get("commit", "unknown"),
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "env": {k: v for k, v in env.items() if k not in ("device", "commit")},
            "archive": "gpu_check.tar.gz: every stage's JSON and logs",
            "all_ok": all(s["status"] == "ok" for s in stages.values()),
            "stages": stages, "goals": goals(stages, judged=not rehearsal)}


def _load(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("stage_dir")
    ap.add_argument("out")
    ap.add_argument("--rehearsal", action="store_true")
    args = ap.parse_args(argv)
    summary = summarise(args.stage_dir, args.rehearsal)
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
