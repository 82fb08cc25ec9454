"""Two-time conditioning, MeanFlow (JVP) and finite-difference MeanFlow against their formulas:
analytic networks with closed-form derivatives and average velocities, and a small DiT in float64."""
import dataclasses
import math
import pytest
import torch

from flowpre.config import ConfigError, ObjectiveConfig, load_config
from flowpre.models.dit import build_dit
from flowpre.objectives import FM, SC, Nets, Targets, build
from flowpre.sampling import SIGMA_MAX, euler_sample, time_grid
from flowpre.train.loop import with_time_inputs


def objective(name, **overrides):
    return build(dataclasses.replace(ObjectiveConfig(name=name), **overrides), time_inputs=2)


def small_dit(seed=0, dtype=torch.float64):
    """A 2-block two-time DiT whose zero-initialised layers (adaLN-Zero, output, jump embedder) are
    made random, so every path to the output, both time inputs included, is live."""
    torch.manual_seed(seed)
    model = build_dit("DiT-2x32x2/4", 1, 8, 10, kernels="torch", time_inputs=2).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn_like(p) * 0.2)
    return model


def batch(B=24, seed=0, dtype=torch.float64, size=8):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.rand(B, 1, size, size, generator=g, dtype=dtype) * 2 - 1,
            "cond": torch.randint(0, 10, (B,), generator=g)}


def col(t):
    return t.view(-1, 1, 1, 1)


# --- two-time conditioning in the DiT ------------------------------------------------------


def test_new_two_time_model_is_the_one_time_model():
    one = build_dit("DiT-2x64x4/4", 3, 12, 5)
    with torch.no_grad():  # random adaLN so the output is not trivially zero
        for p in one.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    two = build_dit("DiT-2x64x4/4", 3, 12, 5, time_inputs=2)
    missing, unexpected = two.load_state_dict(one.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("jump_embed.") for k in missing)
    x, sigma, cond = torch.randn(4, 3, 12, 12), torch.rand(4), torch.tensor([0, 1, 4, 5])
    ends = [sigma, sigma * torch.rand(4), torch.zeros(4)]
    for end in ends:  # the fresh jump embedder adds exactly zero, whatever the jump
        torch.testing.assert_close(two(x, sigma, cond, sigma_end=end), one(x, sigma, cond), atol=0, rtol=0)
    grown = with_time_inputs(one, 2, "test")  # model.init of a one-time file into a two-time run
    with pytest.raises(ConfigError, match="model.time_inputs=1"):  # a two-time file cannot shrink
        with_time_inputs(two, 1, "two.safetensors")
    torch.testing.assert_close(grown(x, sigma, cond, sigma_end=ends[1]), one(x, sigma, cond), atol=0, rtol=0)
    with torch.no_grad():  # once the embedder learns, the jump length changes the output
        two.jump_embed.mlp[2].weight.normal_()
    assert not torch.allclose(two(x, sigma, cond, sigma_end=ends[0]), two(x, sigma, cond, sigma_end=ends[2]))
    with pytest.raises(ValueError, match="sigma_end"):
        two(x, sigma, cond)
    with pytest.raises(ValueError, match="sigma_end"):
        one(x, sigma, cond, sigma_end=sigma)
    assert two.config()["time_inputs"] == 2 and one.config()["time_inputs"] == 1
    assert two.forward_flops() > one.forward_flops()


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_sampler_feeds_each_steps_end(cfg_scale):
    calls = []

    def net(x, sigma, cond, sigma_end):
        calls.append((sigma.clone(), sigma_end.clone(), cond.clone()))
        return torch.zeros_like(x)

    noise = torch.randn(3, 1, 4, 4)
    euler_sample(net, noise, torch.tensor([0, 1, 2]), 5, shift=2.0, cfg_scale=cfg_scale, null_cond=9, time_inputs=2)
    grid = time_grid(5, 2.0).clamp(max=SIGMA_MAX)
    assert len(calls) == 5
    for j, (sigma, end, cond) in enumerate(calls):
        n = 6 if cfg_scale != 1.0 else 3  # guided: conditional and null halves in one batch
        assert sigma.shape == end.shape == (n,) and cond.shape == (n,)
        torch.testing.assert_close(sigma, grid[j].expand(n))
        torch.testing.assert_close(end, grid[j + 1].expand(n))


