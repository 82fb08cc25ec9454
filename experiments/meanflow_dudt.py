"""Where the MeanFlow target runs away (issue 12): du/dt of trained models, split into its parts.

    python experiments/meanflow_dudt.py --runs /work/flowmaps/runs \
        --models fm_3k,meanflow_3k,meanflow_fd_3k,meanflow_fd_3k_s1 --out docs/results

The MeanFlow target is v - h du/dt with h = t - r the jump length and, along the line
z_t = (1 - t) x + t eps,

    du/dt = d_z u . v        (space: how u changes as the point moves down the line)
          + d_sigma u         (the noise level, jump length held: the sigma embedder)
          + d_jump u          (the jump length, sigma held: the jump embedder)

Each part is taken exactly with torch.func.jvp (tangents (v, 0, 0), (0, 1, 1) and (0, 0, -1)
on (z, t, r), which sum to the objective's (v, 1, 0)) on the exported slow-EMA models, on
the first --images Fashion-MNIST test images with fixed noise, at t uniform in [h, 1] for
each jump length h. Beside them, the central differences the meanflow_fd objective would
take at gaps 5e-3 and 2e-4, and how far the model is from its own target. A one-time model
(flow matching) has only h = 0; its du/dt is the yardstick of a field that trained well.
Writes <out>/<name>.{json,md}. A few seconds per model on one CPU thread.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flowpre.config import ObjectiveConfig  # noqa: E402
from flowpre.eval.classifier import load_split  # noqa: E402
from flowpre.models.dit import forward_mode_kernels  # noqa: E402
from flowpre.objectives import Nets, build  # noqa: E402
from flowpre.weights import load_model  # noqa: E402

JUMPS = [0.0, 0.1, 0.25, 0.5, 0.75, 1.0]
FD_GAPS = [5e-3, 2e-4]


def rms(x):
    return x.double().pow(2).mean().sqrt().item()


def col(t):
    return t.view(-1, 1, 1, 1)


@torch.no_grad()
def measure(model, x, y, h, generator):
    """Parts of du/dt and target errors at jump length h (t uniform in [h, 1], r = t - h)."""
    n = x.shape[0]
    two_time = model.time_inputs == 2
    t = h + (1 - h) * torch.rand(n, generator=generator, dtype=torch.float64)
    t = t.float()
    r = (t - h).clamp(min=0)
    eps = torch.randn(x.shape, generator=generator)
    z, v = (1 - col(t)) * x + col(t) * eps, eps - x

    def u(z_, t_, r_):
        return model(z_, t_, y, sigma_end=r_) if two_time else model(z_, t_, y)

    zero_z, ones, zeros = torch.zeros_like(z), torch.ones_like(t), torch.zeros_like(t)
    with forward_mode_kernels(model):
        pred, space = torch.func.jvp(u, (z, t, r), (v, zeros, zeros))
        _, d_sigma = torch.func.jvp(u, (z, t, r), (zero_z, ones, ones if two_time else zeros))
        d_jump = torch.func.jvp(u, (z, t, r), (zero_z, zeros, -ones))[1] if two_time else torch.zeros_like(z)
    dudt = space + d_sigma + d_jump
    target = v - h * dudt
    out = {"jump": h, "u_rms": rms(pred), "v_rms": rms(v), "dudt_rms": rms(dudt), "space_rms": rms(space),
           "sigma_rms": rms(d_sigma), "jump_rms": rms(d_jump), "target_rms": rms(target),
           "error_rms": rms(pred - target)}
    for gap in FD_GAPS if two_time and h > 0 else []:  # the meanflow_fd objective's own stencil at this gap
        fd = build(ObjectiveConfig(name="meanflow_fd", fd_delta=gap), time_inputs=2).time_derivative(
            Nets(student=model), z, t, r, v, y)
        out[f"fd_{gap:g}_rms"] = rms(fd)
        out[f"fd_{gap:g}_error_rms"] = rms(fd - dudt)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", required=True, help="folder of the experiment's run folders")
    p.add_argument("--models", required=True, help="run names, comma separated (their model.safetensors)")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/results")
    p.add_argument("--name", default="fashion_flowmaps_dudt")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    x, y, _ = load_split("fashion-mnist:test", limit=args.images)
    results = []
    for name in [m for m in args.models.split(",") if m]:
        path = Path(args.runs) / name / "model.safetensors"
        model, meta = load_model(path, kernels="torch")
        generator = torch.Generator().manual_seed(args.seed)  # the same (t, eps) for every model
        jumps = JUMPS if model.time_inputs == 2 else [0.0]
        rows = [measure(model, x, y, h, generator) for h in jumps]
        results.append({"model": name, "time_inputs": model.time_inputs, "rows": rows})
        print(f"{name}: " + ", ".join(f"h={r['jump']:g} du/dt {r['dudt_rms']:.2f}" for r in rows), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"command": "python experiments/meanflow_dudt.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "date": datetime.date.today().isoformat(), "images": args.images, "seed": args.seed,
               "results": results}
    (out / f"{args.name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_markdown(out / f"{args.name}.md", summary)
    print((out / f"{args.name}.md").read_text())


def write_markdown(path, summary):
    lines = [f"# du/dt of trained models, in parts (issue 12)", "",
             f"Produced by `{summary['command']}` on {summary['date']}: the slow-EMA models, the first "
             f"{summary['images']} Fashion-MNIST test images, t uniform in [h, 1], r = t - h, the same noise "
             "for every model. RMS over all pixels; data and noise have unit-ish scale (v rms about 1.2). "
             "The models are the runs' exported weights (not committed; each run's config, metrics and "
             "evaluations are in experiments/records/fashion_flowmaps/). The target column is what the "
             "exact JVP would regress at these points; FD columns are the meanflow_fd stencil at each gap.", "",
             "| model | h = t - r | u | du/dt | space d_z u . v | d_sigma u | d_jump u | target v - h du/dt | "
             "model - target | FD 5e-3 | FD 2e-4 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for res in summary["results"]:
        for r in res["rows"]:
            fd = [f"{r[k]:.2f}" if k in r else "-" for k in ("fd_0.005_rms", "fd_0.0002_rms")]
            lines.append(f"| {res['model']} | {r['jump']:g} | {r['u_rms']:.2f} | {r['dudt_rms']:.2f} | "
                         f"{r['space_rms']:.2f} | {r['sigma_rms']:.2f} | {r['jump_rms']:.2f} | {r['target_rms']:.2f} | "
                         f"{r['error_rms']:.2f} | {fd[0]} | {fd[1]} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
