"""experiments/fashion_fewstep.py end to end at its smoke scale: train, export, evaluate
(FD and FID on shared samples), write the json/md/png, and reuse finished stages."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from flowpre.data.shards import write_shards
from flowpre.data.sources import FASHION_MNIST_DIRS

from helpers import env

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not any(Path(d).is_dir() for d in FASHION_MNIST_DIRS), reason="dataset-fashion-mnist not installed")
def test_experiment_script_smoke(tmp_path):
    write_shards("fashion-mnist", tmp_path / "data", shard_size=100, split="train", limit=200)

    def experiment(steps, *more):
        return subprocess.run([sys.executable, str(ROOT / "experiments" / "fashion_fewstep.py"), "--scale", "smoke",
                               "--objectives", "fm", "--data", str(tmp_path / "data"), "--steps", steps,
                               "--fid-steps", "1", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"),
                               *more],
                              capture_output=True, text=True, timeout=900, env=env())

    r = experiment("1,2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "fashion_fewstep.json").read_text())
    (run,) = summary["runs"]
    assert run["name"] == "fm" and set(run["results"]) == {"1", "2"}
    assert "fid" in run["results"]["1"] and "fid" not in run["results"]["2"]  # FID only at --fid-steps
    assert run["eval"]["fid_samples"] == 4 and run["train"]["trained_images"] == 4 * 8
    assert run["train"]["train_pflops"] > 0 and run["train"]["objective_overhead"] == 0
    assert all(g["met"] is None for g in summary["goals"])  # scfm/shortcut not run: not judged
    md = (tmp_path / "out" / "fashion_fewstep.md").read_text()
    assert f"| fm | 1 | 1 | {run['results']['1']['fd']:.1f} | {run['results']['2']['fd']:.1f} |" in md
    assert (tmp_path / "out" / "fashion_fewstep.png").stat().st_size > 10_000
    # a second call, with one more step count and flow matching over sampler CFG, trains nothing:
    # the sweep on the train split picks the scale per step count, --split (test) is scored at the
    # picks only and only where no cell exists (one call, not two: each costs a process and a load)
    stamp = (tmp_path / "runs" / "fm" / "experiment_train.json").stat().st_mtime
    r = experiment("1,2,4", "--fm-cfg", "1,2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "flowpre train" not in r.stdout and "fashion-mnist:train --cfg 2.0" in r.stdout
    assert (tmp_path / "runs" / "fm" / "experiment_train.json").stat().st_mtime == stamp
    swept = json.loads((tmp_path / "out" / "fashion_fewstep.json").read_text())["runs"][0]
    grid, picks = swept["eval"]["cfg_train_fd"], swept["eval"]["cfg"]
    assert set(swept["results"]) == {"1", "2", "4"}
    for s in ("1", "2", "4"):
        assert picks[s] == min((grid[c][s], float(c)) for c in ("1", "2"))[1]
        assert swept["results"][s]["cfg"] == picks[s]
        if picks[s] == 1 and s != "4":  # the first call's cell, not scored again
            assert swept["results"][s] == run["results"][s]
    test_evals = [line for line in r.stdout.splitlines() if "fashion-mnist:test --cfg 1.0 " in line]
    assert all("--steps 4 " in line for line in test_evals)
    assert sorted(p.name for p in (tmp_path / "runs" / "fm").glob("eval_train_*cfg2*"))


def test_report_over_seeds_means_spread_yardstick_and_goals(tmp_path):
    """fewstep_report on synthetic runs: per-step mean and standard deviation over seeds, the yardstick
    per seed against that seed's FM best, and the flow-map goals on the means."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import fewstep_report as report

    def run(group, objective, seed, fd, overhead=0.0):
        return {"name": f"{group}_s{seed}", "group": group, "seed": seed, "objective": objective,
                "results": {s: {"fd": v, "class_accuracy": 0.5} for s, v in fd.items()},
                "eval": {"num_samples": 8, "fid_samples": None, "fid_reference_count": None},
                "eval_wall_s": 1.0, "train": {"trained_images": 100, "train_pflops": 3e-13 * (1 + overhead),
                                              "objective_overhead": overhead, "model": "m", "params_m": 1.0,
                                              "train_img_per_s": 10.0, "wall_s": 60.0}}
    runs = [run("fm", "fm", 0, {1: 200.0, 2: 100.0, 128: 40.0}), run("fm", "fm", 1, {1: 220.0, 2: 90.0, 128: 50.0}),
            run("mf", "meanflow_fd", 0, {1: 48.0, 2: 44.0, 128: 41.0}, 1 / 6),
            run("mf", "meanflow_fd", 1, {1: 60.0, 2: 55.0, 128: 52.0}, 1 / 6)]
    groups = report.aggregate(runs)
    fm, mf = groups
    assert fm["fd"][1]["mean"] == 210.0 and fm["fd"][1]["std"] == pytest.approx(14.1421, rel=1e-4)
    # per seed: 48/40 and 60/50 (each seed's own FM best), not the ratio of means
    assert mf["yardstick"][1]["values"] == pytest.approx([1.2, 1.2]) and mf["yardstick"][2]["mean"] == pytest.approx(1.1)
    assert mf["flops_per_image"] / fm["flops_per_image"] == pytest.approx(7 / 6)
    goals = {g["goal"]: g["met"] for g in report.check_goals(groups) if g["run"] == "mf"}
    assert goals == {"1-step FD <= 1.3 x FM's best FD": True, "2-step FD <= 1.15 x FM's best FD": True,
                     "128-step FD <= 1.05 x FM's 128-step FD": True, "training FLOPs per image <= 1.35 x FM's": True}
    summary = {"groups": groups, "runs": runs, "steps": [1, 2, 128], "split": "test", "command": "c", "date": "d",
               "machine": "m", "commit": "x", "goals": report.check_goals(groups), "notes": "## Reading\n\nWhy."}
    report.write_markdown(tmp_path / "page.md", summary)
    md = (tmp_path / "page.md").read_text()
    assert "| mf | 2 | 1 | 54.0 ± 8.5 | 49.5 ± 7.8 | 46.5 ± 7.8 | 1.20 ± 0.00 | 1.10 ± 0.00 |" in md
    assert "- met: mf: 1-step FD <= 1.3 x FM's best FD (measured 1.200x)" in md and md.endswith("## Reading\n\nWhy.\n")
    report.plot(tmp_path / "page.png", summary)
    assert (tmp_path / "page.png").stat().st_size > 10_000
    # a second FM variant (another sigma embedding) that beats the first on seed 0 becomes seed 0's yardstick
    mf = report.aggregate(runs + [run("fm_slow", "fm", 0, {1: 190.0, 128: 30.0})])[1]
    assert mf["yardstick"][1]["values"] == pytest.approx([48.0 / 30.0, 1.2])


