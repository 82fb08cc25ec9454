"""Round-2 flow-map options against their formulas (analytic networks, as in test_meanflow.py):
guidance in the target, the curriculum, the predicted-velocity direction, the r sampler and the
adaptive weight's power."""
import dataclasses

import pytest
import torch

from flowpre.config import ConfigError, ObjectiveConfig, load_config
from flowpre.objectives import FM, SC, Nets, build
from flowpre.objectives.curriculum import Curriculum

from test_meanflow import PolyNet, batch, col, dit_targets, objective, recover, small_dit, two_time_affine

NULL = 10


def guided_targets(name, w, k, B=400, seed=0, **overrides):
    net = PolyNet()
    b = batch(B=B, seed=seed)
    t = objective(name, cond_drop_prob=0.2, guidance_scale=w, guidance_mix=k, fd_delta=1e-3, **overrides)(
        b, Nets(student=net, ema_fast=net, null_cond=NULL), torch.Generator().manual_seed(seed))
    return net, b, t


@pytest.mark.parametrize("name", ["meanflow", "meanflow_fd"])
@pytest.mark.parametrize("w,k", [(2.0, 0.0), (3.0, 0.5), (1.0, 0.0)])
def test_guided_target_in_closed_form(name, w, k):
    """Kept labels: v~ = omega v + kappa u_c + (1 - omega - kappa) u_u with omega = w (1 - kappa),
    and on jumps v~ - (t - r) du/dt with du/dt along v~ (closed form for PolyNet); dropped labels
    learn the plain velocity. w = 1 is no guidance at all (no extra forwards)."""
    net, b, t = guided_targets(name, w, k)
    tt, r, eps, v = recover(t, b["x"])
    z, fm, jump = t.x, t.group == FM, t.group == SC
    kept, dropped = t.cond != NULL, t.cond == NULL
    assert (kept & fm).any() and (dropped & fm).any() and (kept & jump).any() and (dropped & jump).any()
    omega = w * (1 - k)
    u_c = net(z, tt, b["cond"], sigma_end=tt)
    u_u = net(z, tt, torch.full_like(b["cond"], NULL), sigma_end=tt)
    v_tilde = torch.where(col(kept), omega * v + k * u_c + (1 - omega - k) * u_u, v)
    torch.testing.assert_close(t.target[fm], v_tilde[fm], atol=1e-9, rtol=1e-9)
    want = v_tilde - col(tt - r) * net.dudt(z, tt, r, v_tilde)
    tol = 1e-6 if name == "meanflow" else 1e-5
    torch.testing.assert_close(t.target[jump], want[jump], atol=tol, rtol=tol)
    n_jump, n_kept = int(jump.sum()), int(kept.sum())
    extra = (n_kept * (1 + (k > 0)) if w != 1 else 0) + 2 * n_jump  # no guided forward for a dropped label
    assert float(t.info["extra_forward_images"]) == extra


def test_guided_fixed_point_is_the_effective_scale():
    """With u_c equal to v itself (a network that knows every sample's velocity), the kept FM target
    solves to u_u + w (v - u_u): the model samples at effective scale w at sampler cfg 1."""
    w, k = 2.5, 0.6
    b = batch(B=64)
    g = torch.Generator().manual_seed(0)
    probe = objective("meanflow_fd", cond_drop_prob=0.0, fm_fraction=1.0)(b, Nets(student=PolyNet(), null_cond=NULL), g)
    _, _, eps, v = recover(probe, b["x"])
    u_null = torch.randn_like(v)

    def knows_v(z, t, cond, sigma_end):  # conditional: the sample's true velocity; null: an arbitrary field
        return torch.where(col(cond == NULL), u_null, v)
    t = objective("meanflow_fd", cond_drop_prob=0.0, fm_fraction=1.0, guidance_scale=w, guidance_mix=k)(
        b, Nets(student=knows_v, null_cond=NULL), torch.Generator().manual_seed(0))
    # target = omega v + kappa v + (1 - omega - kappa) u_null; the field whose own CFG target equals
    # itself is u* with (1 - kappa) u* = omega v + (1 - omega - kappa) u_null
    omega = w * (1 - k)
    fixed = (omega * v + (1 - omega - k) * u_null) / (1 - k)
    torch.testing.assert_close(fixed, u_null + w * (v - u_null))
    torch.testing.assert_close(t.target, omega * v + k * v + (1 - omega - k) * u_null)


