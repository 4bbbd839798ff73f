"""TDM's formulas (docs/tdm_method.md §2) against independent derivations."""

from __future__ import annotations

import pytest
import torch

from tdm_core.distill import DiscreteSchedule, losses

SCHEDULES = {
    "eps": DiscreteSchedule.scaled_linear(),
    "v": DiscreteSchedule.scaled_linear(),
    "flow": DiscreteSchedule.flow(shift=3.0),
}


def _coef(schedule, t):
    t = torch.as_tensor(t)
    return schedule.alphas[t], schedule.sigmas[t]


@pytest.mark.parametrize("parametrisation", ["eps", "v", "flow"])
def test_x0_and_eps_invert_each_parametrisation(parametrisation):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64), torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([10, 500, 990])
    a, s = _coef(SCHEDULES[parametrisation], t)
    ab, sb = a.view(-1, 1, 1, 1), s.view(-1, 1, 1, 1)
    x = ab * x0 + sb * eps
    prediction = {"eps": eps, "v": ab * eps - sb * x0, "flow": eps - x0}[parametrisation]
    x0_hat, eps_hat = losses.x0_and_eps(prediction, x, a, s, parametrisation)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-10)
    torch.testing.assert_close(eps_hat, eps, rtol=0, atol=1e-10)


