"""TDM nodes inside ComfyUI's SamplerCustom on the twin tiny models against the official diffusers recipes.

Identical weights (twins) and identical initial noise (ComfyUI's seeded CPU noise is handed to diffusers); the
final latents are compared after undoing ComfyUI's latent scaling (`process_latent_in`). Tolerances are fp32
rounding relative to the latent's magnitude; they are not loosened to absorb convention differences.
"""

from __future__ import annotations

import comfy.model_management
import comfy.sample
import comfy.samplers
import pytest
import torch
from comfy_extras.nodes_custom_sampler import SamplerCustom
from comfy_extras.nodes_model_advanced import ModelSamplingSD3
from diffusers import DPMSolverMultistepScheduler
from test_schedules import SD15_SCHEDULER_CONFIG

from tdm_core import presets, schedules
from tdm_devkit import twins

PROMPT = "a lighthouse at dusk"
SEED = 42
# fp32 rounding: relative to max |latent| (measured ≈ 2.5e-7 on SD3, see the issue note); 4× headroom.
SD3_RTOL = 1e-6
SD15_RTOL = 2e-6


@pytest.fixture(scope="module")
def sampling(pack):
    return pack.nodes.sampling


def tdm_custom(sampling, model, family, latent, steps, preset, shift=0.0, seed=SEED, sampler=None, **sigma_options):
    """TDM Scheduler + TDM Sampler in ComfyUI's own SamplerCustom node (cfg 1, empty negative)."""
    sigmas = sampling.TDMScheduler.execute(model, preset, steps, shift, sigma_options.get("grid", "preset"),
                                           sigma_options.get("custom_timesteps", ""),
                                           schedules.TRAINING_DEMO_TOTAL_STEPS).result[0]
    if sampler is None:
        sampler = sampling.TDMSampler.execute("auto", 0.0, "integer", "unit").result[0]
    cond = twins.tiny_conditioning(family, PROMPT)
    out = SamplerCustom.execute(model, True, seed, 1.0, cond, [], sampler, sigmas, {"samples": latent}).result[0]
    return model.model.process_latent_in(out["samples"]), sigmas


def diffusers_sd3(twin, noise, steps, shift):
    """The official SD3 TDM recipe: DPM-Solver++(2M) with flow sigmas, integer timesteps, x_T = noise."""
    context, pooled = twins.tiny_text_embedding("sd3", PROMPT)
    scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                            flow_shift=shift, algorithm_type="dpmsolver++", solver_order=2)
    scheduler.set_timesteps(steps)
    x = noise.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            v = twin.diffusers(hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=context,
                               pooled_projections=pooled).sample
            x = scheduler.step(v, t, x).prev_sample
    return x


def diffusers_sd15(twin, noise, steps, timesteps=None):
    """The official Dreamshaper TDM recipe: DPM-Solver++(2M) with the SD1.5 DDPM config (or custom timesteps)."""
    context, _ = twins.tiny_text_embedding("sd15", PROMPT)
    scheduler = DPMSolverMultistepScheduler.from_config(SD15_SCHEDULER_CONFIG, algorithm_type="dpmsolver++",
                                                        solver_order=2)
    if timesteps is None:
        scheduler.set_timesteps(steps)
    else:
        scheduler.set_timesteps(timesteps=list(timesteps))
    x = noise.clone() * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = twin.diffusers(scheduler.scale_model_input(x, t), t, encoder_hidden_states=context).sample
            x = scheduler.step(eps, t, x).prev_sample
    return x


def empty_latent(family, batch=1):
    return torch.zeros(batch, twins.FAMILY_LATENT_CHANNELS[family], 16, 16)


def max_error(a, b):
    return (a - b).abs().max().item()


# --- SD3 / SD3.5 ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps,shift", [(4, 6.0), (1, 6.0), (2, 6.0), (8, 6.0), (4, 3.0), (4, 1.0), (3, 1.0)])
def test_sd3_tdm_nodes_equal_the_diffusers_recipe(sampling, sd3_twin, steps, shift):
    latent = empty_latent("sd3")
    ours, sigmas = tdm_custom(sampling, sd3_twin.comfy, "sd3", latent, steps, "sd3", shift)
    reference = diffusers_sd3(sd3_twin, comfy.sample.prepare_noise(latent, SEED), steps, shift)
    assert len(sigmas) == steps + 1
    assert reference.abs().max() > 1.0
    torch.testing.assert_close(ours, reference, rtol=0, atol=SD3_RTOL * reference.abs().max().item())