def test_two_time_scfm_regresses_the_guided_chord():
    """Two-time SCFM with guidance: both fine steps are guided velocities u_u + w (u_c - u_u), each
    conditioned on its own end, and the jump samples keep their true class."""
    w = 2.0
    cfg = ObjectiveConfig(name="scfm", shift_min=0.5, shift_max=2.0, cond_drop_prob=0.2, n_max=4, guidance_scale=w)
    fast, slow = two_time_affine(1), two_time_affine(2)
    B = 300
    x_data = torch.rand(B, 2, 3, 3, dtype=torch.float64) * 2 - 1
    cond = torch.randint(0, 10, (B,))
    t = build(cfg, time_inputs=2)({"x": x_data, "cond": cond}, Nets(student=None, ema_fast=fast, ema_slow=slow,
                                                                    null_cond=NULL), torch.Generator().manual_seed(0))
    sc = t.group == SC
    assert torch.equal(t.cond[sc], cond[sc]) and (t.cond[t.group == FM] == NULL).any()
    x_a, sa, sm, sn, c = t.x[sc], t.sigma[sc], t.sigma_mid[sc], t.sigma_next[sc], t.cond[sc]
    coarse = (sa == 1) & (sn == 0)  # grid 2 < n_max: fine steps end where they end; grid 4: instantaneous
    end1, end2 = torch.where(coarse, sm, sa), torch.where(coarse, sn, sm)

    def guided(net, x, s, end):
        u_c, u_u = net(x, s, c, sigma_end=end), net(x, s, torch.full_like(c, NULL), sigma_end=end)
        return u_u + w * (u_c - u_u)
    d1, d2 = col(sa - sm).double(), col(sm - sn).double()
    v1 = guided(fast, x_a, sa, end1)
    v2 = guided(slow, x_a - d1 * v1, sm, end2)
    torch.testing.assert_close(t.target[sc], (d1 * v1 + d2 * v2) / (d1 + d2), atol=1e-6, rtol=1e-6)


# --- the curriculum -------------------------------------------------------------------------


def test_curriculum_shares_at_given_steps():
    cfg = ObjectiveConfig(name="meanflow_fd", curriculum=True, curriculum_warmup=0.1, curriculum_ramp=0.4,
                          fm_fraction=0.75)
    c = Curriculum(cfg, max_steps=1000)
    want = {1: (0, 0), 100: (0, 0), 150: (0.03125, 0.125), 300: (0.125, 0.5), 499: (0.249375, 0.9975),
            500: (0.25, 1), 501: (0.25, 1), 1000: (0.25, 1), None: (0.25, 1)}
    for step, (share, jump) in want.items():
        assert c.at(step) == pytest.approx((share, jump), abs=1e-12), step
    assert Curriculum(dataclasses.replace(cfg, curriculum_ramp=0.0), 1000).at(101) == (0.25, 1.0)  # a switch


def test_curriculum_drives_the_objective_as_a_pure_function_of_the_step():
    net = PolyNet()
    b, B = batch(B=400), 400
    obj = build(ObjectiveConfig(name="meanflow_fd", curriculum=True, curriculum_warmup=0.1, curriculum_ramp=0.4),
                time_inputs=2, max_steps=1000)

    def at(step, seed=0):
        return obj(b, Nets(student=net, null_cond=NULL), torch.Generator().manual_seed(seed), step=step)
    warm = at(50)
    assert (warm.group == FM).all() and torch.equal(warm.sigma_next, warm.sigma) and float(warm.info["jump_share"]) == 0
    mid = at(300)  # share 0.125 of 400 = 50 jumps, every jump at most half the range
    jump = mid.group == SC
    assert int(jump.sum()) == 50 and float(mid.info["max_jump"]) == pytest.approx(0.5)
    assert (mid.sigma - mid.sigma_next)[jump].max() <= 0.5 and (mid.sigma_next[jump] < mid.sigma[jump]).all()
    # the jumps are the plain objective's jumps scaled by max_jump (same draws, same seed)
    plain = build(ObjectiveConfig(name="meanflow_fd", fm_fraction=1 - 0.125), time_inputs=2)(
        b, Nets(student=net, null_cond=NULL), torch.Generator().manual_seed(0))
    torch.testing.assert_close((mid.sigma - mid.sigma_next), 0.5 * (plain.sigma - plain.sigma_next))
    # no hidden state: what happened at other steps does not change step 300
    at(900), at(10)
    again = at(300)
    assert torch.equal(again.target, mid.target) and torch.equal(again.sigma_next, mid.sigma_next)
    end = at(None)
    assert int((end.group == SC).sum()) == 100 and float(end.info["max_jump"]) == 1


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from flowpre.data.shards import write_shards

    out = tmp_path_factory.mktemp("digits")
    write_shards("digits", out, shard_size=200, split="train", limit=400)
    return str(out / "train-*.tar")


