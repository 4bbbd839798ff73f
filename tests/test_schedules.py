"""tdm_core schedules, grids and solver steps against diffusers 0.42.1 and the numbers of tdm_method.md §3."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, DPMSolverMultistepScheduler

from tdm_core import presets, schedules, solvers
from tdm_devkit import comfy_runtime

# SD1.5 / Dreamshaper scheduler_config.json (the "SD1.5 DDPM config" of the TDM README's DPM-Solver++ recipe).
SD15_SCHEDULER_CONFIG = {
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None,
}
# THUDM/CogVideoX-2b scheduler/scheduler_config.json.
COGVIDEOX_SCHEDULER_CONFIG = {
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "clip_sample_range": 1.0, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True, "sample_max_value": 1.0, "set_alpha_to_one": True, "snr_shift_scale": 3.0,
    "steps_offset": 0, "timestep_spacing": "trailing", "trained_betas": None,
}


def flow_scheduler(shift):
    return DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift,
                                       algorithm_type="dpmsolver++", solver_order=2)


def sd15_scheduler():
    return DPMSolverMultistepScheduler.from_config(SD15_SCHEDULER_CONFIG, algorithm_type="dpmsolver++",
                                                   solver_order=2)


# --- grids -------------------------------------------------------------------------------------------------------


def test_flow_grid_has_the_documented_numbers():
    grid = schedules.flow_shift_grid(4, 6.0)
    assert grid.timesteps == (999, 947, 856, 666)
    np.testing.assert_allclose(grid.sigmas, [0.999833, 0.947169, 0.856898, 0.666370, 0.0], atol=1e-6)
    assert schedules.flow_shift_grid(4, 3.0).timesteps == (999, 899, 749, 499)
    assert schedules.flow_shift_grid(4, 1.0).timesteps == (999, 749, 499, 249)
    assert schedules.flow_shift_grid(8, 6.0).timesteps == (999, 976, 947, 908, 856, 782, 666, 461)


@pytest.mark.parametrize("shift", [1.0, 2.0, 3.0, 4.5, 6.0])
def test_flow_grid_equals_diffusers_and_survives_float32(shift):
    scheduler = flow_scheduler(shift)
    for steps in range(1, 31):
        scheduler.set_timesteps(steps)
        grid = schedules.flow_shift_grid(steps, shift)
        assert list(grid.timesteps) == scheduler.timesteps.tolist(), steps
        reference = scheduler.sigmas.numpy()
        np.testing.assert_allclose(np.float32(grid.sigmas), reference, rtol=0, atol=0)
        # The float32 sigmas the nodes emit give back diffusers' integer timesteps under int(σ·1000), within ulps.
        sigmas32 = schedules.flow_sigmas_float32(grid.sigmas, grid.timesteps).numpy()
        assert [schedules.flow_model_timestep(s) for s in sigmas32[:-1]] == list(grid.timesteps)
        np.testing.assert_allclose(sigmas32, reference, rtol=4e-7, atol=0)


def test_float32_truncation_trap_is_handled():
    """3 steps at shift 1: diffusers has σ = 0.333 but t = 332 (truncated in float64 before the float32 cast)."""
    grid = schedules.flow_shift_grid(3, 1.0)
    assert grid.timesteps == (999, 666, 332)
    assert schedules.flow_model_timestep(float(np.float32(grid.sigmas[2]))) == 333  # the naive rule is off by one
    sigmas32 = schedules.flow_sigmas_float32(grid.sigmas, grid.timesteps)
    assert schedules.flow_model_timestep(float(sigmas32[2])) == 332


def test_sd15_linspace_grid_equals_diffusers():
    assert schedules.linspace_timesteps(4) == (999, 749, 500, 250)
    scheduler = sd15_scheduler()
    for steps in range(1, 31):
        scheduler.set_timesteps(steps)
        assert list(schedules.linspace_timesteps(steps)) == scheduler.timesteps.tolist(), steps
    scheduler.set_timesteps(4)
    sigmas = schedules.ve_sigmas_for_timesteps(schedules.sd15_alphas_cumprod(), schedules.linspace_timesteps(4))
    np.testing.assert_allclose(sigmas, [14.61465, 4.08173, 1.61828, 0.69580, 0.0], atol=1e-5)
    np.testing.assert_allclose(sigmas, scheduler.sigmas.numpy(), rtol=2e-6)


def test_cogvideox_schedule_equals_diffusers():
    ours = schedules.cogvideox_alphas_cumprod()
    reference = CogVideoXDDIMScheduler(**COGVIDEOX_SCHEDULER_CONFIG).alphas_cumprod.double()
    assert ours[999] == 0.0  # zero terminal SNR: x0 = −v at t = 999
    torch.testing.assert_close(ours, reference, rtol=0, atol=2e-7)
    trained = [float(ours[t]) for t in schedules.cogvideox_trained_timesteps()]
    np.testing.assert_allclose(trained, [0.0, 0.002372, 0.026151, 0.178615], atol=1e-6)


def test_trailing_grid_equals_cogvideox_scheduler():
    scheduler = CogVideoXDDIMScheduler(**COGVIDEOX_SCHEDULER_CONFIG)
    assert schedules.trailing_timesteps(4) == (999, 749, 499, 249)
    for steps in range(1, 51):
        scheduler.set_timesteps(steps)
        assert list(schedules.trailing_timesteps(steps)) == scheduler.timesteps.tolist(), steps


def test_trained_training_demo_and_custom_grids():
    assert schedules.grid_timesteps("cogvideox_trained", 4) == (999, 856, 665, 399)
    with pytest.raises(ValueError, match="only for 4 steps"):
        schedules.cogvideox_trained_timesteps(2)
    assert schedules.training_demo_timesteps(4, 900) == (899, 674, 449, 224)
    assert schedules.training_demo_timesteps(4) == (799, 599, 399, 199)
    assert schedules.parse_timesteps("999, 856,665 399") == (999, 856, 665, 399)
    for bad, message in [("", "empty"), ("999, x", "integers"), ("500, 600", "descending"), ("1000", r"\[0, 999\]")]:
        with pytest.raises(ValueError, match=message):
            schedules.parse_timesteps(bad)
    with pytest.raises(ValueError, match="unknown timestep grid"):
        schedules.grid_timesteps("karras", 4)


def test_even_grid_is_the_demo_rule_with_its_remainder_spread():
    # where K divides N the two rules agree (the demo's own N = 1000 and 900 grids)
    for total, steps in [(1000, 4), (1000, 50), (900, 4), (1000, 200)]:
        assert schedules.even_timesteps(steps, total) == schedules.training_demo_timesteps(steps, total)
    # SD3's grid top (999): the demo rule leaves 49 of 999 below its last step, the even grid spreads them
    assert schedules.training_demo_timesteps(50, 999)[-1] == 67
    grid = schedules.even_timesteps(50, 999)
    assert (grid[0], grid[-1], len(grid)) == (998, 19, 50)
    for total in (999, 1000, 997, 61):
        for steps in (1, 3, 7, 50, 60):
            if steps > total:
                continue
            grid = schedules.even_timesteps(steps, total)
            # the K steps cut the N timesteps 0 … N − 1 into K runs (the last from t_{K−1} down to 0) whose lengths
            # differ by at most 1
            runs = -np.diff([*grid, -1])
            assert len(grid) == steps and grid[0] == total - 1 and runs.sum() == total, (total, steps)
            assert runs.min() >= 1 and runs.max() - runs.min() <= 1, (total, steps, runs)
    with pytest.raises(ValueError, match="total_steps ≥ steps"):
        schedules.even_timesteps(50, 40)


def test_every_preset_names_a_known_grid_and_solver():
    for preset in presets.PRESETS.values():
        assert preset.grid in schedules.GRIDS, preset.name
        assert preset.solver in solvers.SOLVERS, preset.name
        assert len(schedules.grid_timesteps(preset.grid, preset.steps, shift=preset.shift)) == preset.steps
    assert presets.solver_for_parametrisation("flow") == "flow_dpmpp_2m"
    assert presets.solver_for_parametrisation("eps") == "dpmpp_2m"
    assert presets.solver_for_parametrisation("v") == "ddim_v"


# --- solver steps ------------------------------------------------------------------------------------------------


def _coefficients(space, sigmas, i):
    """The update of step i as coefficients on (x, D_i, D_{i−1}), read off with unit vectors."""
    x, d, d_old = torch.eye(3, dtype=torch.float64)
    return solvers.dpmpp_2m_step(x, d, d_old, sigmas[i], sigmas[i + 1], sigmas[i - 1], space).tolist()


def test_flow_dpmpp_2m_coefficients_are_diffusers_not_comfyui():
    """tdm_method.md §3, shift 6, step 2: diffusers .90469x + .10430 D_i − .00899 D_{i−1};
    ComfyUI's λ = −ln σ (our "ve" space) gives .90469x + .18351 D_i − .08821 D_{i−1}."""
    sigmas = schedules.flow_shift_grid(4, 6.0).sigmas
    np.testing.assert_allclose(_coefficients("flow", sigmas, 1), [0.90469, 0.10430, -0.00899], atol=1e-5)
    np.testing.assert_allclose(_coefficients("ve", sigmas, 1), [0.90469, 0.18351, -0.08821], atol=1e-5)