def test_sd35_tdm_nodes_equal_the_diffusers_recipe(sampling, sd35_twin):
    latent = empty_latent("sd35", batch=2)
    ours, _ = tdm_custom(sampling, sd35_twin.comfy, "sd35", latent, 4, "sd35")
    reference = diffusers_sd3(sd35_twin, comfy.sample.prepare_noise(latent, SEED), 4, 6.0)
    torch.testing.assert_close(ours, reference, rtol=0, atol=SD3_RTOL * reference.abs().max().item())


def test_why_the_tdm_solver_exists_on_flow(sampling, sd3_twin):
    """ComfyUI's dpmpp_2m (λ = −ln σ) on the same sigmas is far from the recipe; so are float timesteps."""
    latent = empty_latent("sd3")
    reference = diffusers_sd3(sd3_twin, comfy.sample.prepare_noise(latent, SEED), 4, 6.0)
    tolerance = SD3_RTOL * reference.abs().max().item()
    core, _ = tdm_custom(sampling, sd3_twin.comfy, "sd3", latent, 4, "sd3",
                         sampler=comfy.samplers.sampler_object("dpmpp_2m"))
    # the same pure-noise start as diffusers, so that only the solver differs
    core_unit_start, _ = tdm_custom(sampling, sd3_twin.comfy, "sd3", latent, 4, "sd3",
                                    sampler=comfy.samplers.KSAMPLER(_dpmpp_2m_from_unit_noise))
    float_steps, _ = tdm_custom(sampling, sd3_twin.comfy, "sd3", latent, 4, "sd3",
                                sampler=sampling.TDMSampler.execute("auto", 0.0, "float", "unit").result[0])
    scaled_start, _ = tdm_custom(sampling, sd3_twin.comfy, "sd3", latent, 4, "sd3",
                                 sampler=sampling.TDMSampler.execute("auto", 0.0, "integer", "scaled").result[0])
    assert max_error(core, reference) > 1000 * tolerance
    assert max_error(core_unit_start, reference) > 1000 * tolerance
    assert max_error(float_steps, reference) > 100 * tolerance
    assert max_error(scaled_start, reference) > 10 * tolerance


def _dpmpp_2m_from_unit_noise(model, x, sigmas, extra_args=None, callback=None, disable=None):
    from comfy.k_diffusion.sampling import sample_dpmpp_2m

    return sample_dpmpp_2m(model, model.noise.clone(), sigmas, extra_args, callback, disable)


def test_modelsamplingsd3_patch_keeps_the_recipe_exact(sampling, sd3_twin):
    """A ModelSamplingSD3 patch (a new model_sampling object, shift 3) moves ComfyUI's own schedulers, not the TDM
    grid: the preset's shift rules, t ↔ σ goes through the patched object, and parity with diffusers holds."""
    patched = ModelSamplingSD3().patch(sd3_twin.comfy, 3.0)[0]
    assert patched.get_model_object("model_sampling") is not sd3_twin.comfy.get_model_object("model_sampling")
    plain = sampling.tdm_sigmas(sd3_twin.comfy, "sd3", 4)
    torch.testing.assert_close(sampling.tdm_sigmas(patched, "sd3", 4), plain, rtol=0, atol=0)
    assert sampling.tdm_sigmas(patched, "sd3", 4, shift=3.0).tolist() != plain.tolist()
    custom = sampling.tdm_sigmas(patched, "sd3", 4, custom_timesteps="999, 856, 665, 399")
    assert [schedules.flow_model_timestep(s) for s in custom[:-1].tolist()] == [999, 856, 665, 399]
    latent = empty_latent("sd3")
    ours, _ = tdm_custom(sampling, patched, "sd3", latent, 4, "sd3")
    reference = diffusers_sd3(sd3_twin, comfy.sample.prepare_noise(latent, SEED), 4, 6.0)
    torch.testing.assert_close(ours, reference, rtol=0, atol=SD3_RTOL * reference.abs().max().item())


# --- SD1.5 / Dreamshaper -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [4, 1, 2, 8])
def test_sd15_tdm_nodes_equal_the_diffusers_recipe(sampling, sd15_twin, steps):
    latent = empty_latent("sd15")
    ours, sigmas = tdm_custom(sampling, sd15_twin.comfy, "sd15", latent, steps, "dreamshaper")
    reference = diffusers_sd15(sd15_twin, comfy.sample.prepare_noise(latent, SEED), steps)
    model_sampling = sd15_twin.comfy.get_model_object("model_sampling")
    # sigmas are the model's own table entries: its timestep() gives the grid back exactly
    assert model_sampling.timestep(sigmas[:-1]).tolist() == list(schedules.linspace_timesteps(steps))
    assert reference.abs().max() > 0.1
    torch.testing.assert_close(ours, reference, rtol=0, atol=SD15_RTOL * reference.abs().max().item())


