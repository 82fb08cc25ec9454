"""The time embedders' frequency scales, model.jump_scale and model.sigma_scale: what they
stretch, their auto values, how they travel with exported files and checkpoints, and the
refusals when a file was trained at another scale (docs/results/fashion_flowmaps.md)."""
import json

import pytest
import torch

from flowpre.config import ConfigError, load_config
from flowpre.models.dit import build_dit
from flowpre.train.checkpoint import check_same_model
from flowpre.train.loop import build_model
from flowpre.weights import load_model, save_weights

DATASET = {"channels": 1, "height": 8, "width": 8, "num_classes": 10}


def two_time_dit(**scales):
    return build_dit("DiT-2x32x2/4", 1, 8, 10, kernels="torch", time_inputs=2, **scales).double()


def export(model, path):
    return save_weights(model.state_dict(), path, {"model": model.config(), "step": 0}, "student")


@pytest.mark.parametrize("key, scaled, other", [("jump_scale", "jump_embed", "t_embed"),
                                                ("sigma_scale", "t_embed", "jump_embed")])
def test_a_scale_stretches_its_embedder_only_and_travels_with_the_weights(tmp_path, key, scaled, other):
    """Scale s at time value a is scale 1000 at s a / 1000; the other embedder is untouched;
    the slow embedder moves far less per unit of time; exported files keep the scale."""
    slow, fast = two_time_dit(**{key: 2.5}), two_time_dit()
    with torch.no_grad():
        for p in slow.parameters():
            p.normal_(0, 0.2)
    fast.load_state_dict(slow.state_dict())
    a = torch.rand(16, dtype=torch.float64)
    torch.testing.assert_close(getattr(slow, scaled)(a), getattr(fast, scaled)(a * 2.5 / 1000))
    torch.testing.assert_close(getattr(slow, other)(a), getattr(fast, other)(a))
    # d/da of the embedding is bounded by scale x the MLP's gain
    d_slow = torch.func.jvp(getattr(slow, scaled), (a,), (torch.ones_like(a),))[1]
    d_fast = torch.func.jvp(getattr(fast, scaled), (a,), (torch.ones_like(a),))[1]
    assert d_slow.abs().max() * 50 < d_fast.abs().max()
    g = torch.Generator().manual_seed(0)
    x, c = torch.rand(16, 1, 8, 8, generator=g, dtype=torch.float64) * 2 - 1, torch.randint(0, 10, (16,), generator=g)
    sigma = 0.2 + 0.8 * torch.rand(16, generator=g, dtype=torch.float64)
    assert not torch.allclose(slow(x, sigma, c, sigma_end=sigma / 2), fast(x, sigma, c, sigma_end=sigma / 2))
    assert slow.config()[key] == 2.5
    loaded, _ = load_model(export(slow, tmp_path / "m.safetensors"), kernels="torch")
    assert getattr(loaded, scaled).scale == 2.5
    torch.testing.assert_close(loaded.double()(x, sigma, c, sigma_end=sigma / 2), slow(x, sigma, c, sigma_end=sigma / 2),
                               atol=1e-4, rtol=1e-3)  # the file holds fp32


@pytest.mark.parametrize("key", ["jump_scale", "sigma_scale"])
def test_auto_scale_is_slow_for_meanflow_only(key):
    """0 = auto: 1 for the MeanFlow objectives, whose target h du/dt amplifies fast features; 1000 otherwise."""
    for name, scale in (("meanflow", 1.0), ("meanflow_fd", 1.0), ("scfm", 1000.0), ("fm", 1000.0)):
        assert getattr(load_config(None, ["model.time_inputs=2", f"objective.name={name}"]).model, key) == scale, name
    assert getattr(load_config(None, ["model.time_inputs=2", "objective.name=meanflow_fd", f"model.{key}=1000"]).model,
                   key) == 1000.0
    with pytest.raises(ConfigError, match=f"model.{key}"):
        load_config(None, [f"model.{key}=-1"])


def test_files_carry_a_scale_only_where_it_was_always_written_or_differs():
    """One-time files have no jump_scale and files at sigma 1000 no sigma_scale: they stay
    byte-for-byte what they were before the keys existed."""
    assert "jump_scale" not in build_dit("DiT-2x32x2/4", 1, 8, 10).config()
    assert two_time_dit().config()["jump_scale"] == 1000.0
    assert "sigma_scale" not in two_time_dit().config() and two_time_dit(sigma_scale=4.0).config()["sigma_scale"] == 4.0


def test_resume_of_a_checkpoint_from_before_the_scale_keys(tmp_path):
    """Checkpoints written before the keys embedded both times at 1000: they resume under 1000
    and are refused, naming the keys to set, under another scale (a MeanFlow run under the new auto 1)."""
    model = build_dit("DiT-2x32x2/4", 1, 8, 10, time_inputs=2)
    old = {k: v for k, v in model.config().items() if k != "jump_scale"}
    (tmp_path / "meta.json").write_text(json.dumps({"model": old}))
    check_same_model(tmp_path, model.config(), "DiT-2x32x2/4")
    other = build_dit("DiT-2x32x2/4", 1, 8, 10, time_inputs=2, jump_scale=1.0).config()
    with pytest.raises(ConfigError, match="jump_scale 1000.0 \\(checkpoint\\) vs 1.0 \\(config\\)"):
        check_same_model(tmp_path, other, "DiT-2x32x2/4")
    slow_sigma = build_dit("DiT-2x32x2/4", 1, 8, 10, time_inputs=2, jump_scale=1.0, sigma_scale=1.0).config()
    (tmp_path / "meta.json").write_text(json.dumps({"model": other}))
    check_same_model(tmp_path, {**other, "sigma_scale": 1000.0}, "DiT-2x32x2/4")  # 1000 written or left out: same
    with pytest.raises(ConfigError, match="sigma_scale 1000.0 \\(checkpoint\\) vs 1.0 \\(config\\); "
                                          "resume with model.sigma_scale=1000"):
        check_same_model(tmp_path, slow_sigma, "DiT-2x32x2/4")


def test_model_init_at_another_scale_is_refused_naming_the_keys(tmp_path):
    """model.init keeps its file's embedders; a run asking for other scales (here meanflow_fd's
    auto 1 against a 1000 file) stops naming every key that differs instead of ignoring them."""
    path = export(two_time_dit(jump_scale=1000.0), tmp_path / "two.safetensors")
    base = [f"model.init={path}", "model.time_inputs=2", "objective.name=meanflow_fd", "model.kernels=torch"]
    with pytest.raises(ConfigError, match="set model.sigma_scale=1000 model.jump_scale=1000 to continue"):
        build_model(load_config(None, base), DATASET)
    with pytest.raises(ConfigError, match="jump_scale=1000, but the config asks for model.jump_scale=1 "):
        build_model(load_config(None, base + ["model.sigma_scale=1000"]), DATASET)
    kept = build_model(load_config(None, base + ["model.jump_scale=1000", "model.sigma_scale=1000"]), DATASET)
    assert kept.jump_scale == 1000.0 and kept.sigma_scale == 1000.0
    # a file at sigma_scale 4 under the default (1000 for scfm)
    path = export(two_time_dit(sigma_scale=4.0), tmp_path / "slow.safetensors")
    base = [f"model.init={path}", "model.time_inputs=2", "objective.name=scfm", "model.kernels=torch"]
    with pytest.raises(ConfigError, match="set model.sigma_scale=4 to continue"):
        build_model(load_config(None, base), DATASET)
    assert build_model(load_config(None, base + ["model.sigma_scale=4"]), DATASET).sigma_scale == 4.0