def test_round2_report_cfg_picks_goals_and_trend(tmp_path):
    """The round-2 page: FM's best over its CFG-picked cells, every row's CFG, the round-2 goals
    (with the miss), and the yardstick against training length with its goal and plot."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import fewstep_report as report

    def run(group, objective, seed, fd, images=100, cfg=None, guidance=1.0):
        return {"name": f"{group}_s{seed}", "group": group, "seed": seed, "objective": objective,
                "results": {s: {"fd": v, "class_accuracy": 0.5, "recall": v / 1000} for s, v in fd.items()},
                "eval": {"num_samples": 8, "fid_samples": None, "fid_reference_count": None,
                         "cfg": cfg or {s: 1.0 for s in fd}, "target_guidance": guidance},
                "eval_wall_s": 1.0, "train": {"trained_images": images, "train_pflops": 3e-13 * images / 100,
                                              "objective_overhead": 0.0, "model": "m", "params_m": 1.0,
                                              "train_img_per_s": 10.0, "wall_s": 60.0}}
    picks = {1: 3.0, 2: 2.0, 128: 1.5}
    runs = [run("fm_3k", "fm", 0, {1: 150.0, 2: 60.0, 128: 30.0}, cfg=picks),
            run("mf_3k", "meanflow_fd", 0, {1: 42.0, 2: 31.0, 128: 31.0}, guidance=2.0),
            run("fm_12k", "fm", 0, {1: 140.0, 2: 50.0, 128: 25.0}, images=400, cfg=picks),
            run("mf_12k", "meanflow_fd", 0, {1: 32.5, 2: 26.0, 128: 25.5}, images=400, guidance=2.0)]
    groups = report.aggregate(runs)
    assert [report.trend_stem(g["name"]) for g in groups] == ["fm", "mf", "fm", "mf"]
    mf3, mf12 = groups[1], groups[3]
    assert mf3["yardstick"][1]["mean"] == pytest.approx(1.4) and mf12["yardstick"][1]["mean"] == pytest.approx(1.3)
    goals = report.check_goals(groups, "round2")
    mine = {g["goal"]: g for g in goals if g["run"] == "mf_3k"}
    assert not mine["1-step FD <= 1.2 x FM's best FD"]["met"] and not mine["2-step FD <= 1.0 x FM's best FD"]["met"]
    assert mine["128-step FD <= 1.05 x FM's 128-step FD"]["met"]  # 31 / 30 against FM at its picked scale
    assert mine["training FLOPs per image <= 1.5 x FM's"]["met"]
    trend = [g for g in goals if "images" in g["goal"]]
    assert len(trend) == 1 and trend[0]["met"] and trend[0]["value"] == pytest.approx(1.3)
    summary = {"groups": groups, "runs": runs, "steps": [1, 2, 128], "split": "test", "command": "c", "date": "d",
               "machine": "m", "commit": "x", "goals": goals, "goal_set": "round2"}
    report.write_markdown(tmp_path / "page.md", summary)
    md = (tmp_path / "page.md").read_text()
    assert "| fm_3k | 1 | 3/2/1.5 | 150.0 |" in md and "| mf_3k | 1 | 1 (w 2 in target) | 42.0 |" in md
    assert "- MISSED: mf_3k: 1-step FD <= 1.2 x FM's best FD (measured 1.400x, by 0.200)" in md
    assert "| mf | 1.40 | 1.03 | 1.30 | 1.04 |" in md  # the yardstick at 100 and at 400 images
    recall = md[md.index("## Recall"):]
    assert "share of test images" in recall and "| mf_3k | 0.042 | 0.031 | 0.031 |" in recall
    assert report.plot_trend(tmp_path / "trend.png", summary) and (tmp_path / "trend.png").stat().st_size > 10_000
    assert not report.plot_trend(tmp_path / "none.png", {**summary, "groups": groups[:2]})


def test_round2_stages_are_one_command_each():
    sys.path.insert(0, str(ROOT / "experiments"))
    import fashion_flowmaps2 as round2

    tune = round2.main(["tune", "--dry-run"])
    variants = [tune[i + 1] for i, a in enumerate(tune) if a == "--variant"]
    names = [v.split("=")[0] for v in variants]
    assert {"fm_3k", "meanflow_fd_j1_sig1_3k", "mf_w1.5_3k", "mf_w2_3k", "mf_w3_3k", "mf_w2_curriculum_3k",
            "mf_w2_kappa0.5_3k", "mf_w2_p0.5_3k", "mf_w2_p0.75_3k", "mf_w2_predicted_3k", "mf_w2_rnear0_3k"} <= set(names)
    on_w2 = [v for v in variants if v.startswith("mf_w2_") and not v.startswith("mf_w2_3k")]
    assert len(on_w2) == 6 and all("objective.guidance_scale=2," in v for v in on_w2)
    assert all(v.endswith("train.max_steps=3000") or "train.max_steps=3000," in v for v in variants)
    assert tune[tune.index("--split") + 1] == "train" and tune[tune.index("--seeds") + 1] == "0"
    test = round2.main(["test", "--pick", "pick=meanflow_fd:objective.guidance_scale=2", "--dry-run"])
    assert test[test.index("--seeds") + 1] == "0,1,2" and test[test.index("--fm-cfg") + 1] == "1,1.5,2,3,4,5"
    assert "pick_3k=meanflow_fd:objective.guidance_scale=2,train.max_steps=3000" in test
    trend = round2.main(["trend", "--pick", "pick=meanflow_fd:objective.guidance_scale=2", "--dry-run"])
    assert "pick_12k=meanflow_fd:objective.guidance_scale=2,train.max_steps=12000" in trend
    with pytest.raises(SystemExit, match="--pick"):
        round2.main(["test", "--dry-run"])


def test_ablations_run_at_the_first_seed_only():
    sys.path.insert(0, str(ROOT / "experiments"))
    import fashion_fewstep as experiment

    jobs = [("fm", "fm", [], True), experiment.parse_variant("mf=meanflow_fd:objective.fd_delta=0.01"),
            experiment.parse_ablation("mf_ema=meanflow_fd:objective.fd_network=ema_fast")]
    order = [(seed, name) for seed, name, _, _ in experiment.schedule(jobs, [3, 1])]
    assert order == [(3, "fm"), (3, "mf"), (3, "mf_ema"), (1, "fm"), (1, "mf")]
    with pytest.raises(Exception, match="--ablation expects"):
        experiment.parse_ablation("mf_ema=nope:x=1")


def test_dudt_parts_sum_to_the_objectives_derivative():
    """experiments/meanflow_dudt.py: space + sigma + jump parts add up to the JVP along (v, 1, 0)
    that the meanflow objective takes, and the 2e-4 finite difference lands near it."""
    import torch

    sys.path.insert(0, str(ROOT / "experiments"))
    import meanflow_dudt

    from flowpre.models.dit import build_dit, forward_mode_kernels

    torch.manual_seed(0)
    model = build_dit("DiT-2x32x2/4", 1, 8, 10, kernels="torch", time_inputs=2, jump_scale=3.0).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    x, y = torch.rand(6, 1, 8, 8, dtype=torch.float64) * 2 - 1, torch.randint(0, 10, (6,))
    row = meanflow_dudt.measure(model.float(), x.float(), y, 0.5, torch.Generator().manual_seed(1))
    # the same draw, by hand: t, eps from the same generator, then one JVP with the objective's tangent
    g = torch.Generator().manual_seed(1)
    t = (0.5 + 0.5 * torch.rand(6, generator=g, dtype=torch.float64)).float()
    eps = torch.randn(x.shape, generator=g)
    xf = x.float()
    z, v, r = (1 - t.view(-1, 1, 1, 1)) * xf + t.view(-1, 1, 1, 1) * eps, eps - xf, t - 0.5
    with torch.no_grad(), forward_mode_kernels(model):
        _, dudt = torch.func.jvp(lambda z_, t_, r_: model(z_, t_, y, sigma_end=r_), (z, t, r),
                                 (v, torch.ones_like(t), torch.zeros_like(r)))
    assert row["dudt_rms"] == pytest.approx(meanflow_dudt.rms(dudt), rel=1e-4)
    assert row["jump_rms"] > 0 and row["sigma_rms"] > 0 and row["space_rms"] > 0
    assert row["fd_0.0002_error_rms"] < 0.05 * row["dudt_rms"]


def test_train_flops_of_a_curriculum_run(tmp_path):
    """The FLOPs record builds the run's objective with train.max_steps (a curriculum needs it) and
    counts the objective's no-grad forwards as logged, so the warm-up's plain steps cost less."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import fashion_fewstep as experiment

    write_shards("digits", tmp_path / "d", shard_size=50, split="train", limit=50)
    overheads = [0.0, 0.0, 0.25, 0.75]
    (tmp_path / "metrics.jsonl").write_text("\n".join(
        json.dumps({"step": s + 1, "objective_overhead": o, "samples_per_s": 90.0 + s}) for s, o in enumerate(overheads)))
    config = ROOT / "configs" / "experiments" / "fashion_meanflow_fd.yaml"
    overrides = [f"data.shards={tmp_path / 'd' / 'train-*.tar'}", "train.max_steps=4", "objective.curriculum=true",
                 "objective.guidance_scale=2"]
    flops = experiment.train_flops(tmp_path, overrides, config)
    assert flops["objective_overhead"] == pytest.approx(0.25) and flops["train_img_per_s"] == pytest.approx(92.0)
    images = flops["trained_images"]
    assert images == 4 * 64  # train.max_steps x the config's batch
    assert flops["train_pflops"] == pytest.approx(3 * flops["forward_gflops_per_image"] * 1e9 * images * 1.25 / 1e15)


