"""The sampler and LoRA nodes on models loaded in the precisions a GPU user's ComfyUI gives them (bf16, fp16, the
manual-cast paths), against diffusers run in the same precision on the same twin weights.

Tolerances come from the compute dtype's machine epsilon ε (bf16 2⁻⁷, fp16 2⁻¹⁰; fp32 runs are covered by
test_sampler_parity). The two implementations are not expected to round alike: ComfyUI keeps the sampling state in
float32 between steps and casts it to the network's dtype, diffusers' pipelines keep it in the network's dtype, and
the networks order their half-precision matmuls differently (fused qkv, merged vs unmerged LoRA). diffusers rounds
its state to the dtype after each of the four steps (unit roundoff u = ε/2 each), so the bound is 4u = 2ε ×
max |reference|; measured on these twins: 0.84–1.55 ε for sampling. In fp16 a wrong solver or float timesteps miss
it by 9–20× (asserted below). In bf16, whose ε is 2⁻⁷, the float-vs-integer timestep difference (947.17 vs 947) is
of the order of the rounding itself, which is why what the network is given is asserted directly.

Every run also records what the network is given as its timestep: exactly the recipe's integers, in float32, in
every dtype (a timestep rounded to the half dtype would be 1000 for 999 in bf16).
"""

from __future__ import annotations

import comfy.sample
import comfy.samplers
import pytest
import torch
from comfy_extras.nodes_custom_sampler import SamplerCustom
from diffusers import DPMSolverMultistepScheduler
from test_sampler_parity import SD3_RTOL, SD15_RTOL
from test_schedules import SD15_SCHEDULER_CONFIG

from tdm_core import presets, schedules
from tdm_devkit import lora_files, twins

PROMPT = "a lighthouse at dusk"
SEED = 42
EPSILON = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
STEPS_OF_ERROR = 4  # one unit roundoff (ε/2) per step of a 4-step sampler (see the module docstring)
# The recipe's integer timesteps at 4 steps (docs/tdm_method.md §3).
SD3_TIMESTEPS = [999.0, 947.0, 856.0, 666.0]
SD15_TIMESTEPS = [999.0, 749.0, 500.0, 250.0]
FAMILY_PRESET = {"sd3": "sd3", "sd35": "sd35", "sd15": "dreamshaper"}
FAMILY_TIMESTEPS = {"sd3": SD3_TIMESTEPS, "sd35": SD3_TIMESTEPS, "sd15": SD15_TIMESTEPS}

LOADS = {
    # family → the loads a user of that family meets (SD1.5 checkpoints are loaded as fp16 or bf16 on GPUs; fp8
    # weights come through UNETLoader, which loads MMDiT files)
    "sd3": ["bf16", "fp16", "bf16_weights_fp32_compute", "fp8_e4m3fn_weights_bf16_compute"],
    "sd35": ["bf16", "fp16"],
    "sd15": ["bf16", "fp16", "bf16_weights_fp32_compute"],
}
CASES = [(family, load) for family, loads in LOADS.items() for load in loads]


@pytest.fixture(scope="module")
def sampling(pack):
    return pack.nodes.sampling


@pytest.fixture(scope="module")
def lora_loader(pack):
    import sys

    return sys.modules[f"{pack.__name__}.nodes.lora_loader"]


_TWINS: dict = {}


def half_twin(family: str, load: str) -> twins.Twin:
    if (family, load) not in _TWINS:
        _TWINS[(family, load)] = twins.comfy_twin_in_dtype(family, load)
    return _TWINS[(family, load)]


def tolerance(reference: torch.Tensor, compute_dtype: torch.dtype, family: str = "sd3") -> float:
    if compute_dtype == torch.float32:  # half weights computed in fp32 (manual cast): the fp32 parity bounds
        return (SD15_RTOL if family == "sd15" else SD3_RTOL) * reference.abs().max().item()
    return STEPS_OF_ERROR * EPSILON[compute_dtype] / 2 * reference.abs().max().item()


