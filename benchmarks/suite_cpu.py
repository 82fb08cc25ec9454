"""CPU seconds per test of a probed suite run, for comparing suite trims on a busy machine.

    FLOWPRE_TEST_PROBE=probe.jsonl python3 -m pytest        # one line per test (tests/process_probe.py)
    python benchmarks/suite_cpu.py probe.jsonl --top 30      # table by test and by file, JSON beside it

Wall time on these shared 2-core machines follows whatever else runs; the CPU a test uses, in
the pytest process and in the processes it waits for (a launch's ranks, a CLI call), does not.
Two probe files (before, after) print side by side per file. Not counted: detached processes
(the DeepSpeed op build conftest.py starts in the background).
"""
import argparse
import collections
import json
from pathlib import Path


def load(path):
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return {r["test"]: r.get("cpu_s", 0.0) + r.get("children_cpu_s", 0.0) for r in rows if "cpu_s" in r}


def by_file(tests):
    files = collections.Counter()
    for test, cpu in tests.items():
        files[test.split("::")[0]] += cpu
    return files


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("probe", nargs="+", help="one probe file, or two (before after)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default=None, help="JSON (default: beside the last probe file)")
    args = p.parse_args(argv)
    runs = [load(f) for f in args.probe]
    if not all(runs):
        raise SystemExit(f"{args.probe}: no per-test CPU lines (probe files from before the CPU fields?)")
    last = runs[-1]
    print(f"{'cpu s':>8}  test ({len(last)} tests, {sum(last.values()) / 60:.1f} CPU-min in all)")
    for test, cpu in sorted(last.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"{cpu:8.1f}  {test}")
    files = [by_file(r) for r in runs]
    print("\n" + "".join(f"{f'cpu s ({i + 1})':>12}" for i in range(len(files))) + "  file")
    for name, _ in sorted(files[-1].items(), key=lambda kv: -kv[1])[:args.top]:
        print("".join(f"{f.get(name, 0.0):12.1f}" for f in files) + f"  {name}")
    print("".join(f"{sum(f.values()):12.1f}" for f in files) + "  all")
    out = Path(args.out or Path(args.probe[-1]).with_suffix(".cpu.json"))
    out.write_text(json.dumps({"probe_files": args.probe, "total_cpu_s": [sum(r.values()) for r in runs],
                               "by_file": [dict(f) for f in files], "by_test": last}, indent=2) + "\n")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
