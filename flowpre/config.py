"""Typed configuration: dataclasses, YAML files, dotted overrides, strict validation.

    cfg = load_config("configs/quickstart.yaml", ["train.max_steps=50", "sample.steps=[1,4]"])

Every key is declared below with its type and, where it has one, its range. A key
that is not declared, a value of the wrong type, or a value out of range raises
ConfigError naming the key and where it came from (the file or the command line).
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and its source."""


def _range(lo=None, hi=None, choices=None):
    return {"lo": lo, "hi": hi, "choices": choices}


def _f(default, lo=None, hi=None, choices=None):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=_range(lo, hi, choices))
    return field(default=default, metadata=_range(lo, hi, choices))


@dataclass
class RunConfig:
    dir: str = _f("runs/default")
    # a new run (train.resume=none) into a folder holding another run's files: true moves them into
    # run.dir/replaced-<time>/ first; false refuses (flowpre/train/run_folder.py)
    overwrite: bool = _f(False)
    # seconds without a heartbeat after which another host's lock on run.dir counts as stale
    lock_timeout: float = _f(120.0, lo=0.1)


@dataclass
class ModelConfig:
    name: str = _f("DiT-S/4")  # a key of flowpre.models.dit.DIT_SIZES
    # 0 = read from the shards' dataset.json (channels, size, classes)
    in_channels: int = _f(0, lo=0)
    image_size: int = _f(0, lo=0)
    num_classes: int = _f(0, lo=0)
    kernels: str = _f("auto", choices=("auto", "triton", "torch"))
    init: str = _f("")  # start the student (and EMAs) from an exported .safetensors
    # caption conditioning (flowpre/text.py): a local CLIP text model, T5 encoder or BERT folder,
    # or pkg:NAME for the model folder an installed package ships (flowpre text-encoders lists them)
    text_encoder: str = _f("")
    text_max_length: int = _f(77, lo=1)
    # keep the encodings of this many captions (0 = encode every batch): for datasets whose
    # captions repeat every epoch; each takes (1 + text_max_length) x encoder width x 4 bytes
    text_cache: int = _f(0, lo=0)
    # 2 = the DiT also takes the jump's end sigma_end (METHOD.md section 8); needed by meanflow(_fd)
    time_inputs: int = _f(1, choices=(1, 2))
    # two-time models: the jump length h enters sinusoids of jump_scale * h * 10000^(-i/128), so
    # jump_scale is the top frequency in radians per unit of h. 0 = auto: 1 for meanflow(_fd), whose
    # target h du/dt runs away on fast jump features (docs/results/fashion_flowmaps.md), else 1000
    # (sigma's own scale, and what every two-time model had before this key)
    jump_scale: float = _f(0.0, lo=0.0)
    # the noise level sigma enters sinusoids of sigma_scale * sigma * 10000^(-i/128): sigma_scale is
    # their top frequency in radians per unit of sigma. 0 = auto: 1 for meanflow(_fd), whose target
    # h du/dt amplifies fast sigma features as it does jump features (fashion_flowmaps.md), else 1000
    # (as in DiT, and every model before this key)
    sigma_scale: float = _f(0.0, lo=0.0)