def test_curriculum_is_logged_and_resumes_exactly(tmp_path, digits):
    """A 6-step run logs the schedule; a second run resumed from its step-3 checkpoint (same
    train.max_steps, so the same schedule) repeats steps 4-6 exactly: schedule and losses."""
    from helpers import metrics, train

    common = ["objective.name=meanflow_fd", "model.time_inputs=2", "objective.curriculum=true",
              "objective.curriculum_warmup=0.2", "objective.curriculum_ramp=0.5", "train.checkpoint_every=3",
              "objective.fm_fraction=0.5", "train.max_steps=6"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(straight, digits, *common)
    ckpt = straight / "checkpoints" / "step000000003"
    assert ckpt.is_dir()
    assert "resumed from" in train(resumed, digits, f"train.resume={ckpt}", *common).stdout
    ma, mb = metrics(straight), metrics(resumed)
    want = [Curriculum(ObjectiveConfig(name="meanflow_fd", curriculum=True, curriculum_warmup=0.2,
                                       curriculum_ramp=0.5, fm_fraction=0.5), 6).at(s) for s in range(1, 7)]
    logged = [(m["jump_share"], m["max_jump"]) for m in ma]
    assert [v for pair in logged for v in pair] == pytest.approx([v for pair in want for v in pair])
    assert want[0] == (0, 0) and want[-1] == (0.5, 1) and 0 < want[2][0] < 0.5  # warm-up, ramp, end
    assert [m["step"] for m in mb] == [4, 5, 6]
    assert [(m["loss"], m["jump_share"], m["max_jump"]) for m in mb] == \
        [(m["loss"], m["jump_share"], m["max_jump"]) for m in ma[3:]]


def test_curriculum_config_is_checked():
    base = ["objective.name=meanflow_fd", "model.time_inputs=2", "objective.curriculum=true"]
    assert load_config(None, base).objective.curriculum
    with pytest.raises(ConfigError, match="curriculum_ramp"):
        load_config(None, base + ["objective.curriculum_warmup=0.7", "objective.curriculum_ramp=0.5"])
    for key in ("objective.curriculum=true", "objective.fd_direction=predicted", "objective.r_sampler=logit_normal"):
        with pytest.raises(ConfigError, match=key.split("=")[0]):
            load_config(None, ["objective.name=scfm", key])
    with pytest.raises(ConfigError, match="max_steps"):
        build(ObjectiveConfig(name="meanflow_fd", curriculum=True), time_inputs=2)


# --- the direction of the derivative ---------------------------------------------------------


@pytest.mark.parametrize("name", ["meanflow", "meanflow_fd"])
@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_predicted_direction_in_closed_form(name, guidance):
    """fd_direction=predicted: du/dt along the student's own no-grad u(z, t, t | c) (guided like the
    target when guided), not along eps - x; its extra forward on the jump share is counted."""
    net = PolyNet()
    b = batch(B=400)
    t = objective(name, cond_drop_prob=0.2, fd_delta=1e-3, fd_direction="predicted", guidance_scale=guidance)(
        b, Nets(student=net, ema_fast=net, null_cond=NULL), torch.Generator().manual_seed(0))
    tt, r, eps, v = recover(t, b["x"])
    z, jump, kept = t.x, t.group == SC, t.cond != NULL
    u_own = net(z, tt, t.cond, sigma_end=tt)
    v_t = v
    if guidance != 1:
        u_u = net(z, tt, torch.full_like(t.cond, NULL), sigma_end=tt)
        v_t = torch.where(col(kept), guidance * v + (1 - guidance) * u_u, v)
        u_own = torch.where(col(kept), guidance * u_own + (1 - guidance) * u_u, u_own)
    want = v_t - col(tt - r) * net.dudt(z, tt, r, u_own)
    tol = 1e-6 if name == "meanflow" else 1e-5
    torch.testing.assert_close(t.target[jump], want[jump], atol=tol, rtol=tol)
    wrong = v_t - col(tt - r) * net.dudt(z, tt, r, v_t)  # the v direction differs here
    assert (wrong - want)[jump].abs().max() > 1e-2
    n_jump, n_kept = int(jump.sum()), int(kept.sum())
    assert float(t.info["extra_forward_images"]) == 3 * n_jump + (n_kept if guidance != 1 else 0)


@pytest.mark.parametrize("name", ["meanflow", "meanflow_fd"])
def test_predicted_direction_with_kappa_reads_each_dropped_jumps_null_velocity(name):
    """kappa > 0: the predicted direction reuses u_c (kept) and u(. | null) (dropped, its own
    velocity), so the null forward covers the dropped jumps too, and nothing else is added."""
    w, k = 3.0, 0.5
    net = PolyNet()
    b = batch(B=400)
    t = objective(name, cond_drop_prob=0.2, fd_delta=1e-3, fd_direction="predicted", guidance_scale=w,
                  guidance_mix=k)(b, Nets(student=net, ema_fast=net, null_cond=NULL), torch.Generator().manual_seed(0))
    tt, r, eps, v = recover(t, b["x"])
    z, jump, kept = t.x, t.group == SC, t.cond != NULL
    assert (jump & ~kept).any()
    omega = w * (1 - k)
    u_c = net(z, tt, b["cond"], sigma_end=tt)
    u_u = net(z, tt, torch.full_like(t.cond, NULL), sigma_end=tt)
    v_t = torch.where(col(kept), omega * v + k * u_c + (1 - omega - k) * u_u, v)
    tangent = torch.where(col(kept), (omega + k) * u_c + (1 - omega - k) * u_u, u_u)
    want = v_t - col(tt - r) * net.dudt(z, tt, r, tangent)
    tol = 1e-6 if name == "meanflow" else 1e-5
    torch.testing.assert_close(t.target[jump], want[jump], atol=tol, rtol=tol)
    n_jump, n_kept, n_dropped_jumps = int(jump.sum()), int(kept.sum()), int((jump & ~kept).sum())
    assert float(t.info["extra_forward_images"]) == 2 * n_jump + 2 * n_kept + n_dropped_jumps


def test_predicted_direction_stencil_converges_to_its_jvp_on_a_dit():
    """float64 DiT: the finite difference along u(z, t, t) against the JVP with the same tangent,
    second order in the gap."""
    model = small_dit(seed=3)
    jvp = dit_targets("meanflow", model, seed=4, fd_direction="predicted")
    plain = dit_targets("meanflow", model, seed=4)
    jump = jvp.group == SC
    assert (jvp.target[jump] - plain.target[jump]).abs().max() > 1e-3  # the direction matters
    errors = []
    for delta in (1e-3, 1e-4, 1e-5, 1e-6):  # sigma's features reach 1000 rad per unit at this scale
        fd = dit_targets("meanflow_fd", model, seed=4, fd_delta=delta, fd_direction="predicted")
        assert torch.equal(fd.x, jvp.x)
        errors.append(float((fd.target[jump] - jvp.target[jump]).abs().max()))
    assert errors[-1] < 1e-4, errors
    for coarse, fine in zip(errors, errors[1:]):
        assert fine < coarse / 30, errors


# --- r sampler and loss power ----------------------------------------------------------------


def test_r_sampler_puts_jumps_near_zero():
    net, b = PolyNet(), batch(B=4000)
    ends = {}
    for sampler in ("pair", "logit_normal"):
        t = objective("meanflow_fd", r_sampler=sampler, r_logit_mean=-3.0, r_logit_std=0.5)(
            b, Nets(student=net, null_cond=NULL), torch.Generator().manual_seed(0))
        jump = t.group == SC
        assert int(jump.sum()) == 1000 and (t.sigma_next[jump] <= t.sigma[jump]).all()
        ends[sampler] = t.sigma_next[jump]
    # logit-normal(-3, 0.5) has median sigmoid(-3) = 0.047; sorted against t it rarely swaps
    assert float(ends["logit_normal"].median()) == pytest.approx(0.047, abs=0.01)
    assert float((ends["logit_normal"] < 0.1).float().mean()) > 0.8 > float((ends["pair"] < 0.1).float().mean())


@pytest.mark.parametrize("p", [0.5, 0.75, 1.0])
def test_loss_weight_power_is_applied(p):
    net, b = PolyNet(), batch(B=32)
    t = objective("meanflow_fd", loss_weight_p=p, loss_weight_c=0.01)(b, Nets(student=net, null_cond=NULL),
                                                                      torch.Generator().manual_seed(0))
    pred = t.target + torch.randn_like(t.target) * torch.linspace(0.1, 2, 32, dtype=t.target.dtype).view(-1, 1, 1, 1)
    mse = (pred - t.target).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(t.loss_weight(pred), ((mse + 0.01) ** -p).float())
    assert load_config(None, ["objective.name=meanflow_fd", "model.time_inputs=2",
                              f"objective.loss_weight_p={p}"]).objective.loss_weight_p == p