def test_a_weightless_record_is_trained_again_and_kept_only_if_it_is_the_same_run(tmp_path, monkeypatch):
    """Records keep cells, not weights. A cell the record lacks needs its weights: run_one trains the
    configuration again in a scratch folder and adopts the weights only when the loss curve is the
    recorded one up to float32 rounding; another run stops with the step, the record untouched.
    With --read-only nothing is trained or scored: a missing cell or training stops, named."""
    import argparse

    sys.path.insert(0, str(ROOT / "experiments"))
    import fashion_fewstep as experiment

    recorded = {50: 1.5, 100: 1.2, 150: 0.9}
    calls, drift = [], {}

    def fake_flowpre(*args, log):
        args = list(map(str, args))
        calls.append(args)
        if args[0] == "train":
            run = Path([a for a in args if a.startswith("run.dir=")][-1].partition("=")[2])
            run.mkdir(parents=True, exist_ok=True)
            (run / "metrics.jsonl").write_text("\n".join(json.dumps({"step": s, "loss": v * (1 + drift.get(s, 0))})
                                                         for s, v in recorded.items()))
            (run / "model.safetensors").write_bytes(b"weights of " + run.name.encode())
        else:
            out, steps = Path(args[args.index("--out") + 1]), args[args.index("--steps") + 1].split(",")
            out.write_text(json.dumps({"metrics": ["fd"], "cfg": 1.0, "results": {s: {"fd": 10.0 + int(s)} for s in steps}}))
        return 1.0

    monkeypatch.setattr(experiment, "flowpre", fake_flowpre)
    monkeypatch.setattr(experiment, "train_flops", lambda *a: {})

    def record(name, reused=False):
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        (run / "experiment_train.json").write_text(json.dumps({"wall_s": 60.0}))
        (run / "metrics.jsonl").write_text("\n".join(json.dumps({"step": s, "loss": v}) for s, v in recorded.items()))
        (run / "eval_test_fd_1.json").write_text(json.dumps({"metrics": ["fd"], "results": {"1": {"fd": 7.0}}}))
        if reused:
            (run / experiment.REUSED).write_text("{}")
        return run

    def run_one(name, train_only=False, read_only=False, steps=(1, 2)):
        args = argparse.Namespace(runs=str(tmp_path / "runs"), data="d", fresh=False, train_only=train_only, seed=0,
                                  fid_steps=[], steps=list(steps), fm_cfg=[1.0], seeds=[0], split="test",
                                  read_only=read_only)
        return experiment.run_one(name, "fm", [], args, experiment.SCALES["smoke"], lambda m: logs.append(m))

    logs = []
    # --read-only: a page from the records as they are; a missing cell or training stops, naming it
    record("as_is")
    assert run_one("as_is", read_only=True, steps=[1])["results"][1]["fd"] == 7.0
    with pytest.raises(SystemExit, match=r"as_is: no fd cell on test at cfg 1 and steps \[2\] \(--read-only"):
        run_one("as_is", read_only=True)
    with pytest.raises(SystemExit, match=r"never_trained: no training record"):
        run_one("never_trained", read_only=True)
    assert calls == []
    # the same run: the first window equal to 1e-7, later ones drifted by 1e-3
    drift.update({50: 1e-7, 100: 1e-3, 150: -2e-3})
    run = record("same")
    out = run_one("same")
    assert [c[0] for c in calls] == ["train", "eval"] and calls[1][calls[1].index("--steps") + 1] == "2"
    assert (run / "model.safetensors").read_bytes() == b"weights of same.reproduce"
    assert not (tmp_path / "runs" / "same.reproduce").exists()
    assert json.loads((run / "reproduced.json").read_text())["max_relative_loss_difference"] == pytest.approx(2e-3)
    assert out["results"][1]["fd"] == 7.0 and out["results"][2]["fd"] == 12.0  # the record's cell kept
    # another run (other code: the first window 3.5e-3 off) stops before any cell is scored
    calls.clear()
    drift.update({50: 3.5e-3})
    run = record("other")
    with pytest.raises(SystemExit, match=r"other: .*not the recorded run \(first logged loss \(step 50\)"):
        run_one("other")
    assert [c[0] for c in calls] == ["train"] and not (run / "model.safetensors").exists()
    assert (tmp_path / "runs" / "other.reproduce" / "model.safetensors").exists()  # nothing thrown away
    # a late drift past 1e-2 is another run too; with --train-only the queue logs it and goes on
    drift.update({50: 0.0, 150: 0.05})
    run = record("late")
    assert run_one("late", train_only=True) is None
    assert "step 150" in logs[-1] and not (run / "model.safetensors").exists()
    # a reused record (older code trained it) is never trained again: its missing cells stay empty
    calls.clear()
    record("reused", reused=True)
    out = run_one("reused")
    assert calls == [] and set(out["results"]) == {1} and "no weights" in logs[-1]


