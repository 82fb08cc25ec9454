"""The SCFM objective against its formula, with analytic affine networks."""
import dataclasses

import pytest
import torch

from flowpre.config import ObjectiveConfig
from flowpre.objectives import FM, SC, Nets, build
from flowpre.sampling import shift_sigma


def affine_net(seed, channels=2):
    """v(x, sigma, c) = a * x + b * sigma + bias[c], per channel: cheap and nonlinear in nothing."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(channels, generator=g).view(1, -1, 1, 1)
    b = torch.randn(channels, generator=g).view(1, -1, 1, 1)
    bias = torch.randn(11, channels, generator=g)  # 10 classes + null
    calls = []

    def net(x, sigma, cond):
        calls.append(x.shape[0])
        return a.to(x.dtype) * x + b.to(x.dtype) * sigma.view(-1, 1, 1, 1).to(x.dtype) + bias[cond].view(-1, channels, 1, 1).to(x.dtype)
    net.calls = calls
    return net


def guided(net, x, sigma, cond, w):
    if w == 1.0:
        return net(x, sigma, cond)
    return net(x, sigma, torch.full_like(cond, 10)) * (1 - w) + w * net(x, sigma, cond)


def run(B=400, seed=0, with_teacher=False, **overrides):
    cfg = dataclasses.replace(ObjectiveConfig(name="scfm"), **overrides)
    fast, slow, teach = affine_net(1), affine_net(2), affine_net(3)
    nets = Nets(student=None, ema_fast=fast, ema_slow=slow, teacher=teach if with_teacher else None, null_cond=10)
    x_data = torch.rand(B, 2, 3, 3, dtype=torch.float64) * 2 - 1
    cond = torch.randint(0, 10, (B,))
    t = build(cfg)({"x": x_data, "cond": cond}, nets, torch.Generator().manual_seed(seed))
    return cfg, nets, x_data, cond, t


def grid_match(sa, sm, sn, cfg, grids):
    """True when (sa, sm, sn) are consecutive points a, a+1, a+2 (a even) of a shifted grid."""
    for N in grids:
        for a in range(0, N - 1, 2):
            u = torch.tensor([1 - a / N, 1 - (a + 1) / N, 1 - (a + 2) / N], dtype=torch.float64)
            s = sm * (1 - u[1]) / (u[1] * (1 - sm))  # solve the shift from the midpoint, inside (0, 1)
            if not (cfg.shift_min - 1e-6 <= s <= cfg.shift_max + 1e-6):
                continue
            pts = shift_sigma(u, s)
            if torch.allclose(pts, torch.tensor([sa, sm, sn], dtype=torch.float64), atol=1e-5, rtol=0):
                return True
    return False


@pytest.mark.parametrize("w", [1.0, 2.5])
def test_targets_follow_the_formula(w):
    cfg, nets, x_data, cond, t = run(guidance_scale=w, cond_drop_prob=0.1)
    sc, fm = t.group == SC, t.group == FM
    # flow-matching samples: x = x_data + sigma (eps - x_data), target = eps - x_data
    s = t.sigma[fm].view(-1, 1, 1, 1).double()
    torch.testing.assert_close(t.x[fm], x_data[fm] + s * t.target[fm], atol=1e-6, rtol=0)
    assert torch.allclose(t.sigma_mid[fm], t.sigma[fm]) and torch.allclose(t.sigma_next[fm], t.sigma[fm])
    # self-distillation samples: the chord of two fine Euler steps through the EMAs
    x_a, sa, sm, sn, c = t.x[sc], t.sigma[sc], t.sigma_mid[sc], t.sigma_next[sc], t.cond[sc]
    d1, d2 = (sa - sm).view(-1, 1, 1, 1).double(), (sm - sn).view(-1, 1, 1, 1).double()
    v1 = guided(nets.ema_fast, x_a, sa, c, w)
    v2 = guided(nets.ema_slow, x_a - d1 * v1, sm, c, w)
    torch.testing.assert_close(t.target[sc], (d1 * v1 + d2 * v2) / (d1 + d2), atol=1e-5, rtol=1e-5)
    # x_a = (1 - sigma_a) x_data + sigma_a eps with standard-normal eps (sigma_a > 0 on every grid point used)
    eps = (x_a - (1 - sa.view(-1, 1, 1, 1)) * x_data[sc]) / sa.view(-1, 1, 1, 1)
    assert abs(eps.mean()) < 0.1 and abs(eps.std() - 1) < 0.1
    # the sigmas are consecutive points of a shifted grid of an allowed size
    assert all(grid_match(float(a), float(m), float(n), cfg, (2, 4, 8, 16)) for a, m, n in zip(sa, sm, sn))
    # guidance distillation keeps the true class on SC samples; without it dropout applies to all
    if w != 1.0:
        assert torch.equal(c, cond[sc])
    else:
        assert (c == 10).any() or sc.sum() < 30


def test_group_fractions_grid_sizes_and_cost():
    cfg, nets, *_ , t = run(B=64 * 20, fm_fraction=0.75)
    assert (t.group == FM).sum() == round(64 * 20 * 0.75)
    # one batched forward per EMA, on the SC share only
    assert nets.ema_fast.calls == [64 * 20 - 960] and nets.ema_slow.calls == [64 * 20 - 960]
    jumps = t.sigma - t.sigma_next
    assert (jumps[t.group == SC] > 0).all()
    cfg2, *_, t2 = run(B=3, fm_fraction=1.0)
    assert (t2.group == FM).all()
    cfg3, *_, t3 = run(B=5, fm_fraction=0.0)
    assert (t3.group == SC).all()


def test_grid_size_distribution():
    obj = build(ObjectiveConfig(name="scfm", n_max=16))
    _, _, _, N = obj.grid_points(40000, "cpu", torch.Generator().manual_seed(0))
    freq = torch.stack([(N == n).float().mean() for n in (2, 4, 8, 16)])
    assert torch.allclose(freq, torch.full((4,), 0.25), atol=0.015)
    small = build(ObjectiveConfig(name="scfm", n_max=16, n_weighting="small"))
    _, _, _, N = small.grid_points(40000, "cpu", torch.Generator().manual_seed(0))
    p = torch.tensor([1, 1 / 2, 1 / 3, 1 / 4]); p /= p.sum()
    assert torch.allclose(torch.stack([(N == n).float().mean() for n in (2, 4, 8, 16)]), p, atol=0.015)


def test_teacher_share_uses_teacher_on_fine_grid():
    cfg, nets, x_data, cond, t = run(B=200, with_teacher=True, teacher="t.safetensors", teacher_fraction=0.4,
                                      fm_fraction=0.5, cond_drop_prob=0.0)
    sc = (t.group == SC).nonzero().squeeze(1)
    assert nets.teacher.calls == [40] and nets.ema_fast.calls == [60] and nets.ema_slow.calls == [100]
    x_a, sa, sm, sn, c = t.x[sc], t.sigma[sc], t.sigma_mid[sc], t.sigma_next[sc], t.cond[sc]
    d1, d2 = (sa - sm).view(-1, 1, 1, 1).double(), (sm - sn).view(-1, 1, 1, 1).double()
    on_fine = torch.tensor([grid_match(float(a), float(m), float(n), cfg, (32,)) for a, m, n in zip(sa, sm, sn)])
    v1 = torch.where(on_fine.view(-1, 1, 1, 1), nets.teacher(x_a, sa, c), nets.ema_fast(x_a, sa, c))
    v2 = nets.ema_slow(x_a - d1 * v1, sm, c)
    torch.testing.assert_close(t.target[sc], (d1 * v1 + d2 * v2) / (d1 + d2), atol=1e-5, rtol=1e-5)
    assert on_fine.sum() >= 40  # every teacher sample is on the N=32 grid (coarse ones can be too)


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="n_max"):
        build(ObjectiveConfig(name="scfm", n_max=12))
    with pytest.raises(ValueError, match="shift_min"):
        build(ObjectiveConfig(name="scfm", shift_min=5.0, shift_max=2.0))
    with pytest.raises(ValueError, match="teacher"):
        run(B=10, with_teacher=False, teacher="t.safetensors")


def test_step_conditioned_variant_levels_and_targets():
    """objective.step_conditioning: student level log2(N) - 1 for SC, the top level for FM;
    the EMAs see the fine steps at min(log2 N, top); the chord formula is unchanged."""
    seen = {}

    def leveled(seed, name):
        base = affine_net(seed)
        g = torch.Generator().manual_seed(seed + 100)
        per_level = torch.randn(5, 2, generator=g)

        def net(x, sigma, cond, step_level):
            seen[name] = (sigma, step_level)
            return base(x, sigma, cond) + per_level[step_level].view(-1, 2, 1, 1).to(x.dtype)
        return net

    cfg = dataclasses.replace(ObjectiveConfig(name="scfm"), step_conditioning=True, n_max=16, cond_drop_prob=0.0)
    obj = build(cfg)
    assert obj.step_levels == 5
    fast, slow = leveled(1, "fast"), leveled(2, "slow")
    nets = Nets(student=None, ema_fast=fast, ema_slow=slow, null_cond=10)
    B = 300
    x_data = torch.rand(B, 2, 3, 3, dtype=torch.float64) * 2 - 1
    cond = torch.randint(0, 10, (B,))
    t = obj({"x": x_data, "cond": cond}, nets, torch.Generator().manual_seed(0))
    level, sc = t.extra_inputs["step_level"], t.group == SC
    assert (level[~sc] == 4).all()
    # the SC grid size is recoverable from the jump: N = 2 / (u_a - u_{a+2}) on the uniform-in-u grid;
    # check instead that the student level + 1 is the EMAs' fine level (capped at the top level)
    assert set(level[sc].tolist()) == {0, 1, 2, 3}
    # the EMA calls are in the SC sub-batch's own order: match samples by their midpoint sigma
    sigma_seen, fine_seen = seen["slow"]
    order_seen, order_t = sigma_seen.argsort(), t.sigma_mid[sc].argsort()
    torch.testing.assert_close(sigma_seen[order_seen], t.sigma_mid[sc][order_t], rtol=0, atol=0)
    fine = torch.empty_like(fine_seen)
    fine[order_t] = fine_seen[order_seen]  # in batch order
    torch.testing.assert_close(fine, (level[sc] + 1).clamp(max=4), rtol=0, atol=0)
    # the chord target with those levels
    sa, sm, sn = t.sigma[sc], t.sigma_mid[sc], t.sigma_next[sc]
    x_a, c = t.x[sc], t.cond[sc]
    v1 = fast(x_a, sa, c, fine)
    x_mid = x_a - (sa - sm).view(-1, 1, 1, 1) * v1
    v2 = slow(x_mid, sm, c, fine)
    d1, d2 = (sa - sm).view(-1, 1, 1, 1), (sm - sn).view(-1, 1, 1, 1)
    torch.testing.assert_close(t.target[sc], (d1 * v1 + d2 * v2) / (d1 + d2), rtol=1e-5, atol=1e-6)  # fp32 EMA outputs
    with pytest.raises(ValueError, match="step_conditioning cannot be combined"):
        build(dataclasses.replace(cfg, teacher="t.safetensors"))