def test_sd15_training_demo_grid_starts_from_unit_noise_like_diffusers(sampling, sd15_twin):
    """Grid 899/674/449/224 (train_tdm_demo.py, N = 900): σ_0 < σ_max, where ComfyUI would start from σ_0·noise;
    the recipe (diffusers, the TDM rollout) starts from plain unit noise labelled t_0."""
    latent = empty_latent("sd15")
    grid = schedules.training_demo_timesteps(4, 900)
    ours, sigmas = tdm_custom(sampling, sd15_twin.comfy, "sd15", latent, 4, "dreamshaper",
                              custom_timesteps=", ".join(map(str, grid)))
    model_sampling = sd15_twin.comfy.get_model_object("model_sampling")
    assert model_sampling.timestep(sigmas[:-1]).tolist() == list(grid)
    reference = diffusers_sd15(sd15_twin, comfy.sample.prepare_noise(latent, SEED), 4, timesteps=grid)
    torch.testing.assert_close(ours, reference, rtol=0, atol=SD15_RTOL * reference.abs().max().item())
    scaled = sampling.TDMSampler.execute("auto", 0.0, "integer", "scaled").result[0]
    comfy_start, _ = tdm_custom(sampling, sd15_twin.comfy, "sd15", latent, 4, "dreamshaper", sampler=scaled,
                                custom_timesteps=", ".join(map(str, grid)))
    assert max_error(comfy_start, reference) > 100 * SD15_RTOL * reference.abs().max().item()


def test_scheduler_grid_options_give_the_named_timesteps(sampling, sd15_twin, sd3_twin):
    model_sampling = sd15_twin.comfy.get_model_object("model_sampling")
    for grid, options, expected in [
        ("trailing", {}, (999, 749, 499, 249)),
        ("training_demo", {"demo_total_steps": 900}, (899, 674, 449, 224)),
        ("cogvideox_trained", {}, (999, 856, 665, 399)),
    ]:
        sigmas = sampling.tdm_sigmas(sd15_twin.comfy, "dreamshaper", 4, grid=grid, **options)
        assert model_sampling.timestep(sigmas[:-1]).tolist() == list(expected), grid
        assert sigmas[-1] == 0
    flow = sampling.tdm_sigmas(sd3_twin.comfy, "sd3", 4, grid="trailing")
    assert [schedules.flow_model_timestep(s) for s in flow[:-1].tolist()] == [999, 749, 499, 249]
    with pytest.raises(ValueError, match="rectified-flow"):
        sampling.tdm_sigmas(sd15_twin.comfy, "dreamshaper", 4, grid="flow_shift")


def test_sd15_tdm_dpmpp_2m_equals_comfyui_dpmpp_2m_on_vp_models(sampling, sd15_twin):
    """On VP-ε models the VE space's λ = −ln σ is diffusers' λ: core dpmpp_2m on the TDM sigmas agrees."""
    latent = empty_latent("sd15")
    ours, _ = tdm_custom(sampling, sd15_twin.comfy, "sd15", latent, 4, "dreamshaper")
    core, _ = tdm_custom(sampling, sd15_twin.comfy, "sd15", latent, 4, "dreamshaper",
                         sampler=comfy.samplers.sampler_object("dpmpp_2m"))
    torch.testing.assert_close(ours, core, rtol=0, atol=SD15_RTOL * core.abs().max().item())


# --- evaluation count, callbacks, cancel, seeds ----------------------------------------------------------------------


