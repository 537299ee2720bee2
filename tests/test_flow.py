"""Rectified-flow maths: known solutions, torchdiffeq equivalence, CFG and in-context masking."""
import math

import pytest
import torch
import torchdiffeq

from muvi import flow
from muvi.models.dit import DiT, DiTConfig


def test_euler_matches_closed_form_of_linear_ode():
    # dx/dt = λx: N Euler steps give exactly x0 (1 + λ/N)^N, which tends to x0 e^λ.
    lam, x0 = -1.3, torch.randn(2, 5, 3, dtype=torch.float64)
    errors = []
    for n in (10, 20, 40):
        x1 = flow.euler(lambda t, x: lam * x, x0, n)
        torch.testing.assert_close(x1, x0 * (1 + lam / n) ** n, rtol=1e-12, atol=1e-12)
        errors.append((x1 - x0 * math.exp(lam)).abs().max().item())
    assert errors[0] / errors[1] == pytest.approx(2, rel=0.1)  # first-order convergence
    assert errors[1] / errors[2] == pytest.approx(2, rel=0.1)


def test_exact_velocity_of_a_point_mass_transports_noise_to_the_data():
    # For data concentrated at x1 the rectified-flow velocity is (x1 - x) / (1 - t); Euler lands on
    # x1 exactly whatever the noise, because the last step has dt = 1 - t.
    x1 = torch.randn(3, 7, 8, dtype=torch.float64)
    x0 = torch.randn_like(x1)

    def velocity(x, t):
        return (x1 - x) / (1 - t)[..., None]

    out = flow.sample(velocity, x0, num_steps=8)
    torch.testing.assert_close(out, x1, rtol=1e-10, atol=1e-10)


