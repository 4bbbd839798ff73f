"""SDXL and Flux-dev on twin tiny models: ComfyUI against diffusers' own pipelines, the distilled LoRA in both, and
the early refusals.

- Sampling parity: ComfyUI's SamplerCustom with TDM Scheduler + a sampler, on the ComfyUI twin, against diffusers'
  `StableDiffusionXLPipeline` / `FluxPipeline` on the diffusers twin (identical weights, identical initial noise,
  prompt embeddings handed to both): the teacher's own recipe (SDXL: DPM-Solver++(2M) with CFG and a negative prompt;
  Flux-dev: Euler at guidance 3.5, ComfyUI's own `euler`) and the new 4-step presets.
- One distillation iteration through the ComfyUI backend (the TDM Distill node's path, ComfyUI's `extra_conds` for
  SDXL's ADM vector and Flux's guidance); the exported student LoRA applies in ComfyUI with zero unmatched keys, and,
  renamed to kohya names (the same tensors), through diffusers' `load_lora_weights` gives the same outputs.
"""

from __future__ import annotations

import logging
import sys

import comfy.model_management
import comfy.sample
import comfy.samplers
import numpy as np
import pytest
import torch
from comfy_extras.nodes_custom_sampler import SamplerCustom

from tdm_core import schedules
from tdm_devkit import twins_xl_flux as xf

PROMPT = "a lighthouse at dusk"
SEED = 42
# fp32 rounding relative to max |latent| (the existing SD1.5/SD3 parity tolerances).
SDXL_RTOL = 2e-6
# With CFG 5 the guided prediction is 5·cond − 4·uncond: rounding of both passes adds up (measured 2.1e-6 at 8 steps).
SDXL_CFG_RTOL = 5e-6
FLUX_RTOL = 5e-6
SDXL_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                             beta_schedule="scaled_linear", prediction_type="epsilon", timestep_spacing="linspace",
                             final_sigmas_type="zero")
FLUX_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                             max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
                             time_shift_type="exponential")


@pytest.fixture(scope="module")
def sampling(pack):
    return pack.nodes.sampling


@pytest.fixture(scope="module")
def sdxl_twin():
    return xf.sdxl_twin(seed=0)


@pytest.fixture(scope="module")
def flux_twin():
    return xf.flux_twin(seed=0)


def comfy_sample(sampling, model, family, latent, preset, steps, sampler, cfg=1.0, negative=None, guidance=None):
    sigmas = sampling.TDMScheduler.execute(model, preset, steps, 0.0, "preset", "",
                                           schedules.TRAINING_DEMO_TOTAL_STEPS).result[0]
    positive = xf.tiny_conditioning(family, PROMPT, guidance=guidance)
    negative = xf.tiny_conditioning(family, "", guidance=guidance) if negative is None else negative
    out = SamplerCustom.execute(model, True, SEED, cfg, positive, negative, sampler, sigmas,
                                {"samples": latent}).result[0]
    return model.model.process_latent_in(out["samples"]), sigmas


def model_sampling_flux(model, width, height):
    """ComfyUI's ModelSamplingFlux node (V1 `patch` in 0.3.75, V3 `execute` upstream), max 1.15, base 0.5."""
    from comfy_extras.nodes_model_advanced import ModelSamplingFlux

    if hasattr(ModelSamplingFlux, "execute"):
        return ModelSamplingFlux.execute(model, 1.15, 0.5, width, height).result[0]
    return ModelSamplingFlux().patch(model, 1.15, 0.5, width, height)[0]


def tdm_sampler(sampling, solver="auto", model_timesteps="integer"):
    return sampling.TDMSampler.execute(solver, 0.0, model_timesteps, "unit").result[0]


# --- SDXL ----------------------------------------------------------------------------------------------------------


def sdxl_pipeline(twin, scheduler):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=twin.diffusers, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=False)