@dataclass
class ObjectiveConfig:
    name: str = _f("fm", choices=("fm", "scfm", "shortcut", "meanflow", "meanflow_fd"))
    cond_drop_prob: float = _f(0.1, lo=0.0, hi=1.0)
    sigma_sampler: str = _f("logit_normal", choices=("uniform", "logit_normal"))
    logit_mean: float = _f(0.0)
    logit_std: float = _f(1.0, lo=0.0)
    sigma_shift: float = _f(1.0, lo=1e-3)
    # per-sample loss weight stopgrad(1 / (mse_i + c)^p) (METHOD.md section 8); auto = adaptive
    # for meanflow and meanflow_fd (as MeanFlow trains), none for the others
    loss_weighting: str = _f("auto", choices=("auto", "none", "adaptive"))
    loss_weight_p: float = _f(1.0, lo=0.0)
    loss_weight_c: float = _f(1e-3, lo=0.0)
    # SCFM (objectives/scfm.py); for meanflow(_fd) the share of samples with r = t
    fm_fraction: float = _f(0.75, lo=0.0, hi=1.0)
    n_max: int = _f(16, lo=2)
    n_weighting: str = _f("uniform", choices=("uniform", "small"))
    shift_min: float = _f(2.5, lo=1e-3)
    shift_max: float = _f(4.5, lo=1e-3)
    # guidance folded into the training target: the effective CFG scale the trained model samples
    # with at sampler cfg 1 (one forward per step); 1 = none. scfm / shortcut: guided EMA velocities;
    # meanflow(_fd): MeanFlow's CFG target, omega = guidance_scale * (1 - guidance_mix) (objectives/meanflow.py)
    guidance_scale: float = _f(1.0, lo=0.0)
    # meanflow's kappa: share of the student's own conditional velocity in the CFG target (one more
    # no-grad forward per sample when > 0)
    guidance_mix: float = _f(0.0, lo=0.0, hi=0.99)
    step_conditioning: bool = _f(False)  # METHOD.md section 7: SCFM with a step-size input (scfm.py)
    teacher: str = _f("")  # distillation mode: a frozen exported .safetensors
    teacher_fraction: float = _f(0.4, lo=0.0, hi=1.0)
    teacher_grid: int = _f(32, lo=2)
    # finite-difference MeanFlow (objectives/meanflow.py): half the gap of the central difference,
    # and the network that makes its two no-grad forwards
    fd_delta: float = _f(5e-3, lo=1e-6, hi=0.25)
    fd_network: str = _f("student", choices=("student", "ema_fast"))
    # meanflow(_fd): the tangent of du/dt: v = eps - x (MeanFlow), or predicted = the student's own
    # no-grad instantaneous velocity u(z, t, t) (iMF; one more forward on the jump share)
    fd_direction: str = _f("v", choices=("v", "predicted"))
    # meanflow(_fd): r and t are two sorted draws of the sigma sampler (pair), or r's draw comes from
    # logit-normal(r_logit_mean, r_logit_std) (logit_normal: with a negative mean, more jumps end near r = 0)
    r_sampler: str = _f("pair", choices=("pair", "logit_normal"))
    r_logit_mean: float = _f(-2.0)
    r_logit_std: float = _f(1.0, lo=0.0)
    # meanflow(_fd), objectives/curriculum.py: plain flow matching for the first curriculum_warmup of
    # train.max_steps, then over curriculum_ramp the jump share and the largest jump rise linearly
    curriculum: bool = _f(False)
    curriculum_warmup: float = _f(0.1, lo=0.0, hi=1.0)
    curriculum_ramp: float = _f(0.4, lo=0.0, hi=1.0)
    # Shortcut Models baseline (objectives/shortcut.py)
    bootstrap_fraction: float = _f(0.125, lo=0.0, hi=1.0)


@dataclass
class DataConfig:
    shards: str = _f("data/fashion-mnist/train-{000000..000011}.tar")
    num_workers: int = _f(2, lo=0)
    hflip: bool = _f(True)
    shuffle_buffer: int = _f(2000, lo=0)  # job-wide total, split over the streams
    # logical streams (flowpre/data/streams.py): fixed for a run (checkpoints record it), so the sample order
    # does not depend on the world size; ranks x max(1, num_workers) must divide it. 0 = auto at the first start
    streams: int = _f(0, lo=0)


