"""TDM on newer ComfyUI's native CogVideoX (upstream 2026; absent from 0.3.75, where these tests skip).

A tiny native CogVideoX-2B and diffusers' `CogVideoXTransformer3DModel` share weights (`tdm_devkit.cogvideox_native`):
the TDM LoRA Loader maps every key of a released-format (peft, diffusers names) LoRA onto the native modules, and the
TDM graph on the native model reproduces diffusers — its own pipeline on the trailing grid, the DDIM formula on the
2B scheduler's ᾱ at the trained timesteps — with the same LoRA and the same noise.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

from tdm_core import cogvideox, schedules
from tdm_core.lora import LoraMismatchError
from tdm_devkit import cogvideox_native, cogvideox_tiny, lora_files

pytestmark = pytest.mark.skipif(not cogvideox_native.has_native_cogvideox(), reason=cogvideox_native.SKIP_REASON)

GEOMETRY = cogvideox_tiny.tiny_frame_geometry()
COMFY_LATENT = (1, cogvideox_tiny.LATENT_CHANNELS, GEOMETRY.latent_frames, GEOMETRY.latent_height,
                GEOMETRY.latent_width)
SEED = 5
# fp32 twins: the two attention implementations and fused reshapes differ at the 1e-7 level per layer.
PARITY_RTOL = 1e-5


@pytest.fixture(scope="module")
def twin():
    transformer = cogvideox_native.build_diffusers_transformer(seed=0)
    model = cogvideox_native.load_native(cogvideox_native.native_state_dict(transformer))
    return transformer, model


@pytest.fixture(scope="module")
def lora_file(twin, tmp_path_factory):
    """A LoRA in the released TDM_CogVideoX-2B format: peft keys `transformer.transformer_blocks.N.attn1.to_q
    .lora_A.weight` on every Linear of the blocks."""
    transformer, _ = twin
    synthetic = lora_files.synthesise(transformer, "cogvideox", rank=4, seed=11)
    path = lora_files.write_peft(synthetic, tmp_path_factory.mktemp("loras") / "tdm_cogvideox_2b.safetensors",
                                 prefix="transformer")
    return synthetic, path


@pytest.fixture(scope="module")
def modules(pack):
    # the LoRA path both TDM LoRA nodes use, and the sampler nodes
    return (sys.modules[f"{pack.__name__}.nodes.lora_patching"], sys.modules[f"{pack.__name__}.nodes.sampling"])


def _relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.double() - reference.double()).abs().max() / reference.double().abs().max())


def _comfy_to_diffusers(latent: torch.Tensor) -> torch.Tensor:
    """ComfyUI's output latent [B, C, T, H, W] is x / scale_factor; diffusers' is x in [B, F, C, H, W]."""
    return (latent * cogvideox_tiny.VAE_SCALING_FACTOR).permute(0, 2, 1, 3, 4)


def _noise():
    import comfy.sample

    return comfy.sample.prepare_noise(torch.zeros(COMFY_LATENT), SEED)


def test_native_model_is_recognised_as_cogvideox_2b(twin, pack, tmp_path):
    import comfy.model_base

    _, model = twin
    # how the nodes read a MODEL (family, parametrisation) and pick the sampler function's state space and solver
    adapters = sys.modules[f"{pack.__name__}.nodes.family_adapters"]
    sampler = sys.modules[f"{pack.__name__}.nodes.sampler_function"]
    assert isinstance(model.model, comfy.model_base.CogVideoX)
    assert adapters.model_family(model) == "cogvideox"
    # and a file through UNETLoader's code path: detected as the 2B (sin-cos table stored), so TDM accepts it
    from_file = cogvideox_native.load_native_file(cogvideox_native.save_native_file(tmp_path / "tiny_2b.safetensors"))
    assert adapters.model_family(from_file) == "cogvideox"
    model_sampling = model.get_model_object("model_sampling")
    assert adapters.model_parametrisation(model_sampling) == "v"
    assert sampler.state_space(model_sampling) == "vp"
    assert sampler.resolve_solver("auto", model_sampling) == "ddim"  # was a KeyError before native support


def test_twin_raw_outputs_agree(twin):
    """The same weights in both layouts give the same velocity (the native network gets the raw VP state)."""
    transformer, model = twin
    x = _noise()
    context = cogvideox_native.text_embedding()
    with torch.no_grad():
        native = model.model.diffusion_model(x, torch.tensor([856.0]), context)
        reference = transformer(hidden_states=x.permute(0, 2, 1, 3, 4), encoder_hidden_states=context,
                                timestep=torch.tensor([856]), return_dict=False)[0]
    assert _relative_error(native.permute(0, 2, 1, 3, 4), reference) < PARITY_RTOL


def test_lora_loader_maps_every_released_key(twin, lora_file, modules):
    import comfy.model_management

    transformer, model = twin
    loader, _ = modules
    synthetic, path = lora_file
    application = loader.apply_tdm_lora(model, None, loader.load_lora_cached(str(path)))
    assert application.match.unmatched == {}
    assert len(application.match.matched) == len(synthetic.modules) > 0
    assert application.strength == 1.0  # the CogVideoX-2B preset's
    merged = synthetic.merged_state_dict(transformer.state_dict())
    comfy.model_management.load_models_gpu([application.model], force_full_load=True)
    try:
        patched = application.model.model.diffusion_model.state_dict()
        for name in synthetic.modules:
            native = cogvideox_native.native_key(f"{name}.weight")
            torch.testing.assert_close(patched[native], merged[f"{name}.weight"], rtol=1e-6, atol=1e-6)
    finally:
        comfy.model_management.unload_all_models()


def test_scheduler_uses_the_2b_schedule_not_the_native_table(twin, modules):
    """CogVideoX-2B was trained with SNR shift 3 (diffusers' 2B scheduler config); the native model's own table is
    the shift-1 schedule, whose σ at 856 would be 11.6 instead of 20.5."""
    _, model = twin
    _, sampling = modules
    sigmas = sampling.TDMScheduler.execute(model, "cogvideox", 4, 0.0, "preset", "", 800).result[0]
    assert sigmas.dtype == torch.float32 and math.isinf(sigmas[0]) and sigmas[-1] == 0
    table = cogvideox_tiny.build_tiny_scheduler().alphas_cumprod.double()
    expected = ((1 - table) / table).sqrt()[[856, 665, 399]]
    torch.testing.assert_close(sigmas[1:4].double(), expected, rtol=1e-6, atol=0)
    own = model.get_model_object("model_sampling").sigmas
    assert abs(float(own[856]) - 11.60) < 0.05 and abs(float(sigmas[1]) - 20.51) < 0.01


def test_tdm_ksampler_at_the_trained_timesteps_matches_diffusers(twin, lora_file, modules):
    """TDM KSampler (trained grid 999/856/665/399) on the native model + LoRA vs diffusers' transformer + the same
    LoRA as a peft adapter, stepped by the v-prediction DDIM formula on the 2B scheduler's ᾱ, same noise."""
    transformer, model = twin
    loader, sampling = modules
    _, path = lora_file
    patched = loader.apply_tdm_lora(model, None, loader.load_lora_cached(str(path))).model
    context = cogvideox_native.text_embedding()
    latent = {"samples": torch.zeros(COMFY_LATENT)}
    ours = sampling.TDMKSampler.execute(patched, [[context, {}]], latent, "cogvideox", 4, SEED).result[0]["samples"]

    pipe = cogvideox_native.diffusers_pipeline(transformer)
    cogvideox.attach_lora(pipe, path, 1.0)
    alphas = pipe.scheduler.alphas_cumprod.double()
    x = _noise().permute(0, 2, 1, 3, 4).double()
    timesteps = schedules.cogvideox_trained_timesteps()
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            v = pipe.transformer(hidden_states=x.float(), encoder_hidden_states=context, timestep=torch.tensor([t]),
                                 return_dict=False)[0].double()
            a_t = alphas[t]
            a_prev = alphas[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.tensor(1.0, dtype=torch.float64)
            x0 = a_t.sqrt() * x - (1 - a_t).sqrt() * v
            ratio = ((1 - a_prev) / (1 - a_t)).sqrt()
            x = ratio * x + (a_prev.sqrt() - a_t.sqrt() * ratio) * x0
    pipe.transformer.delete_adapters(cogvideox.TDM_ADAPTER_NAME)
    error = _relative_error(_comfy_to_diffusers(ours), x)
    print(f"native CogVideoX TDM KSampler vs diffusers, trained grid: max relative error {error:.2e}")
    assert error <= PARITY_RTOL


def test_tdm_sampler_and_scheduler_on_the_trailing_grid_match_cogvideox_pipeline(twin, lora_file, modules):
    """TDM Sampler + TDM Scheduler (grid trailing) in a SamplerCustom-style guider vs CogVideoXPipeline with
    CogVideoXDDIMScheduler (4 steps, guidance 1), same LoRA, same noise."""
    transformer, model = twin
    loader, sampling = modules
    _, path = lora_file
    patched = loader.apply_tdm_lora(model, None, loader.load_lora_cached(str(path))).model
    context = cogvideox_native.text_embedding()
    sigmas = sampling.TDMScheduler.execute(patched, "cogvideox", 4, 0.0, "trailing", "", 800).result[0]
    sampler = sampling.TDMSampler.execute("auto", 0.0, "integer", "unit").result[0]
    guider = sampling._PositiveOnlyGuider(patched)
    guider.set_conds([[context, {}]])
    ours = guider.sample(_noise(), torch.zeros(COMFY_LATENT), sampler, sigmas, seed=SEED)

    pipe = cogvideox_native.diffusers_pipeline(transformer)
    cogvideox.attach_lora(pipe, path, 1.0)
    reference = pipe(prompt_embeds=context, num_frames=GEOMETRY.num_frames, height=GEOMETRY.height,
                     width=GEOMETRY.width, num_inference_steps=4, guidance_scale=1.0,
                     latents=_noise().permute(0, 2, 1, 3, 4), output_type="latent").frames
    pipe.transformer.delete_adapters(cogvideox.TDM_ADAPTER_NAME)
    error = _relative_error(_comfy_to_diffusers(ours), reference)
    print(f"native CogVideoX TDM Sampler/Scheduler vs CogVideoXPipeline, trailing grid: max relative error {error:.2e}")
    assert error <= PARITY_RTOL


def test_sigmas_of_the_native_table_are_refused(twin, modules):
    """ComfyUI's own schedulers give the native model's shift-1 sigmas: other timesteps than the 2B's; TDM says so
    instead of sampling at the wrong noise levels."""
    _, model = twin
    _, sampling = modules
    own = model.get_model_object("model_sampling").sigmas
    sigmas = torch.cat([own[[999, 856, 665, 399]].float(), torch.zeros(1)])
    guider = sampling._PositiveOnlyGuider(model)
    guider.set_conds([[cogvideox_native.text_embedding(), {}]])
    sampler = sampling.TDMSampler.execute("auto", 0.0, "integer", "unit").result[0]
    with pytest.raises(ValueError, match=r"sigmas: .* not a sigma of CogVideoX-2B's schedule.*TDM Scheduler"):
        guider.sample(_noise(), torch.zeros(COMFY_LATENT), sampler, sigmas, seed=SEED)


def test_image_presets_and_other_cogvideox_models_are_refused(twin, modules):
    _, model = twin
    _, sampling = modules
    with pytest.raises(ValueError, match=r"preset 'sd3'.*does not fit.*CogVideoX.*use preset 'auto' \(it picks 'cogvideox' for this MODEL\)"):
        sampling.tdm_sigmas(model, "sd3", 4)
    # An image-to-video (32-channel) native CogVideoX: no TDM LoRA was released for it. (A fresh transformer: the
    # parity tests leave peft wrappers on the shared one.)
    state = cogvideox_native.native_state_dict(cogvideox_native.build_diffusers_transformer(seed=0))
    weight = state["patch_embed.proj.weight"]
    state["patch_embed.proj.weight"] = torch.cat([weight, weight], dim=1)
    other = cogvideox_native.load_native(state, in_channels=32)
    with pytest.raises(ValueError, match=r"CogVideoX-2B.*5B, 1.5 or image-to-video.*no TDM LoRA was released"):
        sampling.tdm_sigmas(other, "cogvideox", 4)


def test_lora_on_another_cogvideox_model_is_refused(lora_file, modules):
    loader, _ = modules
    _, path = lora_file
    state = cogvideox_native.native_state_dict(cogvideox_native.build_diffusers_transformer(seed=0))
    weight = state["patch_embed.proj.weight"]
    state["patch_embed.proj.weight"] = torch.cat([weight, weight], dim=1)
    other = cogvideox_native.load_native(state, in_channels=32)
    with pytest.raises(LoraMismatchError, match=r"CogVideoX transformer.*5B / 1.5 / image-to-video"):
        loader.apply_tdm_lora(other, None, loader.load_lora_cached(str(path)))