def test_cfg_sweep_goes_past_3_only_while_the_largest_scale_is_best():
    """Flow matching's CFG pick: {1, 1.5, 2, 3} at every step count, then 4, 5 one at a time only
    where the largest scale so far has the lowest FD; the pick stays the minimum of the grid."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import fashion_fewstep as experiment

    best = {1: 4.2, 8: 1.7, 32: 3.4}  # FD = 10 + (cfg - best)^2: minimum at 4, 1.5-2 and 3
    have, calls = {}, []

    def score(wanted):
        calls.append({c: sorted(s) for c, s in wanted.items()})
        for c, steps in wanted.items():
            for s in steps:
                have[(c, s)] = {"fd": 10 + (c - best[s]) ** 2}

    walked = experiment.cfg_sweep([1, 1.5, 2, 3, 4, 5], [1, 8, 32], score, lambda: dict(have))
    assert walked == {1: [1, 1.5, 2, 3, 4, 5], 8: [1, 1.5, 2, 3], 32: [1, 1.5, 2, 3, 4]}
    assert calls == [{1: [1, 8, 32], 1.5: [1, 8, 32], 2: [1, 8, 32], 3: [1, 8, 32]}, {4: [1, 32]}, {5: [1]}]
    for s, scales in walked.items():  # the pick over the walked scales is the minimum over all six
        assert min(scales, key=lambda c: have[(c, s)]["fd"]) == min([1, 1.5, 2, 3, 4, 5], key=lambda c: 10 + (c - best[s]) ** 2)
    # read only (a later seed uses the first seed's cells): nothing scored, the same walk
    assert experiment.cfg_sweep([1, 1.5, 2, 3, 4, 5], [1, 8, 32], None, lambda: dict(have)) == walked
    # a list of two: both, as before
    assert experiment.cfg_sweep([1, 2], [1], None, lambda: {(1, 1): {"fd": 3.0}, (2, 1): {"fd": 2.0}}) == {1: [1, 2]}
