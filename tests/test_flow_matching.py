
import pytest
import torch

from flowpre.config import ObjectiveConfig
from flowpre.objectives import FM, Nets, build
from flowpre.objectives.flow_matching import sample_sigma
from flowpre.sampling import SIGMA_MAX, euler_sample, time_grid


def test_fm_targets_equal_hand_computed():
    cfg = ObjectiveConfig(name="fm", cond_drop_prob=0.0, sigma_sampler="uniform")
    objective = build(cfg)
    x = torch.rand(7, 3, 5, 5) * 2 - 1
    cond = torch.randint(0, 4, (7,))
    g = torch.Generator().manual_seed(3)
    t = objective({"x": x, "cond": cond}, Nets(student=None, null_cond=4), g)
    # replay the generator by hand: sigma first, then eps
    g.manual_seed(3)
    sigma = torch.rand(7, generator=g)
    eps = torch.randn(x.shape, generator=g)
    s = sigma.view(7, 1, 1, 1)
    torch.testing.assert_close(t.sigma, sigma, rtol=0, atol=0)
    torch.testing.assert_close(t.x, (1 - s) * x + s * eps, rtol=0, atol=0)
    torch.testing.assert_close(t.target, eps - x, rtol=0, atol=0)
    assert torch.equal(t.cond, cond) and torch.all(t.group == FM) and torch.all(t.weight == 1)


def test_label_dropout_rate_and_null_class():
    cfg = ObjectiveConfig(cond_drop_prob=0.1)
    objective = build(cfg)
    n = 20000
    x, cond = torch.randn(n, 1, 2, 2), torch.randint(0, 10, (n,))
    t = objective({"x": x, "cond": cond}, Nets(student=None, null_cond=10), torch.Generator().manual_seed(0))
    dropped = t.cond == 10
    assert abs(dropped.float().mean().item() - 0.1) < 0.01
    assert torch.equal(t.cond[~dropped], cond[~dropped])


@pytest.mark.parametrize("sampler,shift", [("uniform", 1.0), ("uniform", 3.0), ("logit_normal", 1.0), ("logit_normal", 3.0)])
def test_sigma_samplers_follow_their_distribution(sampler, shift):
    cfg = ObjectiveConfig(sigma_sampler=sampler, logit_mean=0.3, logit_std=0.8, sigma_shift=shift)
    s = sample_sigma(50000, cfg, "cpu", torch.Generator().manual_seed(0))
    assert s.min() > 0 and s.max() < 1
    # invert the shift, then the base distribution; compare a few quantiles
    u = s / (shift - (shift - 1) * s)
    if sampler == "uniform":
        base, expected = u, torch.tensor([0.1, 0.5, 0.9])
    else:
        base = torch.logit(u)
        expected = 0.3 + 0.8 * torch.tensor([-1.2815516, 0.0, 1.2815516])
    q = torch.quantile(base, torch.tensor([0.1, 0.5, 0.9]))
    torch.testing.assert_close(q, expected, atol=0.03, rtol=0)


def test_time_grid_shift_and_ends():
    g = time_grid(4, shift=3.0, dtype=torch.float64)
    u = torch.tensor([1, 0.75, 0.5, 0.25, 0], dtype=torch.float64)
    torch.testing.assert_close(g, 3 * u / (1 + 2 * u))
    torch.testing.assert_close(time_grid(5), torch.linspace(1, 0, 6))
    with pytest.raises(ValueError):
        time_grid(0)


def point_mass_field(mu_of_class):
    """Exact velocity of flow matching onto a point mass mu: v(x, sigma) = (x - mu) / sigma.

    Euler is exact on it: x_b - mu = (x_a - mu) * sigma_b / sigma_a, so any grid lands
    on mu, and every intermediate point is known in closed form."""
    def field(x, sigma, cond):
        mu = mu_of_class[cond]
        return (x - mu) / sigma.view(-1, 1, 1, 1)
    return field


@pytest.mark.parametrize("steps,shift", [(1, 1.0), (2, 3.0), (7, 1.0), (32, 2.5)])
def test_euler_exact_on_analytic_field(steps, shift):
    mus = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    cond = torch.tensor([0, 2, 1, 2])
    noise = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    out = euler_sample(point_mass_field(mus), noise, cond, steps, shift)
    torch.testing.assert_close(out, mus[cond], atol=1e-9, rtol=0)
    # stop one step early: closed form (noise - mu) * sigma_{N-1} / sigma_0 + mu
    if steps > 1:
        sig = time_grid(steps, shift, dtype=torch.float64).clamp(max=SIGMA_MAX)
        calls = []
        def recording(x, sigma, c):
            calls.append(x.clone())
            return point_mass_field(mus)(x, sigma, c)
        euler_sample(recording, noise, cond, steps, shift)
        expected = mus[cond] + (noise - mus[cond]) * sig[-2] / sig[0]
        torch.testing.assert_close(calls[-1], expected, atol=1e-9, rtol=0)


def test_cfg_is_applied_to_every_channel():
    mus = torch.randn(4, 3, 2, 2, dtype=torch.float64)  # class 3 is the null class
    cond = torch.tensor([0, 1, 2])
    noise = torch.randn(3, 3, 2, 2, dtype=torch.float64)
    w = 2.5
    out = euler_sample(point_mass_field(mus), noise, cond, 5, cfg_scale=w, null_cond=3)
    # guided field is the point-mass field of mu_u + w (mu_c - mu_u): exact on every channel
    torch.testing.assert_close(out, mus[3] + w * (mus[cond] - mus[3]), atol=1e-9, rtol=0)


def test_sampler_is_seeded():
    from flowpre.sampling import seeded_noise
    a, b, c = seeded_noise((2, 1, 3, 3), 5, "cpu"), seeded_noise((2, 1, 3, 3), 5, "cpu"), seeded_noise((2, 1, 3, 3), 6, "cpu")
    assert torch.equal(a, b) and not torch.equal(a, c)