def test_first_and_last_steps_are_first_order():
    x, d, d_old = torch.eye(3, dtype=torch.float64)
    first = solvers.dpmpp_2m_step(x, d, None, 0.9, 0.5, None, "flow")
    ddim = solvers.ddim_step(x, d, 0.9, 0.5, "flow")
    torch.testing.assert_close(first, ddim)  # first-order DPM++ = DDIM
    last = solvers.dpmpp_2m_step(x, d, d_old, 0.5, 0.0, 0.9, "flow")
    torch.testing.assert_close(last, d)


class _ConstantX0:
    def __init__(self, x0):
        self.x0 = x0
        self.calls = 0

    def __call__(self, x, sigma, **kwargs):
        self.calls += 1
        return self.x0


def test_ddim_gamma_is_a_seeded_extension_that_keeps_the_marginal():
    x0 = torch.full((1, 4, 64, 64), 0.5)
    sigmas = torch.tensor(schedules.flow_shift_grid(4, 6.0).sigmas[:-1] + (0.3,), dtype=torch.float32)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    start = (1 - sigmas[0]) * x0 + sigmas[0] * noise

    model = _ConstantX0(x0)
    deterministic = solvers.sample_ddim(model, start, sigmas, space="flow", disable=True)
    assert model.calls == 4
    expected_eps = (start - (1 - sigmas[0]) * x0) / sigmas[0]  # DDIM keeps ε̂ along the trajectory
    torch.testing.assert_close(deterministic, 0.7 * x0 + 0.3 * expected_eps, atol=1e-6, rtol=0)
    torch.testing.assert_close(solvers.sample_ddim(model, start, sigmas, space="flow", gamma=0.0, disable=True),
                               deterministic, atol=0, rtol=0)

    def run(seed):
        return solvers.sample_ddim(model, start, sigmas, space="flow", gamma=0.5, disable=True,
                                   extra_args={"seed": seed})

    a, b, c = run(1), run(1), run(2)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert (a - c).abs().max() > 0.1 and (a - deterministic).abs().max() > 0.1
    # x = α x0 + σ·(unit noise) at the final level: the forward kernel's β keeps the noise variance exactly σ².
    residual = (a - 0.7 * x0) / 0.3
    assert abs(residual.std().item() - 1.0) < 0.02 and abs(residual.mean().item()) < 0.02


