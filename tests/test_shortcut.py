"""The Shortcut Models baseline against its formula, with an analytic level-aware network."""
import dataclasses

import torch

from flowpre.config import ObjectiveConfig
from flowpre.models.dit import build_dit
from flowpre.objectives import Nets, build


def level_net(seed):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(2, generator=g).view(1, 2, 1, 1), torch.randn(2, generator=g).view(1, 2, 1, 1)
    per_level = torch.randn(8, 2, generator=g) * 3  # large enough that the [-4, 4] clip bites
    calls = []

    def net(x, sigma, cond, step_level):
        calls.append(step_level.clone())
        return a * x + b * sigma.view(-1, 1, 1, 1).to(x.dtype) + per_level[step_level].view(-1, 2, 1, 1).to(x.dtype) \
            + 0.1 * cond.view(-1, 1, 1, 1).to(x.dtype)
    net.calls = calls
    return net


def test_shortcut_targets_levels_and_times():
    cfg = dataclasses.replace(ObjectiveConfig(name="shortcut"), cond_drop_prob=0.0)
    objective = build(cfg)
    ema = level_net(0)
    B = 8 * 300
    x_data = torch.rand(B, 2, 3, 3, dtype=torch.float64) * 2 - 1
    cond = torch.randint(0, 10, (B,))
    t = objective({"x": x_data, "cond": cond}, Nets(student=None, ema_slow=ema, null_cond=10),
                  torch.Generator().manual_seed(0))
    level = t.extra_inputs["step_level"]
    fm, bs = t.group == 0, t.group > 0
    assert bs.sum() == B // 8 and torch.all(level[fm] == 7)
    assert torch.equal(t.group[bs] - 1, level[bs]) and set(level[bs].tolist()) == set(range(7))
    # flow matching at the finest level
    torch.testing.assert_close(t.x[fm], x_data[fm] + t.sigma[fm].view(-1, 1, 1, 1).double() * t.target[fm])
    # bootstrap: sigma on the grid of its level, two half steps at level + 1, averaged and clipped
    lv, sig = level[bs], t.sigma[bs].double()
    d = torch.pow(2.0, -lv.double())
    k = (1 - sig) / d
    assert torch.allclose(k, k.round(), atol=1e-5) and (k.round() >= 0).all() and (k.round() < 2 ** lv).all()
    torch.testing.assert_close(t.sigma_next[bs].double(), sig - d, atol=1e-6, rtol=0)
    x, c = t.x[bs], t.cond[bs]
    v_a = ema(x, sig, c, step_level=lv + 1)
    v_b = ema(x - (d / 2).view(-1, 1, 1, 1) * v_a, sig - d / 2, c, step_level=lv + 1)
    expected = ((v_a + v_b) / 2).clamp(-4, 4)
    torch.testing.assert_close(t.target[bs], expected, atol=1e-5, rtol=1e-5)
    assert (expected.abs() == 4).any()  # the clip was exercised


def test_dit_step_level_input_and_sampling_levels():
    model = build_dit("DiT-1x32x2/4", 1, 8, 10, step_levels=8)
    torch.nn.init.normal_(model.final.linear.weight)
    torch.nn.init.normal_(model.blocks[0].ada[-1].weight)
    torch.nn.init.normal_(model.final.ada[-1].weight)
    x, s, c = torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([1, 2])
    out0 = model(x, s, c, step_level=torch.tensor([0, 0]))
    out7 = model(x, s, c, step_level=torch.tensor([7, 7]))
    assert not torch.allclose(out0, out7)
    for steps, level in ((1, 0), (4, 2), (128, 7), (1000, 7)):
        assert model.sampling_inputs(steps, 3)["step_level"].tolist() == [level] * 3
    assert build_dit("DiT-1x32x2/4", 1, 8, 10).sampling_inputs(4, 3) == {}