@dataclass
class TrainConfig:
    max_steps: int = _f(1000, lo=1)
    batch_size: int = _f(64, lo=1)  # global: micro batch x grad accumulation x ranks
    grad_accum: int = _f(1, lo=1)
    activation_checkpointing: bool = _f(False)  # recompute each DiT block in the backward
    compile: bool = _f(False)  # torch.compile each DiT block (flowpre/train/engine.py)
    lr: float = _f(1e-4, lo=0.0)
    weight_decay: float = _f(0.0, lo=0.0)
    betas: list = _f([0.9, 0.999])
    warmup_steps: int = _f(0, lo=0)
    grad_clip: float = _f(1.0, lo=0.0)  # 0 = off
    precision: str = _f("auto", choices=("auto", "fp32", "bf16"))  # auto: bf16 on CUDA
    seed: int = _f(0, lo=0)
    checkpoint_every: int = _f(500, lo=0)  # 0 = only at the end
    # false: the run ends without its last checkpoint, export and sample grids (benchmark
    # runs, where writing a DiT-XL checkpoint would cost more than the steps measured)
    final_checkpoint: bool = _f(True)
    keep_checkpoints: int = _f(2, lo=1)
    resume: str = _f("none")  # none | auto | path to a checkpoint folder
    log_every: int = _f(10, lo=1)
    # a step with a non-finite loss or grad norm is skipped on every rank; this many in a row stop the run
    max_skipped_steps: int = _f(10, lo=1)


@dataclass
class EmaConfig:
    # The fast EMA is the SC teacher; it lags the student by about 1/(1 - decay) steps.
    # 0.99 (METHOD.md) suits long runs; in runs of a few thousand steps that lag drags the
    # few-step targets, and 0.9 gave better FD at every step count on Fashion-MNIST
    # (docs/results/fashion_fewstep_tuning.md).
    fast_decay: float = _f(0.99, lo=0.0, hi=1.0)
    slow_decay: float = _f(0.999, lo=0.0, hi=1.0)  # the second chord target; exported and sampled by default
    restart_every: int = _f(0, lo=0)  # copy the student into both EMAs every K steps; 0 = never


@dataclass
class DeepSpeedConfig:
    zero_stage: int = _f(2, lo=0, hi=3)
    template: str = _f("")  # JSON file; default configs/deepspeed/zero{stage}.json
    offload_optimizer: str = _f("none", choices=("none", "cpu"))  # ZeRO-Offload (stages 1-3)


@dataclass
class SampleConfig:
    every: int = _f(500, lo=0)  # 0 = only at the end
    steps: list = _f([1, 4, 32])
    shift: float = _f(1.0, lo=1e-3)
    cfg_scale: float = _f(1.0, lo=0.0)
    num_images: int = _f(40, lo=1)
    seed: int = _f(0, lo=0)
    prompts: list[str] = _f([])  # text models; empty = the captions of the first training samples


@dataclass
class LoggingConfig:
    wandb: str = _f("off", choices=("off", "offline", "online"))
    project: str = _f("flowpre")
    name: str = _f("")  # default: the run folder's name
    tags: str = _f("")  # comma-separated
    progress: str = _f("auto", choices=("auto", "on", "off"))  # progress bar; auto = when stderr is a terminal


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# --- loading -------------------------------------------------------------------------

def _fields(cls):
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def _coerce(value, typ, key, source):
    """Check (and gently convert) one value; ints are accepted where floats are."""
    def bad(why):
        return ConfigError(f"{source}: key '{key}': {why} (got {value!r})")

    if typ is bool:
        if isinstance(value, bool):
            return value
        raise bad("expected true or false")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad("expected an integer")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad("expected a number")
    if typ is str:
        if isinstance(value, str):
            return value
        if value is None:
            return "none"
        raise bad("expected a string")
    if typ == list[str]:
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
        raise bad("expected a list of strings")
    if typ is list:
        if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return list(value)
        raise bad("expected a list of numbers")
    raise bad(f"unsupported type {typ}")


def _word_from_bool(value, typ, meta):
    """YAML 1.1 reads on/off/yes/no as booleans; a word-valued key whose choices are
    on/off spellings gets the word back (`logging.wandb=off` from a file or the command line)."""
    choices = meta.get("choices") or ()
    if typ is str and isinstance(value, bool) and ("on" in choices or "off" in choices):
        return "on" if value else "off"
    return value