class TimestepsSeen:
    """Records the timestep argument of every call of a ComfyUI diffusion model."""

    def __init__(self, network: torch.nn.Module):
        self.network, self.values, self.dtypes = network, [], set()

    def __enter__(self):
        def record(module, args, kwargs):
            timesteps = args[1] if len(args) > 1 else kwargs.get("timesteps", kwargs.get("t"))
            self.values.append(timesteps.reshape(-1)[0].item())
            self.dtypes.add(timesteps.dtype)

        self.handle = self.network.register_forward_pre_hook(record, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def diffusers_recipe(twin: twins.Twin, family: str, noise: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The official TDM recipe of the family in diffusers, with the state in the network's dtype between steps as
    diffusers' pipelines keep it (SD3/SD3.5: flow DPM-Solver++(2M), shift 6; SD1.5: DPM-Solver++(2M), DDPM
    config)."""
    context, pooled = twins.tiny_text_embedding("sd15" if family == "sd15" else "sd3", PROMPT)
    context = context.to(dtype)
    if family == "sd15":
        scheduler = DPMSolverMultistepScheduler.from_config(SD15_SCHEDULER_CONFIG, algorithm_type="dpmsolver++",
                                                            solver_order=2)
        scheduler.set_timesteps(4)
        x = (noise * scheduler.init_noise_sigma).to(dtype)
    else:
        scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                                flow_shift=6.0, algorithm_type="dpmsolver++", solver_order=2)
        scheduler.set_timesteps(4)
        x = noise.to(dtype)
    with torch.no_grad():
        for t in scheduler.timesteps:
            if family == "sd15":
                out = twin.diffusers(scheduler.scale_model_input(x, t), t, encoder_hidden_states=context).sample
            else:
                out = twin.diffusers(hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=context,
                                     pooled_projections=pooled.to(dtype)).sample
            x = scheduler.step(out, t, x).prev_sample.to(dtype)
    return x.float()


def empty_latent(family: str) -> torch.Tensor:
    # 8×8 is the smallest latent the SD1.5 UNet's three downsamplings take (half-precision convolutions are slow on
    # the CPU); the MMDiT runs at the 16×16 of the fp32 parity tests.
    size = 8 if family == "sd15" else 16
    return torch.zeros(1, twins.FAMILY_LATENT_CHANNELS[family], size, size)


def tdm_custom_sampler(sampling, model, family: str, latent: torch.Tensor) -> torch.Tensor:
    """TDM Scheduler + TDM Sampler with their shipped defaults in core SamplerCustom (cfg 1, as every recipe)."""
    scheduler_defaults = dict(shift=0.0, grid="preset", custom_timesteps="",
                              demo_total_steps=schedules.TRAINING_DEMO_TOTAL_STEPS)
    sigmas = sampling.TDMScheduler.execute(model, FAMILY_PRESET[family], 4, **scheduler_defaults).result[0]
    sampler = sampling.TDMSampler.execute("auto", 0.0, "integer", "unit").result[0]
    cond = twins.tiny_conditioning("sd15" if family == "sd15" else "sd3", PROMPT)
    out = SamplerCustom.execute(model, True, SEED, 1.0, cond, [], sampler, sigmas, {"samples": latent}).result[0]
    return model.model.process_latent_in(out["samples"]).float()


def tdm_ksampler(sampling, model, family: str, latent: torch.Tensor) -> torch.Tensor:
    cond = twins.tiny_conditioning("sd15" if family == "sd15" else "sd3", PROMPT)
    out = sampling.TDMKSampler.execute(model, cond, {"samples": latent}, FAMILY_PRESET[family], 4, SEED).result[0]
    return model.model.process_latent_in(out["samples"]).float()


@pytest.mark.parametrize("family,load", CASES)
def test_tdm_sampling_in_half_precision_matches_diffusers(sampling, family, load):
    twin = half_twin(family, load)
    weight_dtype, compute_dtype = twins.HALF_LOADS[load]
    latent = empty_latent(family)
    with TimestepsSeen(twin.comfy.model.diffusion_model) as seen:
        ours = tdm_custom_sampler(sampling, twin.comfy, family, latent)
    reference = diffusers_recipe(twin, family, comfy.sample.prepare_noise(latent, SEED), compute_dtype)
    # the network sees the recipe's integers, in float32 (never rounded to the weights' or the compute dtype)
    assert seen.values == FAMILY_TIMESTEPS[family]
    assert seen.dtypes == {torch.float32}
    assert torch.isfinite(ours).all() and reference.abs().max() > 1.0
    bound = tolerance(reference, compute_dtype, family)
    torch.testing.assert_close(ours, reference, rtol=0, atol=bound)

    # the all-in-one node on the same model is the same computation
    with TimestepsSeen(twin.comfy.model.diffusion_model) as seen_ksampler:
        all_in_one = tdm_ksampler(sampling, twin.comfy, family, latent)
    assert seen_ksampler.values == FAMILY_TIMESTEPS[family]
    torch.testing.assert_close(all_in_one, ours, rtol=0, atol=0)


def test_half_precision_tolerance_still_tells_a_wrong_recipe_apart(sampling):
    """The fp16 bound absorbs rounding and still rejects a wrong solver (ComfyUI's own dpmpp_2m, λ = −ln σ) and
    ComfyUI's float timesteps."""
    twin = half_twin("sd3", "fp16")
    latent = empty_latent("sd3")
    reference = diffusers_recipe(twin, "sd3", comfy.sample.prepare_noise(latent, SEED), torch.float16)
    bound = tolerance(reference, torch.float16)
    sigmas = sampling.TDMScheduler.execute(twin.comfy, "sd3", 4, 0.0, "preset", "",
                                           schedules.TRAINING_DEMO_TOTAL_STEPS).result[0]
    cond = twins.tiny_conditioning("sd3", PROMPT)
    for wrong_sampler in (comfy.samplers.sampler_object("dpmpp_2m"),
                          sampling.TDMSampler.execute("auto", 0.0, "float", "unit").result[0]):
        out = SamplerCustom.execute(twin.comfy, True, SEED, 1.0, cond, [], wrong_sampler, sigmas,
                                    {"samples": latent}).result[0]
        wrong = twin.comfy.model.process_latent_in(out["samples"]).float()
        assert (wrong - reference).abs().max().item() > 5 * bound


# fp8 weights are left out of the parity: ComfyUI merges a LoRA into fp8 weights with stochastic rounding to fp8
# (3 mantissa bits), which no diffusers run reproduces; the loader's part (keys, strength) is the bf16 case's.
LORA_CASES = [("sd3", "bf16"), ("sd3", "fp16"), ("sd35", "bf16"), ("sd15", "bf16"), ("sd15", "fp16")]


def _forward_inputs(family: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(12)
    if family == "sd15":
        x = torch.randn(1, 4, 8, 8, generator=g)
        context = torch.randn(1, 7, twins.SD15_CONTEXT_DIM, generator=g)
        return x.to(dtype), torch.tensor([500.0]), context.to(dtype), None
    x = torch.randn(1, twins.SD3_LATENT_CHANNELS, 16, 16, generator=g)
    context = torch.randn(1, 5, twins.SD3_JOINT_ATTENTION_DIM, generator=g)
    pooled = torch.randn(1, twins.SD3_POOLED_DIM, generator=g)
    return x.to(dtype), torch.tensor([947.0]), context.to(dtype), pooled.to(dtype)


@pytest.mark.parametrize("family,load", LORA_CASES)
def test_tdm_lora_loader_on_half_precision_models_matches_diffusers(lora_loader, tmp_path, family, load):
    """The released LoRA layouts (peft safetensors for SD3/SD3.5, the kohya .pt pickle for Dreamshaper) on a model
    in half precision, at the preset strength: every module matched, and the patched network equals diffusers'
    `load_lora_weights` + `set_adapters` in the same dtype."""
    import copy

    import comfy.model_management
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

    from tdm_core import lora as tdm_lora

    twin = half_twin(family, load)
    _, compute_dtype = twins.HALF_LOADS[load]
    preset = presets.get_preset(FAMILY_PRESET[family])
    reference_twin = twins.comfy_twin(family)  # the fp32 diffusers module the LoRA is synthesised against
    # ΔW of about half the weights' scale at the preset strength (SD3's 0.125 included), so the LoRA moves the
    # output well beyond what half-precision rounding can blur.
    synthetic = lora_files.synthesise(reference_twin.diffusers, family, rank=4, seed=7,
                                      alpha=2.0 if family == "sd15" else None, magnitude=0.5 / preset.lora_strength)
    path = (lora_files.write_kohya(synthetic, tmp_path / "tdm_dreamshaper.pt") if family == "sd15"
            else lora_files.write_peft(synthetic, tmp_path / f"tdm_{family}.safetensors"))
    parsed = tdm_lora.load_lora(path)
    strength = preset.lora_strength
    application = lora_loader.apply_tdm_lora(twin.comfy, None, parsed, strength)
    assert application.match.unmatched == {}, application.match.warning()

    x, t, context, pooled = _forward_inputs(family, compute_dtype)
    try:
        # ComfyUI patches and runs models under inference mode (its executor's); its fp8 merge needs it.
        with torch.inference_mode():
            comfy.model_management.load_models_gpu([application.model], force_full_load=True)
            net = application.model.model.diffusion_model
            ours = (net(x, timesteps=t, context=context) if family == "sd15"
                    else net(x, t, y=pooled, context=context)).float()
    finally:
        comfy.model_management.unload_all_models()

    module = copy.deepcopy(twin.diffusers)
    if family == "sd15":
        pipeline = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=module, scheduler=None,
                                           safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
    else:
        pipeline = StableDiffusion3Pipeline(transformer=module, scheduler=None, vae=None, text_encoder=None,
                                            tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                            text_encoder_3=None, tokenizer_3=None)
    pipeline.load_lora_weights(str(path), adapter_name="tdm")
    pipeline.set_adapters(["tdm"], [strength])
    with torch.no_grad():
        if family == "sd15":
            reference = module(x, t, encoder_hidden_states=context).sample.float()
            base = twin.diffusers(x, t, encoder_hidden_states=context).sample.float()
        else:
            reference = module(hidden_states=x, timestep=t, encoder_hidden_states=context,
                               pooled_projections=pooled).sample.float()
            base = twin.diffusers(hidden_states=x, timestep=t, encoder_hidden_states=context,
                                  pooled_projections=pooled).sample.float()
    # One forward pass. The base networks agree to ≤ 1 ε (SD1.5: bit-identical). With the LoRA, ComfyUI merges
    # W + s·ΔW in float32 and rounds each merged weight to the dtype once (relative error ≤ u = ε/2), diffusers adds
    # s·B(A·x) unmerged; the roundings of the n patched modules along the network are independent, so they add up
    # like a random walk: bound = (2ε + √n·u) × max |reference| (measured: 3.5 ε on SD1.5, ≤ 1 ε on SD3).
    patched = len(application.match.matched)
    bound = (2 * EPSILON[compute_dtype] + patched**0.5 * EPSILON[compute_dtype] / 2) * reference.abs().max().item()
    assert (reference - base).abs().max().item() > 3 * bound, "the LoRA must move the output beyond the bound"
    torch.testing.assert_close(ours, reference, rtol=0, atol=bound)


# --- CogVideoX: TDM CogVideoX Loader + Sampler in each dtype the loader offers (bf16 is its default) -------------

COGVIDEOX_PROMPT = "a red fox running in snow"


@pytest.fixture(scope="module")
def cogvideox_folder(tmp_path_factory):
    from tdm_devkit import cogvideox_tiny

    return cogvideox_tiny.save_tiny_cogvideox_folder(tmp_path_factory.mktemp("cogvideox_half") / "tiny-cogvideox")


@pytest.fixture(scope="module")
def cogvideox_lora(tmp_path_factory):
    from tdm_devkit import cogvideox_tiny

    lora = lora_files.synthesise(cogvideox_tiny.build_tiny_transformer(0), "cogvideox", rank=4, seed=7)
    return lora_files.write_peft(lora, tmp_path_factory.mktemp("cogvideox_lora") / "tdm_cogvideox_2b.safetensors")


def _tiny_tiles(pipe) -> None:
    """The 2b's tiling defaults at 480×720 (tiles of half the frame, overlaps 1/6 and 1/5) give tile strides that
    are exact multiples of the VAE's 8× upsampling; at the tiny fixture's 32×48 the same fractions round to strides
    that are not, and diffusers then assembles frames of the wrong size. Tiles of the same shape with fractions that
    divide evenly keep the real tiled-decoding path exact at this size."""
    pipe.vae.enable_tiling(tile_sample_min_height=16, tile_sample_min_width=24, tile_overlap_factor_height=1 / 2,
                           tile_overlap_factor_width=1 / 3)


COGVIDEOX_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@pytest.mark.parametrize("dtype_name", list(COGVIDEOX_DTYPES))
def test_cogvideox_loader_and_sampler_in_each_dtype_match_diffusers(cogvideox_folder, cogvideox_lora, dtype_name):
    """The loader's defaults (LoRA at its strength, VAE tiling and slicing on) in bf16 (the default), fp16 and
    fp32: the trailing grid equals CogVideoXPipeline with the same LoRA in the same dtype, the trained grid feeds the
    transformer exactly 999/856/665/399, and the frames decode."""
    from diffusers import CogVideoXPipeline

    from tdm_core import cogvideox
    from tdm_devkit import cogvideox_tiny

    geometry = cogvideox_tiny.tiny_frame_geometry()
    dtype = COGVIDEOX_DTYPES[dtype_name]
    pipe = cogvideox.load_pipeline(cogvideox_folder, cogvideox.LoadOptions(dtype=dtype_name, lora_path=str(cogvideox_lora)))
    assert pipe.transformer.dtype == dtype and pipe.vae.use_tiling and pipe.vae.use_slicing

    reference_pipe = CogVideoXPipeline.from_pretrained(cogvideox_folder, torch_dtype=dtype)
    reference_pipe.set_progress_bar_config(disable=True)
    reference_pipe.load_lora_weights(str(cogvideox_lora), adapter_name="reference")
    reference_pipe.set_adapters(["reference"], [1.0])
    reference = reference_pipe(prompt=COGVIDEOX_PROMPT, num_frames=geometry.num_frames, height=geometry.height,
                               width=geometry.width, num_inference_steps=4, guidance_scale=1.0,
                               generator=torch.Generator().manual_seed(3), output_type="latent").frames.float()
    ours = cogvideox.sample_latents(pipe, COGVIDEOX_PROMPT, "", geometry.num_frames, geometry.height, geometry.width,
                                    cogvideox.sampling_timesteps("trailing", 4), 1.0, 3)
    assert ours.dtype == dtype
    # fp32: the bound of test_cogvideox; half: 2ε (TDM keeps the state in float32, the pipeline in the dtype).
    relative = 1e-5 if dtype == torch.float32 else STEPS_OF_ERROR * EPSILON[dtype] / 2
    assert reference.abs().max() > 0.1
    torch.testing.assert_close(ours.float(), reference, rtol=0, atol=relative * reference.abs().max().item())

    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["timestep"].clone()), with_kwargs=True)
    try:
        latents = cogvideox.sample_latents(pipe, COGVIDEOX_PROMPT, "", geometry.num_frames, geometry.height,
                                           geometry.width, cogvideox.sampling_timesteps("trained", 4), 1.0, 3)
    finally:
        handle.remove()
    assert [t.tolist() for t in seen] == [[999], [856], [665], [399]]
    assert {t.dtype for t in seen} == {torch.long}

    _tiny_tiles(pipe)
    frames = cogvideox.decode_frames(pipe, latents)
    assert frames.shape == (geometry.num_frames, geometry.height, geometry.width, 3)
    assert frames.dtype == torch.float32 and torch.isfinite(frames).all()
    assert 0.0 <= frames.min() and frames.max() <= 1.0 and frames.std() > 0.01