# --- CogVideoX v-DDIM at arbitrary timesteps ------------------------------------------------------------------------


def _tiny_v_model():
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(4, 4, generator=generator) / 2
    bias = torch.randn(4, generator=generator)

    def v_model(x, t):
        mixed = torch.einsum("oc,bfchw->bfohw", weight, x)
        return torch.tanh(mixed + bias.view(1, 1, 4, 1, 1) * (t / 1000.0)) * 1.5

    return v_model


def test_v_ddim_equals_diffusers_cogvideox_scheduler_on_the_trailing_grid():
    v_model = _tiny_v_model()
    noise = torch.randn(1, 3, 4, 6, 8, generator=torch.Generator().manual_seed(1))
    scheduler = CogVideoXDDIMScheduler(**COGVIDEOX_SCHEDULER_CONFIG)
    scheduler.set_timesteps(4)
    reference = noise.clone()
    for t in scheduler.timesteps:
        reference = scheduler.step(v_model(reference, int(t)), t, reference).prev_sample
    ours = solvers.sample_ddim_v_timesteps(v_model, noise.clone(), schedules.trailing_timesteps(4),
                                           schedules.cogvideox_alphas_cumprod())
    assert reference.abs().max() > 0.1
    torch.testing.assert_close(ours, reference, rtol=0, atol=2e-6)


def test_v_ddim_at_the_trained_timesteps_equals_the_reference_loop():
    """diffusers cannot step 999 → 856 → 665 → 399; the reference is the DDIM formula on its alphas_cumprod."""
    v_model = _tiny_v_model()
    noise = torch.randn(1, 3, 4, 6, 8, generator=torch.Generator().manual_seed(2))
    alphas = CogVideoXDDIMScheduler(**COGVIDEOX_SCHEDULER_CONFIG).alphas_cumprod
    timesteps = (999, 856, 665, 399)
    reference = noise.clone()
    for i, t in enumerate(timesteps):
        a_t = alphas[t]
        a_p = alphas[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.tensor(1.0)
        x0 = a_t.sqrt() * reference - (1 - a_t).sqrt() * v_model(reference, t)
        ratio = ((1 - a_p) / (1 - a_t)).sqrt()
        reference = ratio * reference + (a_p.sqrt() - a_t.sqrt() * ratio) * x0
    seen = []
    ours = solvers.sample_ddim_v_timesteps(v_model, noise.clone(), timesteps, schedules.cogvideox_alphas_cumprod(),
                                           callback=lambda info: seen.append(info["timestep"]))
    assert seen == list(timesteps)
    torch.testing.assert_close(ours, reference, rtol=0, atol=2e-6)
    # x0 = −v at t = 999 (ᾱ = 0): the trained grid really starts at zero SNR
    trailing = solvers.sample_ddim_v_timesteps(v_model, noise.clone(), (999, 749, 499, 249),
                                               schedules.cogvideox_alphas_cumprod())
    assert (trailing - ours).abs().max() > 1e-3


def test_tdm_core_never_imports_comfyui():
    code = ("import sys; import tdm_core.schedules, tdm_core.solvers, tdm_core.presets; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('comfy', 'comfy_api', 'comfy_extras', 'nodes')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=comfy_runtime.REPO_ROOT, check=True)