def tiny_dit(seed=0):
    torch.manual_seed(seed)
    net = DiT(DiTConfig.preset("tiny"))
    torch.nn.init.normal_(net.out.weight, std=0.2)  # the zero init would make the field trivial
    return net.eval()


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
def test_sampler_matches_torchdiffeq(method):
    net = tiny_dit()
    cond = torch.randn(2, 9, 64)
    x0 = torch.randn(2, 9, 8)
    velocity = flow.guided_velocity(net, cond, net.null_condition(2, 9), 3.0)
    with torch.no_grad():
        ours = flow.sample(velocity, x0, num_steps=12, method=method)
        ref = torchdiffeq.odeint(lambda t, x: velocity(x, t.expand(2)[:, None].expand(2, 9)), x0,
                                 torch.tensor([0.0, 1.0]), method=method,
                                 options={"step_size": 1 / 12})[-1]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_adaptive_solver_runs_and_agrees_with_fine_euler():
    net = tiny_dit()
    cond, x0 = torch.randn(1, 6, 64), torch.randn(1, 6, 8)
    velocity = flow.guided_velocity(net, cond, net.null_condition(1, 6), 1.0)
    with torch.no_grad():
        fine = flow.sample(velocity, x0, num_steps=400)
        adaptive = flow.sample(velocity, x0, method="dopri5", rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(adaptive, fine, rtol=1e-2, atol=1e-2)


def test_perfect_predictor_gives_zero_loss():
    x1 = torch.randn(4, 10, 8)
    t = flow.sample_time(4, generator=torch.Generator().manual_seed(0))
    x_t, t_frames, target = flow.training_pair(x1, t, generator=torch.Generator().manual_seed(1))
    # The velocity that an oracle knowing x1 would predict from (x_t, t) alone.
    v = (x1 - x_t) / (1 - t_frames)[..., None]
    assert flow.flow_loss(v, target).item() < 1e-10
    assert flow.flow_loss(torch.zeros_like(v), target).item() > 0.5


def test_interpolation_endpoints():
    x0, x1 = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    torch.testing.assert_close(flow.interpolate(x0, x1, torch.zeros(2)), x0)
    torch.testing.assert_close(flow.interpolate(x0, x1, torch.ones(2)), x1)


def test_cfg_scale_one_is_the_conditional_prediction_and_zero_the_null():
    net = tiny_dit()
    x, t, cond = torch.randn(2, 5, 8), torch.rand(2, 5), torch.randn(2, 5, 64)
    null = net.null_condition(2, 5)
    with torch.no_grad():
        v_cond, v_null = net(x, t, cond), net(x, t, null)
        torch.testing.assert_close(flow.guided_velocity(net, cond, null, 1.0)(x, t), v_cond)
        torch.testing.assert_close(flow.cfg_combine(v_cond, v_null, 1.0), v_cond)
        torch.testing.assert_close(flow.cfg_combine(v_cond, v_null, 0.0), v_null)
        # The batched pass equals two separate passes.
        torch.testing.assert_close(flow.guided_velocity(net, cond, null, 4.0)(x, t),
                                   v_null + 4.0 * (v_cond - v_null), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_prompt_guidance_adds_the_pull_of_the_prompt_on_the_new_frames(scale):
    """v = v(∅,p) + s·(v(c,p) − v(∅,p)) + s_p·(v(c,p) − v(c,∅)), where v(c,∅) is the new frames run
    alone (the model without a prompt); the prompt frames keep the plain guided value; s_p = 0 is
    plain guidance."""
    net = tiny_dit()
    b, n, p = 2, 9, 3
    x, t, cond = torch.randn(b, n, 8), torch.rand(b, n), torch.randn(b, n, 64)
    t[:, :p] = 1.0
    null = net.null_condition(b, n)
    with torch.no_grad():
        plain = flow.guided_velocity(net, cond, null, scale)(x, t)
        torch.testing.assert_close(flow.prompt_guided_velocity(net, cond, null, scale, p, 0.0)(x, t), plain)
        v_cond, v_free = net(x, t, cond), net(x[:, p:], t[:, p:], cond[:, p:])
        got = flow.prompt_guided_velocity(net, cond, null, scale, p, 2.5)(x, t)
    torch.testing.assert_close(got[:, :p], plain[:, :p])
    torch.testing.assert_close(got[:, p:], plain[:, p:] + 2.5 * (v_cond[:, p:] - v_free), rtol=1e-5, atol=1e-5)
    assert (v_cond[:, p:] - v_free).abs().max() > 1e-3  # the prompt does change the new frames


@pytest.mark.parametrize("method", ["euler", "dopri5"])
def test_context_prefix_is_kept_exactly(method):
    net = tiny_dit()
    b, n, p = 2, 12, 4
    prompt = torch.randn(b, n, 8)
    context = flow.context_mask(torch.tensor([p, p + 2]), n)
    velocity = flow.guided_velocity(net, torch.randn(b, n, 64), net.null_condition(b, n), 4.0)
    with torch.no_grad():
        out = flow.sample(velocity, torch.randn(b, n, 8), num_steps=5, method=method,
                          context=context, context_latent=prompt)
    assert torch.equal(out[0, :p], prompt[0, :p]) and torch.equal(out[1, :p + 2], prompt[1, :p + 2])
    assert not torch.allclose(out[0, p:], prompt[0, p:])


def test_loss_ignores_the_context_and_context_is_not_noised():
    x1 = torch.randn(2, 10, 8)
    context = flow.context_mask(torch.tensor([3, 0]), 10)
    x_t, t_frames, target = flow.training_pair(x1, torch.tensor([0.2, 0.7]), context=context)
    assert torch.equal(x_t[0, :3], x1[0, :3])
    assert torch.all(t_frames[0, :3] == 1) and torch.all(t_frames[0, 3:] == 0.2)
    pred = torch.randn_like(target)
    changed = pred.clone()
    changed[0, :3] += 100.0
    assert flow.flow_loss(pred, target, context) == flow.flow_loss(changed, target, context)
    assert flow.flow_loss(pred, target) != flow.flow_loss(changed, target)


def test_prefix_length_is_the_shorter_of_14s_and_a_third():
    assert flow.prefix_frames(300, 10.0) == 99      # 30 s clip: 33 % = 9.9 s
    assert flow.prefix_frames(600, 10.0) == 140     # 60 s clip: capped at 14 s


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_steps"):
        flow.sample(lambda x, t: x, torch.zeros(1, 2, 3), num_steps=0)
    with pytest.raises(ValueError, match="unknown ODE method"):
        flow.sample(lambda x, t: x, torch.zeros(1, 2, 3), method="leapfrog")