def _check_range(value, meta, key, source):
    lo, hi, choices = meta.get("lo"), meta.get("hi"), meta.get("choices")
    items = value if isinstance(value, list) else [value]
    for v in items:
        if choices is not None and v not in choices:
            raise ConfigError(f"{source}: key '{key}': must be one of {list(choices)} (got {v!r})")
        if lo is not None and v < lo:
            raise ConfigError(f"{source}: key '{key}': must be >= {lo} (got {v!r})")
        if hi is not None and v > hi:
            raise ConfigError(f"{source}: key '{key}': must be <= {hi} (got {v!r})")


def _set(cfg: Config, key: str, value, source: str):
    parts = key.split(".")
    node = cfg
    for depth, part in enumerate(parts):
        known = _fields(type(node))
        if part not in known:
            prefix = ".".join(parts[:depth])
            names = [f"{prefix}.{n}" if prefix else n for n in known]
            hint = difflib.get_close_matches(key, names, n=1)
            did_you_mean = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(f"{source}: unknown key '{key}'{did_you_mean}")
        f, typ = known[part]
        if depth == len(parts) - 1:
            if dataclasses.is_dataclass(typ):
                if not isinstance(value, dict):
                    raise ConfigError(f"{source}: key '{key}': expected a section (mapping)")
                for sub, v in value.items():
                    _set(cfg, f"{key}.{sub}", v, source)
                return
            value = _coerce(_word_from_bool(value, typ, f.metadata), typ, key, source)
            _check_range(value, f.metadata, key, source)
            setattr(node, part, value)
            return
        if not dataclasses.is_dataclass(typ):
            raise ConfigError(f"{source}: key '{key}': '{'.'.join(parts[:depth + 1])}' is not a section")
        node = getattr(node, part)


def _validate_together(cfg: Config, source: str):
    """Constraints between keys."""
    if len(cfg.train.betas) != 2:
        raise ConfigError(f"{source}: key 'train.betas': expected two numbers")
    if not cfg.sample.steps or any(int(s) != s or s < 1 for s in cfg.sample.steps):
        raise ConfigError(f"{source}: key 'sample.steps': expected a list of positive integers")
    cfg.sample.steps = [int(s) for s in cfg.sample.steps]
    if cfg.objective.name in ("meanflow", "meanflow_fd") and cfg.model.time_inputs != 2:
        raise ConfigError(f"{source}: key 'model.time_inputs': objective.name={cfg.objective.name} needs a two-time "
                          f"model (model.time_inputs=2), got {cfg.model.time_inputs}")
    meanflow = cfg.objective.name in ("meanflow", "meanflow_fd")
    if cfg.model.jump_scale == 0:
        cfg.model.jump_scale = 1.0 if meanflow else 1000.0
    if cfg.model.sigma_scale == 0:
        cfg.model.sigma_scale = 1.0 if meanflow else 1000.0
    for key in ("curriculum", "fd_direction", "r_sampler"):
        if getattr(cfg.objective, key) != getattr(ObjectiveConfig, key) and not meanflow:
            raise ConfigError(f"{source}: key 'objective.{key}': implemented for objective.name=meanflow and "
                              f"meanflow_fd only, got objective.name={cfg.objective.name}")
    if cfg.objective.curriculum and cfg.objective.curriculum_warmup + cfg.objective.curriculum_ramp > 1:
        raise ConfigError(f"{source}: key 'objective.curriculum_ramp': curriculum_warmup + curriculum_ramp must be "
                          f"<= 1 (fractions of train.max_steps), got {cfg.objective.curriculum_warmup} + "
                          f"{cfg.objective.curriculum_ramp}")
    if cfg.objective.name == "meanflow" and cfg.deepspeed.zero_stage == 3:
        raise ConfigError(f"{source}: key 'deepspeed.zero_stage': objective.name=meanflow takes a JVP through the "
                          "student, and ZeRO-3's parameter hooks are autograd functions without a forward-mode "
                          "rule; use ZeRO 0-2, or objective.name=meanflow_fd (the JVP-free target) under ZeRO-3")
    if cfg.train.compile and cfg.deepspeed.zero_stage == 3:
        # measured on 2 CPU ranks (gloo): DeepSpeed's ZeRO-3 gather/release hooks on every layer are
        # torch.compiler.disable'd, so each block's graph breaks at every Linear and whole frames fall
        # back to eager; the run trains, but ran slower than without compile
        raise ConfigError(f"{source}: key 'train.compile': train.compile=true does not work with "
                          "deepspeed.zero_stage=3 (ZeRO-3's per-layer parameter hooks break every compiled "
                          "block into eager pieces); use deepspeed.zero_stage 0-2, or train.compile=false")
    if cfg.objective.name == "shortcut" and cfg.model.time_inputs != 1:
        raise ConfigError(f"{source}: key 'model.time_inputs': objective.name=shortcut conditions on the step size "
                          "through its own embedder; use model.time_inputs=1")
    if cfg.train.batch_size % cfg.train.grad_accum:
        raise ConfigError(f"{source}: key 'train.batch_size': {cfg.train.batch_size} is not divisible by "
                          f"train.grad_accum={cfg.train.grad_accum}")