def test_text_model_with_two_times_samples_with_cfg():
    """Caption conditioning and the jump input together: a guided two-time sample, text null condition."""
    torch.manual_seed(0)
    model = build_dit("DiT-2x32x2/4", 3, 8, 0, kernels="torch", text_dim=12, text_tokens=5, time_inputs=2)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    cond, null = torch.randn(2, 5, 12), torch.zeros(5, 12)
    noise = torch.randn(2, 3, 8, 8)
    one, two = (euler_sample(model, noise, cond, n, cfg_scale=2.0, null_cond=null, time_inputs=2) for n in (1, 2))
    assert torch.isfinite(one).all() and not torch.allclose(one, two)
    with pytest.raises(ValueError, match="sigma_end"):  # a sampler that forgets the end is refused
        euler_sample(model, noise, cond, 1, cfg_scale=2.0, null_cond=null)


# --- MeanFlow's target ------------------------------------------------------------------


class PolyNet:
    """u(z, r, t) = a z t^2 + b r t + c z r + bias[cond]: du/dt along (v, dt = 1, dr = 0) is
    v (a t^2 + c r) + 2 a z t + b r, known in closed form; `time_inputs` marks it two-time."""
    time_inputs = 2

    def __init__(self, a=0.7, b=-1.3, c=0.4):
        self.a, self.b, self.c = a, b, c
        self.bias = torch.linspace(-1, 1, 11, dtype=torch.float64)

    def __call__(self, z, t, cond, sigma_end):
        t, r = col(t).to(z.dtype), col(sigma_end).to(z.dtype)
        return self.a * z * t ** 2 + self.b * r * t + self.c * z * r + col(self.bias[cond]).to(z.dtype)

    def dudt(self, z, t, r, v):
        t, r = col(t), col(r)
        return v * (self.a * t ** 2 + self.c * r) + 2 * self.a * z * t + self.b * r


def recover(t: Targets, x_data):
    """(t, r, eps, v) from the targets: z_t = (1 - t) x + t eps."""
    tt, r = t.sigma.double(), t.sigma_next.double()
    eps = (t.x - (1 - col(tt)) * x_data) / col(tt)
    return tt, r, eps, eps - x_data


@pytest.mark.parametrize("name", ["meanflow", "meanflow_fd"])
def test_targets_against_a_closed_form_derivative(name):
    net = PolyNet()
    b = batch(B=400)
    t = objective(name, cond_drop_prob=0.1, fd_delta=1e-3)(b, Nets(student=net, ema_fast=net, null_cond=10),
                                                            torch.Generator().manual_seed(1))
    tt, r, eps, v = recover(t, b["x"])
    jump, fm = t.group == SC, t.group == FM
    assert int(fm.sum()) == 300 and int(jump.sum()) == 100  # fm_fraction 0.75, exact counts
    assert torch.equal(t.sigma_next[fm], t.sigma[fm]) and (t.sigma_next[jump] < t.sigma[jump]).all()
    torch.testing.assert_close(t.extra_inputs["sigma_end"], t.sigma_next)
    # logit-normal draws, eps standard normal: the interpolation is the one of METHOD.md section 1
    assert abs(eps.mean()) < 0.05 and abs(eps.std() - 1) < 0.05
    torch.testing.assert_close(t.target[fm], v[fm], atol=1e-6, rtol=1e-6)  # v recovered by dividing by t
    want = v[jump] - col(tt - r)[jump] * net.dudt(t.x[jump], tt[jump], r[jump], v[jump])
    tol = 1e-6 if name == "meanflow" else 1e-5  # central difference: O(delta^2) on a polynomial in t
    torch.testing.assert_close(t.target[jump], want, atol=tol, rtol=tol)
    assert t.adaptive == (1.0, 1e-3)  # MeanFlow trains with the adaptive weight by default


