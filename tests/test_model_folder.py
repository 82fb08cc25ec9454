"""`flowpre export --format folder`: a real 2-step run on Fashion-MNIST shards exported as a model
folder, its config.json and model card (front matter parsed back by huggingface_hub), `flowpre
eval` and `flowpre sample` on the folder, the card's eval table, model.init / objective.teacher
from the folder, and the folder written atomically without overwriting what is not a model."""
import argparse
import json
import statistics

import pytest
import torch

import flowpre
from flowpre.config import load_config
from flowpre.data.shards import write_shards
from flowpre.train.loop import build_model
from flowpre.weights import WeightsError, load_model

from helpers import flowpre as run_cli, metrics, train

huggingface_hub = pytest.importorskip("huggingface_hub")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder_run")
    write_shards("fashion-mnist", root / "shards", shard_size=100, split="train", limit=200)
    train(root / "run", str(root / "shards" / "train-*.tar"), "train.max_steps=2")
    return root / "run"


def test_folder_layout_config_and_card(run, tmp_path):
    out = tmp_path / "fashion-dit"
    r = run_cli("export", "--run", str(run), "--out", str(out), "--format", "folder")
    assert f"wrote model folder {out}" in r.stdout
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "samples.png",
                                                     "training_config.yaml"]
    assert not list(tmp_path.glob(".fashion-dit*"))  # no temporary folder left behind
    config = json.loads((out / "config.json").read_text())
    file_meta = flowpre.load(run / "model.safetensors").config
    assert config["model"]["hidden"] == 32 and config["step"] == 2 and config["objective"] == "fm"
    assert config["dataset"]["name"] == "fashion-mnist" and config["time_inputs"] == 1
    assert config["time_embedding"] == {"sigma_scale": 1000.0} and config["conditioning"] == "class"
    assert (out / "training_config.yaml").read_text() == (run / "config.yaml").read_text()
    # the folder's weights are the run's final weights (both the slow EMA of step 2)
    a, b = (load_model(p, kernels="torch")[0].state_dict() for p in (out, run / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a) and file_meta["step"] == 2
    card = huggingface_hub.ModelCard.load(out / "README.md")
    assert card.data.license == "mit" and card.data.library_name == "flowpre"
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert card.data.datasets == ["zalando-datasets/fashion_mnist"] and "flow-matching" in card.data.tags
    logged = metrics(run)
    median = statistics.median(r["samples_per_s"] for r in logged)
    for text in ("| images seen | 16 |", "| steps | 2 |", "| hardware | 1 x cpu |", f"{median:,.1f} img/s",
                 "Fashion-MNIST", "flowpre.load(", "![samples at 1, 2 and 4 steps](samples.png)", "Not evaluated"):
        assert text in card.text, text
    from PIL import Image
    assert Image.open(out / "samples.png").size[0] > 10 * 28  # ten class columns


def test_eval_and_sample_take_the_folder_and_the_card_shows_the_scores(run, tmp_path):
    from flowpre.eval import evaluate

    out = tmp_path / "model"
    run_cli("export", "--run", str(run), "--out", str(out), "--format", "folder")
    scores = tmp_path / "eval.json"
    args = argparse.Namespace(weights=str(out), metric="fd", num_samples=64, steps="1,2", batch_size=32, seed=0,
                              device="cpu", out=str(scores))
    result = evaluate.run(args, log=lambda *a: None)
    run_cli("sample", "--weights", str(out), "--steps", "1,2", "--num", "3", "--out", str(tmp_path / "g.png"))
    assert (tmp_path / "g.png").is_file()
    run_cli("export", "--run", str(run), "--out", str(out), "--format", "folder", "--eval", str(scores),
            "--license", "apache-2.0")  # replaces the folder written above
    card = huggingface_hub.ModelCard.load(out / "README.md")
    assert card.data.license == "apache-2.0"
    found = {(e.metric_type, e.metric_config): e.metric_value for e in card.data.eval_results}
    for steps in ("1", "2"):
        assert found[("fd", f"steps={steps}")] == pytest.approx(result["results"][steps]["fd"], abs=1e-6)
        assert f"| {steps} | {result['results'][steps]['fd']:.4f} |" in card.text
    assert "fd" in card.data.metrics
    # an eval of other weights is refused, and the folder stays as it was
    other = dict(json.loads(scores.read_text()), model_step=999)
    (tmp_path / "other.json").write_text(json.dumps(other))
    before = (out / "README.md").read_text()
    r = run_cli("export", "--run", str(run), "--out", str(out), "--format", "folder", "--eval",
                str(tmp_path / "other.json"), check=False)
    assert r.returncode == 2 and "evaluated the weights of step 999, the export is of step 2" in r.stderr
    assert (out / "README.md").read_text() == before


def test_training_starts_from_a_folder(run, tmp_path):
    out = tmp_path / "m"
    run_cli("export", "--run", str(run), "--out", str(out), "--format", "folder")
    cfg = load_config(None, [f"model.init={out}", "model.kernels=torch"])
    dataset = json.loads((out / "config.json").read_text())["dataset"]
    student = build_model(cfg, dataset)
    loaded, _ = load_model(out / "model.safetensors", kernels="torch")
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in student.state_dict().items())
    teacher, meta = load_model(out, kernels="torch", source="objective.teacher")  # the teacher's loader
    assert meta["step"] == 2 and teacher.hidden == 32


