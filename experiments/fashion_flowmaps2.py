"""Few-step frontier, round 2 (issue 23): each stage of the experiment as one resumable command.

    python experiments/fashion_flowmaps2.py tune            # train split, seed 0, 3000 steps: one change at a time
    python experiments/fashion_flowmaps2.py tune --pick pick=meanflow_fd:...   # plus the best combination
    python experiments/fashion_flowmaps2.py test --pick pick=meanflow_fd:...   # test split, seeds 0,1,2
    python experiments/fashion_flowmaps2.py trend --pick pick=meanflow_fd:...  # fm and the pick at 12000 steps
    python experiments/fashion_flowmaps2.py test --dry-run   # print the fashion_fewstep.py command only
    python experiments/fashion_flowmaps2.py test --pick ... --read-only   # the page from the records; runs nothing

Every stage is a call of experiments/fashion_fewstep.py with the variants below, so everything
it does holds here: each run's stages leave files in its folder under
experiments/records/fashion_flowmaps2/ and are skipped when present (a cut-off command goes on
where it stopped, train.resume=auto carries a cut-off training run on), and the page
regenerates from those records. Flow matching is sampled over --fm-cfg (1, 1.5, 2, 3, then 4
and 5 only while the largest scale so far has the lowest FD), the scale picked per step count
on the train split of seed 0 and scored on test at the pick;
every flow map samples at cfg 1 with one forward per step (a guidance-trained one has its
guidance in the weights).

Reuse: `test` copies the committed round-1 records of today's best (meanflow_fd_j1_sig1_3k,
seeds 0 and 1; identical configuration) into the runs folder once, marked reused.json. Older
code trained them and their weights were not committed, so cells they lack (FID) stay empty.
The tuning's seed-0 records (fm_3k, the pick) lack weights too, and the test split needs them:
each is trained again, and its weights join the record only if its loss curve is the record's
up to float32 rounding (fashion_fewstep.same_run: first logged loss within 1e-5, all within
1e-2). `--train-only` runs every training first (the part a lost session cannot carry over),
scoring comes in the next call.

Choices (the issue is silent):
- MeanFlow's CFG target with kappa = 0 (omega = w), as in MeanFlow's own guidance-scale
  ablation (B/4, 1-step FID 61.1 -> 15.5 at w 3); kappa > 0 costs a second forward per sample
  (1.83x FM's FLOPs with the jump share's forwards, over the 1.5x ceiling), so it is one
  extra ablation at w 2 (kappa 0.5, MeanFlow's pairing for its B-size models).
- The curriculum: 10% plain flow matching, then a 40% ramp (a fifth of the run at the end
  of the ramp is the plain objective's half); r_sampler logit_normal(-2, 1): median r 0.12.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECORDS = "experiments/records/fashion_flowmaps2"
ROUND1 = ROOT / "experiments" / "records" / "fashion_flowmaps"

# today's best (docs/results/fashion_flowmaps.md), spelled as in round 1 so its records are reused
BEST = "objective.sigma_sampler=uniform,model.jump_scale=1,model.sigma_scale=1"
# The issue's {1, 1.5, 2, 3} plus 4 and 5: on the train split flow matching's FD still fell at 3,
# the grid's edge (fm_3k: 4-step FD 23.0 at 3, 22.7 at 4, 23.9 at 5), so the yardstick needs them;
# fashion_fewstep.cfg_sweep scores them only at step counts where 3 (then 4) is best
FM_CFG = "1,1.5,2,3,4,5"


# (the tuning and test length, the trend's 4x) per --scale; the variants set train.max_steps, so
# they, not the scale's own length, decide it
LENGTHS = {"cpu": (3000, 12000), "gpu": (20000, 80000), "smoke": (4, 16)}


def length(steps):
    return f"train.max_steps={steps}"


def suffix(steps):
    return f"{steps / 1000:g}k"  # 3k, 12k (fewstep_report.trend_stem pairs the lengths by it)


def tuning_variants(steps=3000):
    """Guidance w from today's best, then one change at a time on top of the guidance pick.

    Greedy, not one change from today's best each: w 2 in the target lowered 1-step FD by 27%,
    so a change measured without it is measured in a regime the pick will not be in."""
    k = suffix(steps)
    base = f"meanflow_fd:{BEST},{length(steps)}"
    guidance = {f"mf_w{w:g}": f"objective.guidance_scale={w}" for w in (1.5, 2, 3)}
    on_w2 = {
        "mf_w2_kappa0.5": "objective.guidance_mix=0.5",
        "mf_w2_curriculum": "objective.curriculum=true",
        **{f"mf_w2_p{p:g}": f"objective.loss_weight_p={p}" for p in (0.5, 0.75)},
        "mf_w2_predicted": "objective.fd_direction=predicted",
        "mf_w2_rnear0": "objective.r_sampler=logit_normal",
    }
    w2 = guidance["mf_w2"]
    return ([f"fm_{k}=fm:{length(steps)}", f"meanflow_fd_j1_sig1_{k}={base}"]
            + [f"{name}_{k}={base},{change}" for name, change in guidance.items()]
            + [f"{name}_{k}={base},{w2},{change}" for name, change in on_w2.items()])


def stage_arguments(stage, pick, scale):
    short, long = LENGTHS[scale]
    s, l = suffix(short), suffix(long)
    records = RECORDS if scale == "cpu" else f"{RECORDS}_{scale}"
    notes = ROOT / "experiments" / "notes" / "fashion_flowmaps2.md"
    common = ["--objectives", "", "--runs", records, "--out", "docs/results", "--fm-cfg", FM_CFG, "--goals", "round2",
              "--scale", scale]
    if stage == "tune":
        jobs = tuning_variants(short) + ([pick.replace("=", f"_{s}=", 1) + f",{length(short)}"] if pick else [])
        return common + ["--split", "train", "--seeds", "0", "--steps", "1,2,4", "--no-fid",
                         "--name", "fashion_flowmaps2_tuning"] + [a for j in jobs for a in ("--variant", j)]
    if not pick:
        raise SystemExit(f"{stage}: name the pick of the tuning stage: --pick NAME=meanflow_fd:key=value,...")
    name, _, spec = pick.partition("=")
    if stage == "test":
        jobs = [f"fm_{s}=fm:{length(short)}", f"meanflow_fd_j1_sig1_{s}=meanflow_fd:{BEST},{length(short)}",
                f"{name}_{s}={spec},{length(short)}"]
        seeds = "0,1,2"
    else:  # trend: fm and the pick at 4x the images, two seeds, beside their 3000-step rows (seeds 0 and 1)
        jobs = [f"fm_{s}=fm:{length(short)}", f"{name}_{s}={spec},{length(short)}",
                f"fm_{l}=fm:{length(long)}", f"{name}_{l}={spec},{length(long)}"]
        seeds = "0,1"
    return (common + ["--split", "test", "--seeds", seeds, "--steps", "1,2,4,8,32,128", "--fid-steps", "1,2",
                     "--name", "fashion_flowmaps2" if stage == "test" else "fashion_flowmaps2_trend"]
            + (["--notes", str(notes.relative_to(ROOT))] if notes.exists() else [])
            + [a for j in jobs for a in ("--variant", j)])


def reuse_round1(runs=ROOT / RECORDS, log=print):
    """Copy the round-1 records of today's best (same overrides) into the runs folder, once, marked
    as reused: older code trained them, so cells they lack stay empty rather than trained again."""
    for run in ("meanflow_fd_j1_sig1_3k", "meanflow_fd_j1_sig1_3k_s1"):
        src, dst = ROUND1 / run, Path(runs) / run
        if src.is_dir() and not dst.exists():
            shutil.copytree(src, dst)
            (dst / "reused.json").write_text(json.dumps({"from": str(src.relative_to(ROOT))}, indent=2) + "\n")
            log(f"reused the round-1 records of {run} ({src.relative_to(ROOT)})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=("tune", "test", "trend"))
    p.add_argument("--pick", default="", help="NAME=meanflow_fd:key=value,... the tuning's pick (without "
                                             "train.max_steps, which each stage sets)")
    p.add_argument("--scale", default="cpu", choices=("cpu", "gpu", "smoke"))
    p.add_argument("--dry-run", action="store_true", help="print the fashion_fewstep.py command and stop")
    args, rest = p.parse_known_args(argv)
    arguments = stage_arguments(args.stage, args.pick, args.scale) + rest
    print("python experiments/fashion_fewstep.py " + shlex.join(arguments), flush=True)
    if args.dry_run:
        return arguments
    if args.stage in ("tune", "test") and args.scale == "cpu":
        reuse_round1(ROOT / arguments[max(i for i, a in enumerate(arguments) if a == "--runs") + 1])
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import fashion_fewstep

    fashion_fewstep.main(arguments)
    return arguments


if __name__ == "__main__":
    main()