def gaussian_flow(s):
    """Data N(0, s^2) per element: sigma_t^2 = (1-t)^2 s^2 + t^2, the flow scales z with sigma_t, so
    the average velocity from t to r is u = z (1 - sigma_r / sigma_t) / (t - r) = z g(r, t) and the
    marginal velocity is z k(t), k = sigma_t' / sigma_t."""
    def std(t):
        return torch.sqrt((1 - t) ** 2 * s ** 2 + t ** 2)

    def k(t):
        return (t - (1 - t) * s ** 2) / std(t) ** 2

    def g(r, t):
        jump = t - r
        safe = torch.where(jump > 1e-9, jump, torch.ones_like(jump))
        return torch.where(jump > 1e-9, (1 - std(r) / std(t)) / safe, k(t))

    class Exact:
        time_inputs = 2

        def __call__(self, z, t, cond, sigma_end):
            return z * col(g(sigma_end.to(z.dtype), t.to(z.dtype)))
    return Exact(), g, k


def test_exact_average_velocity_is_the_fixed_point():
    """With the network equal to the true average velocity of Gaussian data, the target is that
    velocity plus the conditional-velocity noise (v_c - v_marginal)(1 - (t - r) g), which averages
    to zero given z_t: the MeanFlow identity, checked per sample in closed form."""
    s = 0.5
    net, g, k = gaussian_flow(s)
    B = 300
    gen = torch.Generator().manual_seed(3)
    b = {"x": torch.randn(B, 1, 4, 4, generator=gen, dtype=torch.float64) * s, "cond": torch.zeros(B, dtype=torch.long)}
    t = objective("meanflow", cond_drop_prob=0.0, fm_fraction=0.25)(b, Nets(student=net, null_cond=10),
                                                                    torch.Generator().manual_seed(4))
    tt, r, eps, v = recover(t, b["x"])
    z = t.x
    u = z * col(g(r, tt))
    want = u + (v - z * col(k(tt))) * (1 - col((tt - r) * g(r, tt)))
    torch.testing.assert_close(t.target, want, atol=1e-9, rtol=1e-9)
    # and a wrong field (instantaneous velocity, ignoring r) is not a fixed point
    wrong = objective("meanflow", cond_drop_prob=0.0, fm_fraction=0.25)(
        b, Nets(student=lambda z, t, c, sigma_end: z * col(k(t.double())), null_cond=10), torch.Generator().manual_seed(4))
    jump = t.group == SC
    assert (wrong.target[jump] - want[jump]).abs().mean() > 1e-2


def dit_targets(name, model, seed=0, **overrides):
    return objective(name, cond_drop_prob=0.0, **overrides)(batch(B=16, seed=seed), Nets(student=model, ema_fast=model,
                                                                                         null_cond=10),
                                                           torch.Generator().manual_seed(seed))


def test_jvp_target_matches_a_finite_difference_on_a_dit():
    """The JVP through a small float64 DiT (attention, adaLN, both time embedders) against an
    independent central difference of the same network along (v, dt = 1, dr = 0)."""
    model = small_dit()
    t = dit_targets("meanflow", model)
    b = batch(B=16)
    tt, r, eps, v = recover(t, b["x"])
    jump = (t.group == SC).nonzero().flatten()
    assert len(jump) == 4
    h = 1e-6
    z, c = t.x[jump], t.cond[jump]
    with torch.no_grad():
        up = model(z + h * v[jump], tt[jump] + h, c, sigma_end=r[jump])
        down = model(z - h * v[jump], tt[jump] - h, c, sigma_end=r[jump])
    want = v[jump] - col(tt - r)[jump] * (up - down) / (2 * h)
    torch.testing.assert_close(t.target[jump], want, atol=1e-6, rtol=1e-6)
    assert (t.target[jump] - v[jump]).abs().max() > 1e-2  # the derivative term is not negligible here