def diffusers_sdxl(twin, noise, steps, solver_order, cfg=1.0):
    """StableDiffusionXLPipeline (size: the latent's × 8, ComfyUI's default width/height for the ADM vector) with prompt
    embeddings; DPM-Solver++ with the SD1.5/SDXL DDPM config, `linspace` spacing (999, 749, 500, 250 at 4 steps)."""
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(**SDXL_SCHEDULER_CONFIG, algorithm_type="dpmsolver++",
                                            solver_order=solver_order)
    context, pooled = xf.tiny_text_embedding("sdxl", PROMPT)
    negative, negative_pooled = xf.tiny_text_embedding("sdxl", "")
    pipe = sdxl_pipeline(twin, scheduler)
    with torch.no_grad():
        return pipe(prompt_embeds=context, pooled_prompt_embeds=pooled, negative_prompt_embeds=negative,
                    negative_pooled_prompt_embeds=negative_pooled, guidance_scale=cfg, num_inference_steps=steps,
                    num_images_per_prompt=noise.shape[0],
                    height=noise.shape[-2] * 8, width=noise.shape[-1] * 8, latents=noise.clone(),
                    output_type="latent").images


def test_sdxl_twins_are_the_same_network(sdxl_twin):
    """Raw outputs with ComfyUI's ADM vector vs diffusers' text_time embedding (size 128, no crop)."""
    model = sdxl_twin.comfy.model
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 16, 16, generator=g)
    context, pooled = xf.tiny_text_embedding("sdxl", PROMPT)
    context, pooled = context.repeat(2, 1, 1), pooled.repeat(2, 1)
    y = model.encode_adm(pooled_output=pooled, width=128, height=128)
    time_ids = torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]]).repeat(2, 1)
    with torch.no_grad():
        ours = model.diffusion_model(x, torch.tensor([999.0, 250.0]), context=context, y=y)
        reference = sdxl_twin.diffusers(x, torch.tensor([999, 250]), encoder_hidden_states=context,
                                        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    torch.testing.assert_close(ours, reference, rtol=0, atol=5e-6 * reference.abs().max().item())


def test_sdxl_teacher_with_cfg_equals_the_diffusers_pipeline(sampling, sdxl_twin):
    """The teacher's own kind of recipe: ComfyUI's dpmpp_2m at CFG 5 with a negative prompt, 6 steps on the linspace
    grid, against StableDiffusionXLPipeline with DPM-Solver++(2M) — conditioning (ADM vector for ComfyUI's default
    size, the latent's × 8) and CFG included."""
    latent = torch.zeros(1, 4, 8, 8)
    sigmas = sampling.TDMScheduler.execute(sdxl_twin.comfy, "sdxl", 6, 0.0, "preset", "",
                                           schedules.TRAINING_DEMO_TOTAL_STEPS).result[0]
    positive, negative = xf.tiny_conditioning("sdxl", PROMPT), xf.tiny_conditioning("sdxl", "")
    out = SamplerCustom.execute(sdxl_twin.comfy, True, SEED, 5.0, positive, negative,
                                comfy.samplers.sampler_object("dpmpp_2m"), sigmas, {"samples": latent}).result[0]
    ours = sdxl_twin.comfy.model.process_latent_in(out["samples"])
    reference = diffusers_sdxl(sdxl_twin, comfy.sample.prepare_noise(latent, SEED), 6, solver_order=2, cfg=5.0)
    assert reference.abs().max() > 0.5
    torch.testing.assert_close(ours, reference, rtol=0, atol=SDXL_CFG_RTOL * reference.abs().max().item())


def test_sdxl_preset_equals_ddim_in_the_diffusers_pipeline(sampling, sdxl_twin):
    """Preset sdxl (999, 749, 500, 250, DDIM) = the pipeline's DPM-Solver++ at order 1, which is DDIM (η = 0)."""
    latent = torch.zeros(2, 4, 8, 8)
    ours, sigmas = comfy_sample(sampling, sdxl_twin.comfy, "sdxl", latent, "sdxl", 4, tdm_sampler(sampling))
    assert [int(sdxl_twin.comfy.get_model_object("model_sampling").timestep(s)) for s in sigmas[:-1]] == [
        999, 749, 500, 250]
    reference = diffusers_sdxl(sdxl_twin, comfy.sample.prepare_noise(latent, SEED), 4, solver_order=1)
    torch.testing.assert_close(ours, reference, rtol=0, atol=SDXL_RTOL * reference.abs().max().item())


# --- Flux ----------------------------------------------------------------------------------------------------------


def diffusers_flux(twin, noise, steps, guidance):
    """FluxPipeline (Euler, dynamic shift from the image token count) with prompt embeddings; 128 px = 16² latent."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG), vae=None,
                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                        transformer=twin.diffusers)
    context, pooled = xf.tiny_text_embedding("flux", PROMPT)
    batch, channels, height, width = noise.shape
    packed = FluxPipeline._pack_latents(noise.clone(), batch, channels, height, width)
    with torch.no_grad():
        out = pipe(prompt_embeds=context.repeat(batch, 1, 1), pooled_prompt_embeds=pooled.repeat(batch, 1),
                   guidance_scale=guidance, num_inference_steps=steps, height=height * 8, width=width * 8,
                   latents=packed, output_type="latent").images
    return FluxPipeline._unpack_latents(out, height * 8, width * 8, 8)


def _diffusers_flux(transformer, x, context, pooled, sigma=0.7, guidance=3.5):
    """diffusers' Flux transformer on a ComfyUI-layout latent x [1, 16, H, W]: packed into 2×2 patches, with the
    pipeline's text and image ids, and unpacked back."""
    from diffusers import FluxPipeline

    _, channels, height, width = x.shape
    out = transformer(hidden_states=FluxPipeline._pack_latents(x, 1, channels, height, width),
                      timestep=torch.tensor([sigma]), guidance=torch.tensor([guidance]), pooled_projections=pooled,
                      encoder_hidden_states=context, txt_ids=torch.zeros(context.shape[1], 3),
                      img_ids=FluxPipeline._prepare_latent_image_ids(1, height // 2, width // 2, "cpu", torch.float32),
                      return_dict=False)[0]
    return FluxPipeline._unpack_latents(out, height * 8, width * 8, 8)


def test_flux_twins_are_the_same_network(flux_twin):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 16, 16, 16, generator=g)
    context, pooled = xf.tiny_text_embedding("flux", PROMPT)
    with torch.no_grad():
        ours = flux_twin.comfy.model.diffusion_model(x, torch.tensor([0.7]), context=context, y=pooled,
                                                     guidance=torch.tensor([3.5]))
        reference = _diffusers_flux(flux_twin.diffusers, x, context, pooled)
    torch.testing.assert_close(ours, reference, rtol=0, atol=2e-6 * reference.abs().max().item())


def test_flux_grid_follows_the_shift_for_the_latent_size():
    """diffusers' calculate_shift + dynamic shifting, and ComfyUI's ModelSamplingFlux node, at several sizes."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    twin = xf.flux_twin(seed=1)
    for height, width in [(16, 16), (64, 64), (128, 128), (96, 160)]:
        mu = schedules.flux_mu(height, width)
        assert mu == pytest.approx(calculate_shift((height // 2) * (width // 2), 256, 4096, 0.5, 1.15), abs=1e-12)
        patched = model_sampling_flux(twin.comfy, width * 8, height * 8)
        assert patched.get_model_object("model_sampling").shift == pytest.approx(mu, abs=1e-12)
        scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4), mu=mu)
        grid = schedules.flux_shift_grid(4, mu)
        np.testing.assert_allclose(grid.sigmas, scheduler.sigmas.double().numpy(), rtol=0, atol=1e-6)
    assert schedules.flux_shift_grid(4, schedules.flux_mu(128, 128)).timesteps == (999, 904, 759, 512)


def test_flux_teacher_and_preset_equal_the_diffusers_pipeline(sampling, flux_twin, steps=4):
    """Flux-dev's own recipe (one pass per step, guidance 3.5 from the conditioning, Euler) with ComfyUI's own
    `euler` sampler, and TDM's DDIM step, both on the `flux` preset's grid for this latent size (the
    MODEL's ModelSamplingFlux shift is applied through the grid, not the model), against FluxPipeline."""
    latent = torch.zeros(1, 16, 16, 16)
    reference = diffusers_flux(flux_twin, comfy.sample.prepare_noise(latent, SEED), steps, guidance=3.5)
    assert reference.abs().max() > 0.5
    tolerance = FLUX_RTOL * reference.abs().max().item()
    model = flux_twin.comfy
    # TDM Scheduler has no latent: ModelSamplingFlux tells it the size, as in a Flux workflow.
    model = model_sampling_flux(model, 128, 128)
    core, _ = comfy_sample(sampling, model, "flux", latent, "flux", steps, comfy.samplers.sampler_object("euler"),
                           guidance=3.5)
    torch.testing.assert_close(core, reference, rtol=0, atol=tolerance)
    # TDM's DDIM step is Flux's Euler step (the step the student is trained with; the `flux` preset samples it with
    # the flow DPM-Solver++(2M), whose arithmetic the SD3 parity tests hold to diffusers)
    ours, _ = comfy_sample(sampling, model, "flux", latent, "flux", steps, tdm_sampler(sampling, "ddim"), guidance=3.5)
    torch.testing.assert_close(ours, reference, rtol=0, atol=tolerance)


def test_tdm_ksampler_flux_grid_comes_from_the_latent(sampling, flux_twin):
    """TDM KSampler knows the latent, so it needs no ModelSamplingFlux: 96×160 latent → μ of 48×80 tokens."""
    latent = torch.zeros(1, 16, 24, 40)
    sigmas = sampling.tdm_sigmas(flux_twin.comfy, "flux", 4, latent_size=(24, 40))
    expected = schedules.flux_shift_grid(4, schedules.flux_mu(24, 40)).sigmas
    np.testing.assert_allclose(sigmas.double().numpy(), expected, rtol=0, atol=1e-7)
    out = sampling.TDMKSampler.execute(flux_twin.comfy, xf.tiny_conditioning("flux", PROMPT, guidance=3.5),
                                       {"samples": latent}, "flux", 4, SEED).result[0]
    assert out["samples"].shape == latent.shape and torch.isfinite(out["samples"]).all()


def test_presets_refuse_the_other_family(sampling, flux_twin, sdxl_twin, sd3_twin):
    # Each refusal names the preset that fits, and `auto`, which would have picked it.
    with pytest.raises(ValueError, match=r"'sd3'.*does not fit.*flux; use preset 'auto' \(it picks 'flux'"):
        sampling.tdm_sigmas(flux_twin.comfy, "sd3", 4)
    with pytest.raises(ValueError, match=r"'flux'.*does not fit.*use preset 'auto' \(it picks 'sd3' for this MODEL\)"):
        sampling.tdm_sigmas(sd3_twin.comfy, "flux", 4)
    assert len(sampling.tdm_sigmas(sdxl_twin.comfy, "sdxl", 4)) == 5


# --- distillation --------------------------------------------------------------------------------------------------


def _test_pack():
    import importlib.util
    from pathlib import Path

    if "tdm_test_pack" in sys.modules:
        return sys.modules["tdm_test_pack"]
    path = Path(__file__).resolve().parent / "comfy_test_pack" / "__init__.py"
    spec = importlib.util.spec_from_file_location("tdm_test_pack", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["tdm_test_pack"] = module
    spec.loader.exec_module(module)
    return module


SETTINGS = dict(unconditional_prompt="", steps=4, grid="auto", iterations=1, lora_rank=4, lora_alpha=0.0,
                learning_rate=1e-3, batch_size=1, width=64, height=64, save_every=1, keep_last=1, preview_every=1,
                seed=0, gradient_checkpointing=False, dtype="auto", offload="train_on_cpu")


def _one_iteration(pack, twin, family, cfg):
    from tdm_core.distill import TDMTrainer

    distill_jobs = sys.modules[f"{pack.__name__}.nodes.distill_jobs"]
    clip = _test_pack().TinyCLIP(family)
    with torch.inference_mode(False):
        runtime, _, grid = distill_jobs.build_runtime(twin.comfy, clip, dict(SETTINGS, cfg=cfg), ["a cat", "a dog"])
        trainer = TDMTrainer(runtime.backend, runtime.config)
        before = runtime.backend.adapter_state_dict("student")
        metrics = trainer.step()
        after = runtime.backend.adapter_state_dict("student")
    assert any(not torch.equal(before[k], after[k]) for k in before), "the student did not change"
    assert np.isfinite([metrics["loss_fake"], metrics["loss_gen"]]).all()
    return trainer, runtime, grid


def _comfy_load(twin, lora_sd, caplog):
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(twin.comfy.model, {})
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        patches = comfy.lora.load_lora(lora_sd, key_map)
    assert [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()] == []
    return patches


def _kohya_names(lora_sd: dict) -> dict:
    """The same tensors under kohya names (`lora_unet_<ComfyUI module path with _>`), which diffusers' SDXL and Flux
    LoRA loaders convert to their own modules."""
    out = {}
    for key, value in lora_sd.items():
        module, _, suffix = key.removeprefix("diffusion_model.").partition(".lora_")
        if not suffix:
            module, _, suffix = key.removeprefix("diffusion_model.").rpartition(".")
            out[f"lora_unet_{module.replace('.', '_')}.{suffix}"] = value
            continue
        out[f"lora_unet_{module.replace('.', '_')}.lora_{suffix}"] = value
    return out


def _patched_comfy_output(twin, patches, call):
    clone = twin.comfy.clone()
    assert len(clone.add_patches(patches, 1.0)) == len(patches)
    comfy.model_management.load_models_gpu([clone], force_full_load=True)
    try:
        with torch.no_grad():
            return call(clone.model.diffusion_model)
    finally:
        comfy.model_management.unload_all_models()


def _export(trainer, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from tdm_core.distill import checkpoint

    path = checkpoint.export_student_lora(trainer, tmp_path / "student.safetensors")
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    return path, load_file(str(path)), metadata


def test_sdxl_distillation_step_and_student_lora_in_comfyui_and_diffusers(pack, sdxl_twin, tmp_path, caplog):
    trainer, runtime, grid = _one_iteration(pack, sdxl_twin, "sdxl", cfg=2.0)
    assert grid.preset == "sdxl" and grid.timesteps == [999, 749, 500, 250]
    # The ADM vector the trainer feeds is ComfyUI's own for a 64×64 image (size embeddings of 64, no crop).
    context, pooled = xf.tiny_text_embedding("sdxl", "a cat")
    expected_y = sdxl_twin.comfy.model.encode_adm(pooled_output=pooled, width=64, height=64)
    torch.testing.assert_close(runtime.backend.encode(["a cat"])["y"], expected_y, rtol=0, atol=0)
    _, lora_sd, metadata = _export(trainer, tmp_path)
    assert metadata["tdm.family"] == "sdxl" and metadata["tdm.preset"] == "sdxl"
    patches = _comfy_load(sdxl_twin, lora_sd, caplog)
    assert len(patches) == len([k for k in lora_sd if k.endswith(".alpha")])

    from diffusers import DPMSolverMultistepScheduler

    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 4, 8, 8, generator=g)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    ours = _patched_comfy_output(sdxl_twin, patches, lambda net: net(x, torch.tensor([500.0]), context=context,
                                                                     y=expected_y))
    pipe = sdxl_pipeline(sdxl_twin, DPMSolverMultistepScheduler(**SDXL_SCHEDULER_CONFIG))
    pipe.load_lora_weights(_kohya_names(lora_sd), adapter_name="tdm")
    try:
        with torch.no_grad():
            reference = pipe.unet(x, torch.tensor([500]), encoder_hidden_states=context,
                                  added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
            pipe.disable_lora()
            base = pipe.unet(x, torch.tensor([500]), encoder_hidden_states=context,
                             added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    finally:
        pipe.unload_lora_weights()
    assert (reference - base).abs().max() > 1e-4, "the student LoRA changes nothing: the comparison would be empty"
    torch.testing.assert_close(ours, reference, rtol=0, atol=2e-5 * reference.abs().max().item())


def test_flux_distillation_step_and_student_lora_in_comfyui_and_diffusers(pack, flux_twin, tmp_path, caplog):
    trainer, runtime, grid = _one_iteration(pack, flux_twin, "flux", cfg=1.0)
    mu = schedules.flux_mu(8, 8)
    assert grid.preset == "flux"
    trained_sigmas = [float(runtime.backend.schedule.sigmas[t]) for t in grid.timesteps]
    assert trained_sigmas == pytest.approx(list(schedules.flux_shift_grid(4, mu).sigmas[:-1]), abs=1e-12)
    # The network is fed σ itself, and the conditioning's guidance (ComfyUI's default 3.5 without FluxGuidance).
    assert float(runtime.backend.schedule.model_timesteps[grid.timesteps[1]]) == pytest.approx(trained_sigmas[1])
    cond = runtime.backend.encode(["a cat"])
    assert cond["guidance"].tolist() == [3.5]
    context, pooled = xf.tiny_text_embedding("flux", "a cat")
    torch.testing.assert_close(cond["y"], pooled, rtol=0, atol=0)
    _, lora_sd, metadata = _export(trainer, tmp_path)
    assert metadata["tdm.family"] == "flux" and metadata["tdm.preset"] == "flux"
    patches = _comfy_load(flux_twin, lora_sd, caplog)
    assert len(patches) == len([k for k in lora_sd if k.endswith(".alpha")])
    # diffusers' kohya→Flux conversion hard-codes FLUX.1's widths for the single blocks' fused linear1
    # (3 × 3072 + 12288), which the tiny twin does not have: that one module is compared through ComfyUI only
    # (zero unmatched keys above); every other module goes through diffusers' load_lora_weights.
    subset = {k: v for k, v in lora_sd.items() if ".linear1." not in k}
    assert len(subset) < len(lora_sd) and any(".linear2." in k for k in subset)
    lora_sd = subset
    patches = _comfy_load(flux_twin, lora_sd, caplog)

    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, 16, 8, 8, generator=g)
    ours = _patched_comfy_output(flux_twin, patches, lambda net: net(x, torch.tensor([0.7]), context=context,
                                                                     y=pooled, guidance=torch.tensor([3.5])))
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG), vae=None,
                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                        transformer=flux_twin.diffusers)
    pipe.load_lora_weights(_kohya_names(lora_sd), adapter_name="tdm")

    def run():
        return _diffusers_flux(pipe.transformer, x, context, pooled)

    try:
        with torch.no_grad():
            reference = run()
            pipe.disable_lora()
            base = run()
    finally:
        pipe.unload_lora_weights()
    assert (reference - base).abs().max() > 1e-4, "the student LoRA changes nothing: the comparison would be empty"
    torch.testing.assert_close(ours, reference, rtol=0, atol=2e-5 * reference.abs().max().item())


def test_unsupported_families_fail_early_naming_the_supported_list(pack, flux_twin):
    distill_jobs = sys.modules[f"{pack.__name__}.nodes.distill_jobs"]
    clip = _test_pack().TinyCLIP("flux")
    with pytest.raises(ValueError, match="Flux-dev is guidance-distilled.*Set cfg to 1"):
        distill_jobs.build_runtime(flux_twin.comfy, clip, dict(SETTINGS, cfg=2.0), ["a cat"])
    # An SD2 UNet (ComfyUI's SD20 config class, tiny width): refused before any copy or encode.
    import comfy.supported_models

    from tdm_devkit import twins

    config = comfy.supported_models.SD20(dict(twins.SD15_TINY_UNET_CONFIG))
    config.set_inference_dtype(torch.float32, None)
    sd2 = twins._patcher(config.get_model({}))
    with pytest.raises(ValueError, match=r"family 'unet' \(SD20\); supported families: sd15.*sdxl.*flux"):
        distill_jobs.build_runtime(sd2, clip, dict(SETTINGS, cfg=2.0), ["a cat"])


def test_a_cached_flux_toy_teacher_loads_on_either_comfyui(tmp_path, monkeypatch):
    """The quality check's trained teachers are cached per machine and shared by the runs on 0.3.75 and on upstream
    ComfyUI, which name Flux's q/k RMSNorm gains differently (`scale`, `weight`). A teacher trained here is written
    under the released checkpoints' names and loads back through ComfyUI's own renaming; CI once loaded a cached
    0.3.75 teacher into upstream's Flux and failed on exactly these keys."""
    from dataclasses import replace

    from tdm_devkit import toy_latent_teacher as toy

    monkeypatch.setenv("TDM_TOY_CACHE", str(tmp_path))
    config = replace(toy.TeacherConfig.for_family("flux"), train_steps=2)
    path = toy.teacher_file(config, log=lambda message: None)
    from safetensors.torch import load_file

    stored = load_file(str(path))
    norm_keys = sorted(k for k in stored if "_norm." in k)
    assert norm_keys and all(k.endswith("_norm.scale") for k in norm_keys), norm_keys
    assert all(float(stored[k].min()) != 0.0 for k in norm_keys)  # trained from unit gains, not zeroed or left out

    network = toy.teacher_model("flux", path).model.diffusion_model
    loaded = network.state_dict()
    assert len(loaded) == len(stored)
    for key, tensor in stored.items():
        runtime_key = key if key in loaded else key[:-len("scale")] + "weight"
        torch.testing.assert_close(loaded[runtime_key], tensor, rtol=0, atol=0)
