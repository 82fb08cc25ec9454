"""Command-line argument types shared by several commands (`flowpre sample`, `flowpre eval`,
the experiment scripts), kept below all of them so none imports another's entry point."""
import argparse


def parse_steps(text):
    """`--steps 1,4,32` (or a list already parsed) -> [1, 4, 32]; shared by sample and eval."""
    if isinstance(text, (list, tuple)):
        text = ",".join(str(s) for s in text)
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps expects comma-separated integers, got {text!r}")
    if not steps or min(steps) < 1:
        raise argparse.ArgumentTypeError(f"--steps expects positive integers, got {text!r}")
    return steps


def parse_scales(text):
    """`--cfg 1,1.5,2` (a number, or a list already parsed) -> [1.0, 1.5, 2.0], without repeats."""
    if isinstance(text, (int, float)):
        text = str(text)
    if isinstance(text, (list, tuple)):
        text = ",".join(str(s) for s in text)
    try:
        scales = [float(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--cfg expects comma-separated numbers, got {text!r}")
    if not scales or min(scales) < 0:
        raise argparse.ArgumentTypeError(f"--cfg expects non-negative guidance scales, got {text!r}")
    return list(dict.fromkeys(scales))