def test_finite_difference_converges_to_the_jvp():
    model = small_dit(seed=1)
    jvp = dit_targets("meanflow", model, seed=2)
    jump = jvp.group == SC
    errors = []
    # the sinusoidal time features reach 1000 rad per unit sigma: gaps below 1e-3 resolve them
    for delta in (1e-3, 1e-4, 1e-5, 1e-6):
        fd = dit_targets("meanflow_fd", model, seed=2, fd_delta=delta)
        assert torch.equal(fd.x, jvp.x) and torch.equal(fd.sigma_next, jvp.sigma_next)  # same draws
        errors.append(float((fd.target[jump] - jvp.target[jump]).abs().max()))
    assert errors[3] < 1e-4, errors
    for coarse, fine in zip(errors, errors[1:]):  # second order: 10x smaller gap, ~100x smaller error
        assert fine < coarse / 30, errors


def test_finite_difference_runs_in_fp32_under_bf16_autocast():
    model = small_dit(dtype=torch.float32)
    seen = []

    def recording(z, t, cond, sigma_end):
        seen.append((z.dtype, torch.is_autocast_enabled("cpu")))
        return model(z, t, cond, sigma_end=sigma_end)

    def targets(autocast, net=model):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return objective("meanflow_fd", cond_drop_prob=0.0, fd_network="ema_fast")(
                batch(B=16, dtype=torch.float32), Nets(student=None, ema_fast=net, null_cond=10),
                torch.Generator().manual_seed(0))
    plain = targets(False)
    guarded = targets(True, recording)
    assert seen and all(dtype == torch.float32 and not on for dtype, on in seen)
    jump = plain.group == SC
    err_guarded = float((guarded.target[jump] - plain.target[jump]).abs().max())
    assert err_guarded < 1e-5
    # what the guard prevents: the same stencil evaluated in bf16 is far off
    tt, r, eps, v = recover(plain, batch(B=16, dtype=torch.float32)["x"])
    z, tt, r, v, c = plain.x[jump], tt[jump].float(), r[jump].float(), v[jump].float(), plain.cond[jump]
    d_plus, d_minus = (1 - tt).clamp(max=5e-3), ((tt - r) / 2).clamp(max=5e-3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        up = model(z + col(d_plus) * v, tt + d_plus, c, sigma_end=r).float()
        down = model(z - col(d_minus) * v, tt - d_minus, c, sigma_end=r).float()
    in_bf16 = v - col(tt - r) * (up - down) / col(d_plus + d_minus)
    assert float((in_bf16 - plain.target[jump]).abs().max()) > 100 * max(err_guarded, 1e-7)


def test_fd_network_key_picks_the_fast_ema():
    student, ema = small_dit(seed=0), small_dit(seed=5)
    b = batch(B=16)
    by = {}
    for which in ("student", "ema_fast"):
        by[which] = objective("meanflow_fd", cond_drop_prob=0.0, fd_network=which)(
            b, Nets(student=student, ema_fast=ema, null_cond=10), torch.Generator().manual_seed(0)).target
    want = dit_targets("meanflow_fd", ema)  # the same draws, the EMA as the only network
    torch.testing.assert_close(by["ema_fast"], want.target)
    assert not torch.allclose(by["student"], by["ema_fast"])


# --- configuration and weighting -----------------------------------------------------------


def test_meanflow_needs_two_time_inputs():
    for name in ("meanflow", "meanflow_fd"):
        with pytest.raises(ConfigError, match="model.time_inputs"):
            load_config(None, [f"objective.name={name}"])
        with pytest.raises(ConfigError, match="model.time_inputs"):
            build(ObjectiveConfig(name=name), time_inputs=1)
        assert load_config(None, [f"objective.name={name}", "model.time_inputs=2"]).model.time_inputs == 2
    with pytest.raises(ConfigError, match="model.time_inputs"):
        load_config(None, ["objective.name=shortcut", "model.time_inputs=2"])
    # ZeRO-3 wraps parameters in autograd functions that have no JVP: refused before training
    with pytest.raises(ConfigError, match="deepspeed.zero_stage.*meanflow_fd"):
        load_config(None, ["objective.name=meanflow", "model.time_inputs=2", "deepspeed.zero_stage=3"])
    load_config(None, ["objective.name=meanflow_fd", "model.time_inputs=2", "deepspeed.zero_stage=3"])


def test_jvp_runs_on_a_model_built_with_the_triton_kernels(kernel_device):
    """model.kernels=triton: the JVP pass switches to the references; targets agree with a torch model's."""
    ref = small_dit(dtype=torch.float32).to(kernel_device)
    tri = build_dit("DiT-2x32x2/4", 1, 8, 10, kernels="triton", time_inputs=2).to(kernel_device)
    tri.load_state_dict(ref.state_dict())
    b = {k: v.to(kernel_device) for k, v in batch(B=8, dtype=torch.float32).items()}
    out = [objective("meanflow", cond_drop_prob=0.0)(b, Nets(student=m, null_cond=10),
                                                     torch.Generator(kernel_device).manual_seed(0)) for m in (ref, tri)]
    assert tri.kernels == "triton"  # restored after the JVP
    torch.testing.assert_close(out[1].target, out[0].target, atol=1e-4, rtol=1e-4)
    x = torch.randn(2, 1, 8, 8, device=kernel_device)
    s, e, c = torch.rand(2, device=kernel_device), torch.zeros(2, device=kernel_device), torch.tensor([1, 2])
    torch.testing.assert_close(tri(x, s, c.to(kernel_device), sigma_end=e), ref(x, s, c.to(kernel_device), sigma_end=e),
                               atol=1e-4, rtol=1e-4)


def test_eval_samples_a_two_time_model(tmp_path):
    """`flowpre eval` on an exported two-time model: the sampler feeds each step's end."""
    import argparse
    import json

    from safetensors.torch import save_file

    from flowpre.eval import evaluate

    model = build_dit("DiT-1x32x2/4", 1, 28, 10, kernels="torch", time_inputs=2)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    path = tmp_path / "two_time.safetensors"
    meta = {"flowpre.model": json.dumps(model.config()), "flowpre.step": "0", "flowpre.weights": "student",
            "flowpre.dataset": json.dumps({"name": "fashion-mnist", "channels": 1, "height": 28, "width": 28,
                                           "num_classes": 10}), "flowpre.objective": "meanflow"}
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)
    args = argparse.Namespace(weights=str(path), metric="fd", num_samples=32, steps="1,2", batch_size=32, seed=0,
                              device="cpu", out=str(tmp_path / "eval.json"))
    res = evaluate.run(args, log=lambda *a: None)["results"]
    assert all(math.isfinite(res[k]["fd"]) for k in ("1", "2")) and res["1"]["fd"] != res["2"]["fd"]


