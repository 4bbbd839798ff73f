"""preset "auto" and `denoise` (img2img) of TDM KSampler / TDM Scheduler on the tiny twins.

img2img is checked against diffusers' own img2img logic: the pipeline class's `get_timesteps` (called unbound on a
holder of the recipe's scheduler, so its rounding is diffusers' code, not a copy), the scheduler's `add_noise` for the
start state, then the recipe's scheduler steps from that index. The TDM recipes are diffusers pipelines; this is
what their img2img variants do with the same scheduler.
"""

from __future__ import annotations

from types import SimpleNamespace

import comfy.sample
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import StableDiffusionImg2ImgPipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_img2img import (
    StableDiffusion3Img2ImgPipeline,
)
from test_sampler_parity import PROMPT, SD3_RTOL, SD15_RTOL, SEED, empty_latent
from test_schedules import SD15_SCHEDULER_CONFIG

from tdm_core import presets
from tdm_devkit import twins


@pytest.fixture(scope="module")
def sampling(pack):
    return pack.nodes.sampling


def _init_latent(family: str) -> torch.Tensor:
    """A non-empty latent in ComfyUI's stored space (what VAE Encode gives), fixed by a seed."""
    generator = torch.Generator().manual_seed(3)
    return torch.randn(1, twins.FAMILY_LATENT_CHANNELS[family], 16, 16, generator=generator)


def _ksampler(sampling, twin, preset, latent, denoise, steps=4):
    cond = twins.tiny_conditioning(twin.family, PROMPT)
    out = sampling.TDMKSampler.execute(twin.comfy, cond, {"samples": latent}, preset, steps, SEED, denoise)
    return out.result[0]["samples"], out.ui.as_dict()["text"][0]


def _diffusers_img2img(pipeline_class, scheduler, steps, denoise, init, noise, denoise_fn):
    """diffusers' img2img loop: get_timesteps (the pipeline's own method), add_noise, steps from begin_index."""
    scheduler.set_timesteps(steps)
    timesteps, run = pipeline_class.get_timesteps(SimpleNamespace(scheduler=scheduler), steps, denoise, "cpu")
    x = scheduler.add_noise(init, noise, timesteps[:1])
    with torch.no_grad():
        for t in timesteps:
            x = scheduler.step(denoise_fn(scheduler, x, t), t, x).prev_sample
    return x, run


def _sd3_reference(twin, steps, denoise, init, noise):
    context, pooled = twins.tiny_text_embedding("sd3", PROMPT)
    scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=6.0,
                                            algorithm_type="dpmsolver++", solver_order=2)

    def velocity(_scheduler, x, t):
        return twin.diffusers(hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=context,
                              pooled_projections=pooled).sample

    return _diffusers_img2img(StableDiffusion3Img2ImgPipeline, scheduler, steps, denoise, init, noise, velocity)


def _sd15_reference(twin, steps, denoise, init, noise):
    context, _ = twins.tiny_text_embedding("sd15", PROMPT)
    scheduler = DPMSolverMultistepScheduler.from_config(SD15_SCHEDULER_CONFIG, algorithm_type="dpmsolver++",
                                                        solver_order=2)

    def eps(sched, x, t):
        return twin.diffusers(sched.scale_model_input(x, t), t, encoder_hidden_states=context).sample

    return _diffusers_img2img(StableDiffusionImg2ImgPipeline, scheduler, steps, denoise, init, noise, eps)


@pytest.mark.parametrize("denoise", [0.5, 0.6])
def test_sd3_denoise_equals_diffusers_img2img(sampling, sd3_twin, denoise):
    latent = _init_latent("sd3")
    ours, report = _ksampler(sampling, sd3_twin, "sd3", latent, denoise)
    noise = comfy.sample.prepare_noise(latent, SEED)
    init = sd3_twin.comfy.model.process_latent_in(latent)
    reference, run = _sd3_reference(sd3_twin, 4, denoise, init, noise)
    assert f"{run} of 4 steps" in report  # 0.6 → 3 steps: SD3's pipeline rounds up
    ours = sd3_twin.comfy.model.process_latent_in(ours)
    assert (ours - init).abs().max() > 0.05  # the pass changed the latent
    torch.testing.assert_close(ours, reference, rtol=0, atol=SD3_RTOL * reference.abs().max().item())


