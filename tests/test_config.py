import subprocess
import sys

import pytest

from flowpre.config import ConfigError, load_config


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_required_keys_exist_with_their_names(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  max_steps: 7\n"),
                      ["run.dir=/tmp/x", "train.batch_size=12", "train.checkpoint_every=3", "train.resume=auto",
                       "train.seed=5", "train.lr=0.001", "deepspeed.zero_stage=3", "data.shards=a/{0..3}.tar",
                       "data.num_workers=0", "model.name=DiT-B/4", "objective.name=fm", "sample.every=9",
                       "sample.steps=[1,2,8]"])
    assert (cfg.train.max_steps, cfg.train.batch_size, cfg.train.checkpoint_every) == (7, 12, 3)
    assert (cfg.train.resume, cfg.train.seed, cfg.train.lr) == ("auto", 5, 0.001)
    assert cfg.deepspeed.zero_stage == 3 and cfg.data.shards == "a/{0..3}.tar" and cfg.data.num_workers == 0
    assert cfg.model.name == "DiT-B/4" and cfg.objective.name == "fm"
    assert cfg.sample.every == 9 and cfg.sample.steps == [1, 2, 8] and cfg.run.dir == "/tmp/x"


def test_override_beats_file(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  lr: 0.5\n"), ["train.lr=0.25"])
    assert cfg.train.lr == 0.25


@pytest.mark.parametrize("text,key", [
    ("train:\n  max_step: 3\n", "train.max_step"),
    ("trian:\n  max_steps: 3\n", "trian"),
])
def test_unknown_key_names_key_and_file(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert key in str(e.value) and str(path) in str(e.value)


def test_misspelt_key_suggests_the_right_one(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'train.max_steps'"):
        load_config(write(tmp_path, "train:\n  max_step: 3\n"))


@pytest.mark.parametrize("override,needle", [
    ("train.max_steps=abc", "expected an integer"),
    ("train.max_steps=0", ">= 1"),
    ("deepspeed.zero_stage=4", "<= 3"),
    ("objective.name=bogus", "must be one of"),
    ("data.hflip=3", "true or false"),
    ("sample.steps=[1,0]", "sample.steps"),
])
def test_bad_values_name_the_key(override, needle):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert key in str(e.value) and needle in str(e.value) and "command line" in str(e.value)


def test_cli_exits_nonzero_naming_key(tmp_path):
    path = write(tmp_path, "train:\n  batch_sise: 4\n")
    r = subprocess.run([sys.executable, "-m", "flowpre.cli", "train", "--config", str(path)],
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert "train.batch_sise" in r.stderr and str(path) in r.stderr


def test_experiment_configs_differ_only_in_the_objective():
    """configs/experiments/fashion_*.yaml: equal compute and settings, only objective.name (and the run
    folder; model.time_inputs and the time embedders' scales for the two-time MeanFlow pair) differ."""
    import dataclasses
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs" / "experiments"
    names = ("fm", "scfm", "shortcut", "meanflow", "meanflow_fd")
    assert sorted(p.stem for p in root.glob("fashion_*.yaml")) == sorted(f"fashion_{n}" for n in names)
    loaded = {name: dataclasses.asdict(load_config(root / f"fashion_{name}.yaml")) for name in names}
    for name, cfg in loaded.items():
        assert cfg["objective"]["name"] == name and cfg["run"]["dir"].endswith(f"fashion_{name}")
        assert cfg["model"]["time_inputs"] == (2 if name.startswith("meanflow") else 1)
        assert cfg["model"]["jump_scale"] == (1.0 if name.startswith("meanflow") else 1000.0)  # auto
        assert cfg["model"]["sigma_scale"] == (1.0 if name.startswith("meanflow") else 1000.0)  # auto
        for section in cfg:
            a, b = dict(loaded["fm"][section]), dict(cfg[section])
            for d in (a, b):
                d.pop("name", None) if section == "objective" else None
                d.pop("dir", None) if section == "run" else None
                [d.pop(k, None) for k in ("time_inputs", "jump_scale", "sigma_scale")] if section == "model" else None
            assert a == b, (name, section)


@pytest.mark.parametrize("where", ["file", "command line"])
def test_on_off_words_survive_yaml_booleans(tmp_path, where):
    """YAML 1.1 reads on/off as booleans; logging.wandb / logging.progress take them as the words."""
    if where == "file":
        cfg = load_config(write(tmp_path, "logging:\n  wandb: off\n  progress: on\n"))
    else:
        cfg = load_config(None, ["logging.wandb=off", "logging.progress=on"])
    assert (cfg.logging.wandb, cfg.logging.progress) == ("off", "on")
    assert load_config(None, ["logging.progress=off"]).logging.progress == "off"
    with pytest.raises(ConfigError, match="logging.wandb"):  # 'on' is not a wandb mode: still an error naming it
        load_config(None, ["logging.wandb=on"])
    with pytest.raises(ConfigError, match="train.resume"):  # keys without on/off choices keep rejecting booleans
        load_config(None, ["train.resume=off"])


@pytest.mark.parametrize("text,where,needle", [
    ("model:\n  name: [DiT-S/2\ntrain:\n  max_steps: 3\n", "line 3, column 6", "flow sequence that starts at line 2, column 9"),
    ("train:\n\tmax_steps: 3\n", "line 2, column 1", "'\\t'"),
    ("- run\n- model\n", "line 1, column 1", "expected a mapping of sections at the top level"),
    ("run:\n  dir: r\nmodel: DiT-S/2\n", "line 3, column 8", "section 'model' must be a mapping"),
    ("train: [1, 2]\n", "line 1, column 8", "got a list"),
])
def test_yaml_that_does_not_parse_names_file_line_and_column(tmp_path, text, where, needle):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert f"{path} at {where}" in str(e.value) and needle in str(e.value), str(e.value)


def test_yaml_errors_on_the_command_line_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"command line: override 'model.name=\[DiT' at column 16"):
        load_config(None, ["model.name=[DiT"])
    path = write(tmp_path, "model:\n  name: [DiT-S/2\n")
    r = subprocess.run([sys.executable, "-m", "flowpre.cli", "train", "--config", str(path)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"flowpre train: error: {path} at line 3, column 1")
    assert load_config(write(tmp_path, "run:\ntrain:\n  max_steps: 3\n")).train.max_steps == 3  # empty section