@pytest.mark.parametrize("name", ["fm", "scfm", "shortcut", "meanflow_fd"])
def test_adaptive_weighting_for_every_objective(name):
    time_inputs = 2 if name.startswith("meanflow") else 1
    cfg = dataclasses.replace(ObjectiveConfig(name=name), loss_weighting="adaptive", loss_weight_p=0.5,
                              loss_weight_c=0.01, shift_min=0.5, shift_max=2.0)
    net = PolyNet()

    def any_net(x, sigma, cond, **kw):
        return net(x, sigma, cond, kw.get("sigma_end", sigma))
    nets = Nets(student=any_net, ema_fast=any_net, ema_slow=any_net, null_cond=10)
    t = build(cfg, time_inputs)(batch(B=32), nets, torch.Generator().manual_seed(0))
    pred = t.target + torch.randn_like(t.target) * torch.linspace(0.1, 2, 32, dtype=t.target.dtype).view(-1, 1, 1, 1)
    mse = (pred - t.target).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(t.loss_weight(pred), (t.weight * (mse + 0.01) ** -0.5).float())
    assert float(t.info["loss_mse"]) == pytest.approx(float(mse.mean()))
    plain = build(dataclasses.replace(cfg, loss_weighting="none"), time_inputs)(batch(B=32), nets,
                                                                                 torch.Generator().manual_seed(0))
    assert torch.equal(plain.loss_weight(pred), plain.weight)
    auto = build(dataclasses.replace(cfg, loss_weighting="auto"), time_inputs)
    assert (auto.adaptive is not None) == name.startswith("meanflow")