def test_export_refuses_to_overwrite_what_is_not_a_model_folder(run, tmp_path):
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "thesis.txt").write_text("keep me")
    r = run_cli("export", "--run", str(run), "--out", str(precious), "--format", "folder", check=False)
    assert r.returncode == 2 and "not a flowpre model folder" in r.stderr and "not overwriting" in r.stderr
    assert [p.name for p in precious.iterdir()] == ["thesis.txt"]
    r = run_cli("export", "--run", str(run), "--out", str(tmp_path / "m.safetensors"), "--eval", "x.json",
                check=False)
    assert r.returncode != 0 and "add --format folder" in r.stderr
    with pytest.raises(WeightsError, match="without model.safetensors"):
        load_model(precious)


def test_text_latent_card_and_a_failed_write_leaves_nothing(tmp_path):
    """Without a training run: a text model's card, and an export that fails half-way (no prompts
    for the grid) removes its temporary folder and leaves the old folder as it was."""
    pytest.importorskip("transformers")
    from flowpre.model_card import model_card
    from flowpre.model_folder import write_model_folder
    from flowpre.text import TextEncoder

    from helpers import random_dit, save_tiny_bert

    text = TextEncoder(str(save_tiny_bert(tmp_path / "bert")), max_length=8)
    model = random_dit(text_dim=text.dim, text_tokens=text.tokens, time_inputs=2)
    meta = {"model": model.config(), "step": 5, "objective": "meanflow", "samples": 40, "world_size": 2,
            "device": "NVIDIA H100", "text_encoder": text.describe(),
            "dataset": {"name": "twemoji", "channels": 1, "height": 8, "width": 8, "has_captions": True}}
    card = model_card("emoji", meta, "ema_slow", 123, {"train": {"batch_size": 8}}, [])
    parsed = huggingface_hub.ModelCard(str(card))
    assert parsed.data.pipeline_tag == "text-to-image" and parsed.data.license == "cc-by-4.0"
    assert parsed.data.datasets is None and "meanflow" in parsed.data.tags
    assert "| hardware | 2 x NVIDIA H100 |" in card.text and "two times" in card.text and 'prompt="' in card.text
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("data:\n  shards: /nonexistent/*.tar\nsample:\n  prompts: []\n")
    out = tmp_path / "emoji"
    out.mkdir()
    (out / "model.safetensors").write_text("an older export")
    with pytest.raises(WeightsError, match="no prompts for the sample grid"):
        write_model_folder(out, model.state_dict(), meta, "ema_slow", run)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".emoji")] == []
    assert (out / "model.safetensors").read_text() == "an older export"
    (run / "config.yaml").write_text("data:\n  shards: /nonexistent/*.tar\nsample:\n  prompts: [a dog, red heart]\n")
    write_model_folder(out, model.state_dict(), meta, "ema_slow", run)
    pipe = flowpre.load(out, kernels="torch")
    assert pipe.model.time_inputs == 2 and len(pipe(prompt="a dog", num_inference_steps=2).images) == 1