def test_flow_schedule_is_diffusers_flow_match_training_table():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ours = DiscreteSchedule.from_diffusers_scheduler(scheduler)
    torch.testing.assert_close(ours.sigmas.float(), scheduler.sigmas.flip(0)[-1000:].float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.model_timesteps.float(), scheduler.timesteps.flip(0).float(), rtol=0, atol=1e-3)
    torch.testing.assert_close(ours.alphas + ours.sigmas, torch.ones(1000, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_x_tau_is_alpha_x0_plus_sigma_mixed_noise(kind):
    """x_τ built by DDIM jump + forward kernel equals α_τ x̂0 + σ_τ m, and m is unit-variance Gaussian."""
    schedule = SCHEDULES[kind]
    g = torch.Generator().manual_seed(1)
    b = 4096
    x0, eps, z = (torch.randn(b, 8, generator=g, dtype=torch.float64) for _ in range(3))
    t_mid, tau = torch.full((b,), 300), torch.full((b,), 620)
    a1, s1 = _coef(schedule, t_mid)
    a2, s2 = _coef(schedule, tau)
    x_mid = losses.ddim_renoise(x0, eps, a1, s1)
    x_tau = losses.forward_kernel(x_mid, z, a1, s1, a2, s2)
    m = losses.mixed_noise(eps, z, a1, s1, a2, s2)
    torch.testing.assert_close(x_tau, a2.view(-1, 1) * x0 + s2.view(-1, 1) * m, rtol=0, atol=1e-12)
    # (α2 σ1/α1)² + β² = σ2²: the mixed noise has unit variance.
    assert abs(m.var().item() - 1.0) < 0.03
    # Without the October-2025 σ1 factor the identity would fail.
    wrong = (a2 / a1).view(-1, 1) * eps + losses.kernel_beta(a1, s1, a2, s2).view(-1, 1) * z
    assert (a2.view(-1, 1) * x0 + wrong - x_tau).abs().max() > 1e-3


def test_importance_weight_at_tau_equal_t_mid():
    """τ = t_mid: β = 0, so x_τ = x_mid, m = ε̂ and z plays no part; the weight is then exp(−½(⟨ε̂²⟩ − ⟨z²⟩)), which is
    exactly 1 whenever z has ε̂'s mean square (here: z a permutation of ε̂, z ≠ ε̂)."""
    schedule = SCHEDULES["eps"]
    g = torch.Generator().manual_seed(2)
    eps, x0 = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([100, 400, 800])
    a, s = _coef(schedule, t)
    z = eps.flatten(1)[:, torch.randperm(32, generator=g)].view_as(eps)
    assert not torch.equal(z, eps)
    m = losses.mixed_noise(eps, z, a, s, a, s)
    torch.testing.assert_close(m, eps)
    torch.testing.assert_close(losses.forward_kernel(losses.ddim_renoise(x0, eps, a, s), z, a, s, a, s),
                               losses.ddim_renoise(x0, eps, a, s))
    torch.testing.assert_close(losses.importance_weight(m, z), torch.ones(3))
    # and away from τ = t_mid it is not 1
    a2, s2 = _coef(schedule, t + 150)
    w = losses.importance_weight(losses.mixed_noise(eps, z, a, s, a2, s2), z)
    assert (w - 1).abs().min() > 1e-4


def test_cfg_target_matches_official_expression():
    g = torch.Generator().manual_seed(3)
    x0_hat, r_c, r_u, f = (torch.randn(2, 4, 3, 3, generator=g) for _ in range(4))
    s = 4.5
    r = losses.cfg_target(r_c, r_u, s)
    torch.testing.assert_close(r, r_u + s * (r_c - r_u))
    # train_tdm_demo.py: coop = x̂0 + (sd − fake) + (cfg − 1)(sd − sd_uncond)
    official_target = x0_hat + (r_c - f) + (s - 1) * (r_c - r_u)
    torch.testing.assert_close(x0_hat + r - f, official_target, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(losses.cfg_target(r_c, r_u, 1.0), r_c)


def test_pseudo_huber_gradient():
    """∂L/∂x̂0 = (f − r)/sqrt((f − r)² + c²) / (w · numel): the DMD direction, normalised by mean|x̂0 − r|."""
    g = torch.Generator().manual_seed(4)
    x0_hat = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    r, f = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    c = 1e-3
    loss, w = losses.generator_loss(x0_hat, r, f, "pseudo_huber", c)
    loss.backward()
    w_ref = (x0_hat.detach() - r).abs().flatten(1).mean(1)
    torch.testing.assert_close(w.double(), w_ref, rtol=1e-6, atol=0)
    d = f - r
    expected = d / torch.sqrt(d**2 + c**2) / (w_ref.view(-1, 1, 1, 1) * x0_hat.numel())
    torch.testing.assert_close(x0_hat.grad, expected, rtol=1e-5, atol=1e-12)
    # value: mean((sqrt(d² + c²) − c)/w)
    torch.testing.assert_close(loss.double(), ((torch.sqrt(d**2 + c**2) - c) / w_ref.view(-1, 1, 1, 1)).mean(),
                               rtol=1e-6, atol=0)


def test_mse_and_vector_variants():
    g = torch.Generator().manual_seed(5)
    x0_hat = torch.randn(2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    r, f = torch.randn(2, 8, generator=g, dtype=torch.float64), torch.randn(2, 8, generator=g, dtype=torch.float64)
    w_ref = (x0_hat.detach() - r).abs().mean(1)
    loss, _ = losses.generator_loss(x0_hat, r, f, "mse")
    torch.testing.assert_close(loss.double(), ((f - r) ** 2 / w_ref.view(-1, 1)).mean(), rtol=1e-6, atol=0)
    loss, _ = losses.generator_loss(x0_hat, r, f, "pseudo_huber_vector")
    c = 0.00054 * 8**0.5
    norm = ((f - r) ** 2).sum(1)
    torch.testing.assert_close(loss.double(), ((torch.sqrt(norm + c**2) - c) / w_ref).mean(), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="unknown generator loss"):
        losses.generator_loss(x0_hat, r, f, "l1")


def test_fake_score_loss_weights():
    g = torch.Generator().manual_seed(6)
    fx0, x0 = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    snr = torch.tensor([0.5, 5.0, 80.0], dtype=torch.float64)
    w = torch.tensor([1.0, 0.5, 2.0])
    loss = losses.fake_score_loss(fx0, x0, snr, w, 5.0)
    expected = (((fx0 - x0) ** 2).mean(1) * torch.tensor([0.5, 5.0, 5.0]) * w).mean()
    torch.testing.assert_close(loss, expected)
    schedule = SCHEDULES["eps"]
    t = torch.tensor([0, 500, 999])
    ac = schedule.alphas[t] ** 2
    torch.testing.assert_close(schedule.snr(t), ac / (1 - ac))


def test_scaled_linear_schedule_is_diffusers_ddpm():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ours = DiscreteSchedule.from_diffusers_scheduler(scheduler)
    torch.testing.assert_close(DiscreteSchedule.scaled_linear().alphas.float(), ours.alphas.float(), rtol=0, atol=1e-6)