# --- SCFM with two times --------------------------------------------------------------------


def two_time_affine(seed):
    """v(x, sigma -> end) = a x + b sigma + e (sigma - end) + bias[c], per channel."""
    g = torch.Generator().manual_seed(seed)
    a, b, e = (torch.randn(2, generator=g, dtype=torch.float64).view(1, -1, 1, 1) for _ in range(3))
    bias = torch.randn(11, 2, generator=g, dtype=torch.float64)

    def net(x, sigma, cond, sigma_end):
        s, d = col(sigma).to(x.dtype), col(sigma - sigma_end).to(x.dtype)
        return a * x + b * s + e * d + bias[cond].view(-1, 2, 1, 1)
    return net


def test_scfm_with_two_times_conditions_each_step_on_its_end():
    """Fine steps end where they end, except on the finest grid (N = n_max = 4 here), where they are
    instantaneous so the recursion of jumps bottoms out in flow matching."""
    cfg = ObjectiveConfig(name="scfm", shift_min=0.5, shift_max=2.0, cond_drop_prob=0.1, n_max=4)
    fast, slow = two_time_affine(1), two_time_affine(2)
    nets = Nets(student=None, ema_fast=fast, ema_slow=slow, null_cond=10)
    B = 400
    x_data = torch.rand(B, 2, 3, 3, dtype=torch.float64) * 2 - 1
    t = build(cfg, time_inputs=2)({"x": x_data, "cond": torch.randint(0, 10, (B,))}, nets,
                                  torch.Generator().manual_seed(0))
    sc, fm = t.group == SC, t.group == FM
    torch.testing.assert_close(t.extra_inputs["sigma_end"][fm], t.sigma[fm])  # flow matching: instantaneous
    torch.testing.assert_close(t.extra_inputs["sigma_end"][sc], t.sigma_next[sc])  # the student's jump a -> a+2
    x_a, sa, sm, sn, c = t.x[sc], t.sigma[sc], t.sigma_mid[sc], t.sigma_next[sc], t.cond[sc]
    d1, d2 = col(sa - sm).double(), col(sm - sn).double()
    coarse = (sa == 1) & (sn == 0)  # the grid of 2 steps is the only one spanning [1, 0] in one jump
    assert coarse.any() and (~coarse).any()
    end1, end2 = torch.where(coarse, sm, sa), torch.where(coarse, sn, sm)
    v1 = fast(x_a, sa, c, sigma_end=end1)
    v2 = slow(x_a - d1 * v1, sm, c, sigma_end=end2)
    torch.testing.assert_close(t.target[sc], (d1 * v1 + d2 * v2) / (d1 + d2), atol=1e-6, rtol=1e-6)
    # with every fine step instantaneous (the one-time rule) the coarse grid's target would differ
    v1_inst = fast(x_a, sa, c, sigma_end=sa)
    assert (v1_inst - v1)[coarse].abs().max() > 1e-3


def test_objective_cost_benchmark_times_every_objective(tmp_path):
    """The cost benchmark's quick path: every objective steps, the JSON holds time and counted FLOPs."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import objective_cost

    out = tmp_path / "cost.json"
    objective_cost.main(["--model", "DiT-1x32x2/4", "--batch", "8", "--rounds", "1", "--out", str(out)])
    rows = {r["objective"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"fm", "scfm", "shortcut", "scfm2", "meanflow", "meanflow_fd"}
    assert rows["fm"]["ratio_to_fm"] == 1 and rows["fm"]["counted_flops_ratio"] == 1
    # two no-grad forwards (or one JVP, counted as two) on the quarter of jumps: +1/6
    for name in ("scfm", "scfm2", "meanflow", "meanflow_fd"):
        assert rows[name]["counted_flops_ratio"] == pytest.approx(1 + 2 * 2 / (3 * 8)), name
    assert all(r["median_step_s"] > 0 for r in rows.values())