@pytest.mark.parametrize("denoise", [0.6])
def test_sd15_denoise_equals_diffusers_img2img(sampling, sd15_twin, denoise):
    latent = _init_latent("sd15")
    ours, report = _ksampler(sampling, sd15_twin, "dreamshaper", latent, denoise)
    noise = comfy.sample.prepare_noise(latent, SEED)
    init = sd15_twin.comfy.model.process_latent_in(latent)
    reference, run = _sd15_reference(sd15_twin, 4, denoise, init, noise)
    assert f"{run} of 4 steps" in report  # 0.6 → 2 steps: SD1.5's pipeline rounds down
    ours = sd15_twin.comfy.model.process_latent_in(ours)
    torch.testing.assert_close(ours, reference, rtol=0, atol=SD15_RTOL * reference.abs().max().item())


def test_denoise_keeps_the_trained_timesteps_unlike_basicscheduler(sampling, sd15_twin):
    """The tail of the preset's own grid, where BasicScheduler's denoise would stretch the schedule."""
    full = sampling.TDMScheduler.execute(sd15_twin.comfy, "dreamshaper", 4, 0.0, "preset", "", 800).result[0]
    tail = sampling.TDMScheduler.execute(sd15_twin.comfy, "dreamshaper", 4, 0.0, "preset", "", 800, 0.5).result[0]
    torch.testing.assert_close(tail, full[2:], rtol=0, atol=0)
    nothing = sampling.TDMScheduler.execute(sd15_twin.comfy, "dreamshaper", 4, 0.0, "preset", "", 800, 0.1).result[0]
    assert nothing.tolist() == [0.0]
    latent = _init_latent("sd15")
    unchanged, report = _ksampler(sampling, sd15_twin, "dreamshaper", latent, 0.1)
    assert "0 of 4 steps" in report
    torch.testing.assert_close(unchanged, latent, rtol=0, atol=0)


@pytest.mark.parametrize("twin_name,expected", [("sd3_twin", "sd3"), ("sd35_twin", "sd35"), ("sd15_twin", "dreamshaper")])
def test_preset_auto_picks_the_models_preset_and_names_it(sampling, request, twin_name, expected):
    twin = request.getfixturevalue(twin_name)
    latent = empty_latent(twin.family)
    auto, report = _ksampler(sampling, twin, "auto", latent, 1.0)
    named, _ = _ksampler(sampling, twin, expected, latent, 1.0)
    torch.testing.assert_close(auto, named, rtol=0, atol=0)
    assert f"preset {expected} ({presets.get_preset(expected).display_name}), picked from the MODEL" in report
    sigmas_auto = sampling.TDMScheduler.execute(twin.comfy, "auto", 4, 6.0, "preset", "", 800)
    sigmas_named = sampling.TDMScheduler.execute(twin.comfy, expected, 4, 6.0, "preset", "", 800)
    torch.testing.assert_close(sigmas_auto.result[0], sigmas_named.result[0], rtol=0, atol=0)
    assert f"preset {expected} " in sigmas_auto.ui.as_dict()["text"][0]


def test_scheduler_shift_is_a_value_and_a_saved_zero_still_means_the_presets(sampling, sd3_twin):
    """The widget shows 6 (the recipe); workflows saved before it did hold 0, which keeps meaning the preset's."""
    schema = sampling.TDMScheduler.define_schema()
    shift = next(i for i in schema.inputs if i.id == "shift")
    assert shift.default == presets.get_preset("sd3").shift
    run = [sampling.TDMScheduler.execute(sd3_twin.comfy, "sd3", 4, value, "preset", "", 800).result[0]
           for value in (0.0, 6.0, 3.0)]
    torch.testing.assert_close(run[0], run[1], rtol=0, atol=0)
    assert (run[2] - run[1]).abs().max() > 0.01