class CountForwards:
    def __init__(self, module):
        self.batches = []
        self.handle = module.register_forward_pre_hook(lambda mod, args: self.batches.append(args[0].shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("family,preset,steps", [("sd3", "sd3", 4), ("sd3", "sd3", 1), ("sd15", "dreamshaper", 4)])
def test_exactly_k_model_evaluations_per_image_and_no_unconditional_pass(sampling, request, family, preset, steps):
    twin = request.getfixturevalue(f"{family}_twin")
    latent = empty_latent(family, batch=2)
    with CountForwards(twin.comfy.model.diffusion_model) as count:
        sampling.TDMKSampler.execute(twin.comfy, twins.tiny_conditioning(family, PROMPT), {"samples": latent},
                                     preset, steps, SEED)
    assert count.batches == [2] * steps  # K calls, each with the 2 images of the batch, no unconditional half
    if steps == 4 and family == "sd3":
        with CountForwards(twin.comfy.model.diffusion_model) as count:
            tdm_custom(sampling, twin.comfy, family, latent, steps, preset)
        assert count.batches == [2] * steps


def test_callback_every_step_and_cancel_stops_sampling(sampling, sd3_twin):
    latent = empty_latent("sd3")
    sigmas = sampling.tdm_sigmas(sd3_twin.comfy, "sd3", 4)
    sampler = sampling.tdm_sampler()
    cond = twins.tiny_conditioning("sd3", PROMPT)
    noise = comfy.sample.prepare_noise(latent, SEED)
    steps_seen = []

    def callback(step, x0, x, total):
        steps_seen.append((step, total, tuple(x0.shape)))

    comfy.sample.sample_custom(sd3_twin.comfy, noise, 1.0, sampler, sigmas, cond, [], latent, callback=callback,
                               disable_pbar=True, seed=SEED)
    assert steps_seen == [(i, 4, tuple(latent.shape)) for i in range(4)]

    def cancel_at_second_step(step, x0, x, total):
        if step == 1:  # what ComfyUI's progress hook does when the user presses Cancel
            comfy.model_management.interrupt_current_processing(True)
            comfy.model_management.throw_exception_if_processing_interrupted()

    with CountForwards(sd3_twin.comfy.model.diffusion_model) as count:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            comfy.sample.sample_custom(sd3_twin.comfy, noise, 1.0, sampler, sigmas, cond, [], latent,
                                       callback=cancel_at_second_step, disable_pbar=True, seed=SEED)
    assert len(count.batches) == 2


def test_all_in_one_node_is_seeded_and_equals_the_custom_graph(sampling, sd3_twin):
    latent = empty_latent("sd3")
    cond = twins.tiny_conditioning("sd3", PROMPT)

    def run(seed):
        out = sampling.TDMKSampler.execute(sd3_twin.comfy, cond, {"samples": latent}, "sd3", 4, seed).result[0]
        return out["samples"]

    a, b, c = run(SEED), run(SEED), run(SEED + 1)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert max_error(a, c) > 0.1
    custom, _ = tdm_custom(sampling, sd3_twin.comfy, "sd3", latent, 4, "sd3")
    torch.testing.assert_close(sd3_twin.comfy.model.process_latent_in(a), custom, rtol=0, atol=0)


def test_gamma_extension_runs_seeded_and_gamma_zero_is_tdm(sampling, sd3_twin):
    latent = empty_latent("sd3")

    def run(gamma, seed=SEED):
        sampler = sampling.TDMSampler.execute("ddim", gamma, "integer", "unit").result[0]
        return tdm_custom(sampling, sd3_twin.comfy, "sd3", latent, 4, "sd3", seed=seed, sampler=sampler)[0]

    deterministic, noisy_a, noisy_b = run(0.0), run(0.3), run(0.3)
    torch.testing.assert_close(noisy_a, noisy_b, rtol=0, atol=0)
    assert max_error(noisy_a, deterministic) > 1e-2
    assert torch.isfinite(noisy_a).all()
    with pytest.raises(ValueError, match="ddim solver only"):
        tdm_custom(sampling, sd3_twin.comfy, "sd3", latent, 4, "sd3",
                   sampler=sampling.TDMSampler.execute("dpmpp_2m", 0.3, "integer", "unit").result[0])


# --- presets that do not fit the model -------------------------------------------------------------------------------


@pytest.mark.parametrize("preset,twin_name,model_words", [
    ("sd3", "sd15_twin", ["SD15", "ε-prediction"]),
    ("sd35", "sd15_twin", ["SD15", "ε-prediction"]),
    ("dreamshaper", "sd3_twin", ["SD3", "rectified flow"]),
    ("cogvideox", "sd15_twin", ["SD15", "ε-prediction"]),
    ("cogvideox", "sd3_twin", ["SD3", "rectified flow"]),
])
def test_preset_that_does_not_fit_the_model_is_a_clear_error(sampling, request, preset, twin_name, model_words):
    twin = request.getfixturevalue(twin_name)
    recipe = presets.get_preset(preset)
    with pytest.raises(ValueError) as error:
        sampling.TDMScheduler.execute(twin.comfy, preset, 4, 0.0, "preset", "", 800)
    message = str(error.value)
    if preset not in sampling.preset_choices():
        # a ComfyUI without native CogVideoX does not offer the preset: refused as not one of the options
        assert repr(preset) in message and "auto" in message
        return
    assert repr(preset) in message and recipe.display_name in message
    for word in model_words:
        assert word in message
    with pytest.raises(ValueError, match=preset):
        sampling.TDMKSampler.execute(twin.comfy, twins.tiny_conditioning(twin.family, PROMPT),
                                     {"samples": empty_latent(twin.family)}, preset, 4, SEED)