def _where(mark):
    return f"line {mark.line + 1}, column {mark.column + 1}"


def _kind(node):
    name = node.tag.rsplit(":", 1)[-1]
    return {"seq": "a list", "str": "a string", "int": "a number", "float": "a number", "bool": "true/false",
            "map": "a mapping"}.get(name, name) + f" ({node.value!r})" * isinstance(node, yaml.ScalarNode)


def _read_yaml(path):
    """The file's sections as a dict; a YAML syntax error, or a top level or section that is not a
    mapping, is a ConfigError naming the file, line and column."""
    text = path.read_text()
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)  # nodes with positions, for the checks below
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f" at {_where(mark)}" if mark else ""
        # where the construct began, often the line with the mistake (an unclosed bracket)
        began = (f" ({e.context.removeprefix('while parsing ')} that starts at {_where(e.context_mark)})"
                 if e.context and e.context_mark and e.problem_mark and e.context_mark.line != e.problem_mark.line else "")
        raise ConfigError(f"{path}{at}: not valid YAML: {e.problem or e.context}{began}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if root is None:
        return {}
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(f"{path} at {_where(root.start_mark)}: expected a mapping of sections at the top level "
                          f"(section: key: value), got {_kind(root)}")
    sections = _fields(Config)
    for key, value in root.value:
        if isinstance(key, yaml.ScalarNode) and key.value in sections and not isinstance(value, yaml.MappingNode) and value.tag != "tag:yaml.org,2002:null":
            raise ConfigError(f"{path} at {_where(value.start_mark)}: section '{key.value}' must be a mapping of "
                              f"keys (indented 'key: value' lines below it), got {_kind(value)}")
    return {k: ({} if v is None and k in sections else v) for k, v in data.items()}


def _parse_override(item, text):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        # the column within the whole key=value argument, as the user typed it
        at = f" at column {len(item) - len(text) + mark.column + 1}" if mark else ""
        raise ConfigError(f"command line: override {item!r}{at}: not valid YAML: "
                          f"{getattr(e, 'problem', None) or e}") from None


def load_config(path=None, overrides=()) -> Config:
    """Defaults, then the YAML file, then each `key=value` override (value parsed as YAML)."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        data = _read_yaml(path)
        for key, value in data.items():
            _set(cfg, key, value, str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        _set(cfg, key.strip(), _parse_override(item, text) if text.strip() else "", "command line")
    _validate_together(cfg, str(path) if path else "command line")
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path):
    from flowpre.atomic import write_text

    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
