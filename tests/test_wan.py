"""Wan 2.1 text-to-video as a TDM Distill teacher: the twin (ComfyUI's UNETLoader path and diffusers'
WanTransformer3DModel on the same weights), recognising the MODEL and its variants, the `wan21` preset `auto` picks,
a job trained on the twin, and its LoRA in ComfyUI's core loader, the TDM LoRA Loader and diffusers' Wan loader."""

from __future__ import annotations

import logging
import sys

import comfy.model_management
import comfy.sample
import numpy as np
import pytest
import torch

from tdm_core import families, schedules
from tdm_core.lora import wan_native_lora_key_map
from tdm_core.lora.wan_names import wan_diffusers_name
from tdm_devkit import twins_wan as tw

# fp32 rounding relative to max |output| (the SD3/Flux parity tolerances are 2e-6–5e-6; the twin measures ~5e-6:
# ComfyUI computes the rotary table in float32 at call time, diffusers in float64 once).
PARITY_RTOL = 1e-5
SETTINGS = dict(unconditional_prompt="", steps=4, grid="auto", iterations=1, lora_rank=4, lora_alpha=0.0,
                learning_rate=1e-3, batch_size=1, width=32, height=32, save_every=1, keep_last=1, preview_every=1,
                seed=0, gradient_checkpointing=True, dtype="auto", offload="train_on_cpu", cfg=5.0)


@pytest.fixture(scope="module")
def wan_twin():
    return tw.wan_twin(seed=0)


@pytest.fixture(scope="module")
def adapters(pack):
    return pack.nodes.family_adapters


def _modules(pack, name):
    return sys.modules[f"{pack.__name__}.nodes.{name}"]


def _inputs(seed=1, frames=2, size=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, tw.WAN_LATENT_CHANNELS, frames, size, size, generator=g)


# ---------------------------------------------------------------------------------------------------------------
# the twin


def test_wan_twins_are_the_same_network(wan_twin):
    """Teacher parity: ComfyUI's WAN21 (UNETLoader path) and diffusers' WanTransformer3DModel on the same weights."""
    model = wan_twin.comfy.model
    assert (type(model).__name__, type(model.model_config).__name__, model.get_dtype()) == (
        "WAN21", "WAN21_T2V", torch.float32)
    worst = 0.0
    for seed, sigma, frames in ((1, 0.96, 2), (2, 0.5, 3)):
        x = _inputs(seed, frames)
        context = tw.tiny_text_embedding("a red fox running through snow", seed)
        with torch.no_grad():
            ours = model.diffusion_model(x, torch.tensor([sigma * 1000.0]), context)
            reference = wan_twin.diffusers(x, torch.tensor([sigma * 1000.0]), context, return_dict=False)[0]
        assert reference.abs().max() > 0.5  # a network that outputs ~0 would compare equal to anything
        error = (ours - reference).abs().max().item()
        print(f"wan21 twin parity (seed {seed}, σ {sigma}, {frames} latent frames): max |ComfyUI − diffusers| = "
              f"{error:.3e}, max |diffusers| = {reference.abs().max().item():.3f}")
        worst = max(worst, error / reference.abs().max().item())
    assert worst <= PARITY_RTOL


def test_wan_names_are_those_of_diffusers_converter(wan_twin):
    """tdm_core.lora.wan_names renames every linear as diffusers' own Wan converter does."""
    native_linears = [name for name, module in wan_twin.comfy.model.diffusion_model.named_modules()
                      if isinstance(module, torch.nn.Linear)]
    assert len(native_linears) == 10 * tw.WAN_TINY["num_layers"] + 6
    by_converter = {native: diffusers for diffusers, native in wan_twin.key_map.items()}
    assert {n: wan_diffusers_name(n) for n in native_linears} == {
        n: by_converter[f"{n}.weight"][: -len(".weight")] for n in native_linears}
    key_map = wan_native_lora_key_map(f"diffusion_model.{k}" for k in wan_twin.comfy.model.diffusion_model.state_dict())
    assert len(key_map) == len(native_linears) + 1  # the linears and the patch embedding
    assert key_map["transformer.blocks.1.attn2.to_out.0"] == "diffusion_model.blocks.1.cross_attn.o.weight"


# ---------------------------------------------------------------------------------------------------------------
# recognising the MODEL, the preset


def test_family_and_auto_preset(pack, wan_twin, adapters):
    sampling_grids = _modules(pack, "sampling_grids")
    assert adapters.model_family(wan_twin.comfy) == families.WAN21.name
    preset = sampling_grids.resolve_preset(wan_twin.comfy, "auto")
    assert preset.name == "wan21" and preset.shift == 8.0 and preset.family == families.WAN21.name
    # ComfyUI's own Wan 2.1 sampling shift, the one the preset follows (see presets.py)
    assert wan_twin.comfy.model.model_sampling.shift == preset.shift
    sigmas = sampling_grids.tdm_sigmas(wan_twin.comfy, "auto", 4)
    expected = schedules.flow_shift_grid(4, 8.0)
    assert sigmas.tolist() == pytest.approx(list(expected.sigmas), abs=1e-6)
    assert expected.timesteps == (999, 959, 888, 727)
    # exclusive: SD3's shift-6 preset does not sample Wan, Wan's preset no SD3
    with pytest.raises(ValueError, match="does not fit this MODEL"):
        sampling_grids.tdm_sigmas(wan_twin.comfy, "sd3", 4)


def test_tdm_sampler_on_a_video_latent_is_the_students_step_in_diffusers_terms(pack, wan_twin):
    """TDM Scheduler + TDM Sampler (auto) on the wan21 grid of a 5-D latent equal the flow DDIM (Euler) loop the
    preset's reference names, run on the diffusers twin: integer timesteps, x_T = unit noise."""
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    sampling = pack.nodes.sampling
    sigmas = sampling.TDMScheduler.execute(wan_twin.comfy, "auto", 4, 0.0, "preset", "",
                                           schedules.TRAINING_DEMO_TOTAL_STEPS).result[0]
    sampler = sampling.TDMSampler.execute("auto", 0.0, "integer", "unit").result[0]
    latent = torch.zeros(1, 16, 2, 4, 4)
    positive, negative = tw.tiny_conditioning("a cat"), tw.tiny_conditioning("")
    out = SamplerCustom.execute(wan_twin.comfy, True, 11, 1.0, positive, negative, sampler, sigmas,
                                {"samples": latent}).result[0]["samples"]
    ours = wan_twin.comfy.model.process_latent_in(out)

    x = comfy.sample.prepare_noise(latent, 11)  # the same noise SamplerCustom draws
    context = tw.tiny_text_embedding("a cat")
    grid = schedules.flow_shift_grid(4, 8.0)
    with torch.no_grad():
        for sigma, sigma_next, t in zip(grid.sigmas[:-1], grid.sigmas[1:], grid.timesteps, strict=True):
            v = wan_twin.diffusers(x, torch.tensor([t]), context, return_dict=False)[0]
            x = x + (sigma_next - sigma) * v
    assert x.abs().max() > 0.1
    torch.testing.assert_close(ours, x, rtol=0, atol=PARITY_RTOL * 4 * x.abs().max().item())


def _variant(config_class: str, **unet):
    """A tiny MODEL of one of ComfyUI's other Wan configs, built as its loader builds it."""
    import comfy.supported_models

    from tdm_devkit.twins import _patcher

    config = dict(image_model="wan2.1", dim=tw.WAN_TINY["dim"], ffn_dim=tw.WAN_TINY["ffn_dim"], num_layers=1,
                  num_heads=tw.WAN_TINY["dim"] // tw.WAN_HEAD_DIM, patch_size=(1, 2, 2), freq_dim=256,
                  window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6)
    config.update(dict(in_dim=16, out_dim=16, model_type="t2v") | unet)
    model_config = getattr(comfy.supported_models, config_class)(config)
    model_config.set_inference_dtype(torch.float32, None)
    return _patcher(model_config.get_model({}))


@pytest.mark.parametrize(("config_class", "unet", "named"), [
    ("WAN21_I2V", dict(model_type="i2v", in_dim=36), "Wan 2.1 image-to-video"),
    ("WAN22_T2V", dict(in_dim=48, out_dim=48), "Wan 2.2 TI2V 5B"),
    # Wan 2.2 A14B's image-to-video expert: no CLIP-vision weights, so ComfyUI's detection calls it t2v
    ("WAN21_T2V", dict(in_dim=36), "36-channel Wan image-to-video model"),
])
def test_other_wan_variants_are_refused_naming_what_is_out(pack, adapters, config_class, unet, named):
    variant = _variant(config_class, **unet)
    assert adapters.model_family(variant) == families.OTHER_WAN
    with pytest.raises(ValueError, match=f"{named}.*Wan 2.1 text-to-video.*only.*VACE.*Wan 2.2.*A14B") as refused:
        _modules(pack, "distill_jobs").build_runtime(variant, tw.TinyWanCLIP(), dict(SETTINGS), ["a cat"])
    assert "wan21 (Wan 2.1 T2V)" in str(refused.value)
    sampling_grids = _modules(pack, "sampling_grids")
    with pytest.raises(ValueError, match="no TDM recipe exists"):
        sampling_grids.resolve_preset(variant, "auto")
    with pytest.raises(ValueError, match=f"'wan21' samples Wan 2.1 text-to-video students; this MODEL is .*{named}"):
        sampling_grids.tdm_sigmas(variant, "wan21", 4)


# ---------------------------------------------------------------------------------------------------------------
# a job on the twin, its LoRA


@pytest.fixture(scope="module")
def trained(pack, wan_twin, tmp_path_factory):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from tdm_core.distill import TDMTrainer, checkpoint

    with torch.inference_mode(False):
        runtime, _, grid = _modules(pack, "distill_jobs").build_runtime(
            wan_twin.comfy, tw.TinyWanCLIP(), dict(SETTINGS), ["a cat", "a dog surfing"])
        trainer = TDMTrainer(runtime.backend, runtime.config)
        before = runtime.backend.adapter_state_dict("student")
        metrics = [trainer.step() for _ in range(2)]
        after = runtime.backend.adapter_state_dict("student")
    assert any(not torch.equal(before[k], after[k]) for k in before), "the student did not change"
    assert np.isfinite([[m["loss_fake"], m["loss_gen"]] for m in metrics]).all()
    path = checkpoint.export_student_lora(trainer, tmp_path_factory.mktemp("wan") / "tdm_wan21_student.safetensors")
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    return runtime, grid, path, load_file(str(path)), metadata


def test_job_trains_a_video_latent_on_the_preset_grid(pack, wan_twin, trained):
    runtime, grid, _, _, metadata = trained
    # 33 frames (TDM Distill's default, which SETTINGS leaves as shipped) → 9 latent frames of 32/8 × 32/8
    assert runtime.backend.latent_shape == (16, 9, 4, 4)
    assert grid.preset == "wan21"
    schedule = runtime.backend.schedule
    expected = schedules.flow_shift_grid(4, 8.0)
    assert [float(schedule.sigmas[t]) for t in grid.timesteps] == pytest.approx(list(expected.sigmas[:-1]), abs=1e-12)
    assert [float(schedule.model_timesteps[t]) for t in grid.timesteps] == [float(t) for t in expected.timesteps]
    assert metadata["tdm.family"] == families.WAN21.name and metadata["tdm.preset"] == "wan21"
    # the live preview (Wan's latent RGB factors) shows each sample's latent frames 0, 3, 5 and 8 of 9 at image size,
    # the samples side by side and their frames below each other (test_video_preview_* below check the content)
    preview = runtime.preview_decode(torch.randn(2, 16, 9, 4, 4))
    assert preview.shape == (4 * 32, 2 * 32, 3) and preview.dtype == np.uint8
    # gradient checkpointing wrapped the Wan blocks (they were recomputed in the student update above)
    assert all(block.forward.__name__ == "checkpointed" for block in runtime.backend.model.blocks)


def test_job_conditioning_is_what_comfyui_builds_for_wan(wan_twin, trained):
    """The trainer's context is the c_crossattn ComfyUI's WAN21.extra_conds builds from the CLIP's conditioning,
    and for text-to-video ComfyUI builds no other network input (no c_concat, no clip_fea) the trainer would lack."""
    runtime = trained[0]
    for prompt in ("a cat", ""):
        [[context, extra]] = tw.tiny_conditioning(prompt)
        built = wan_twin.comfy.model.extra_conds(cross_attn=context, noise=torch.zeros(1, 16, 9, 4, 4),
                                                 device=torch.device("cpu"), **extra)
        assert set(built) == {"c_crossattn"}
        torch.testing.assert_close(runtime.backend.encode([prompt])["context"], built["c_crossattn"].cond,
                                   rtol=0, atol=0)
        assert set(runtime.backend.encode([prompt])) == {"context"}


def _comfy_patches(twin, lora_sd, caplog):
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(twin.comfy.model, {})
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        patches = comfy.lora.load_lora(lora_sd, key_map)
    assert [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()] == []
    return patches


def _run(patcher, x, context, sigma=0.889):
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    try:
        with torch.no_grad():
            return patcher.model.diffusion_model(x, torch.tensor([sigma * 1000.0]), context)
    finally:
        comfy.model_management.unload_all_models()


def test_student_lora_in_comfyui_tdm_loader_and_diffusers(pack, wan_twin, trained, tmp_path, monkeypatch, caplog):
    from diffusers.loaders import WanLoraLoaderMixin

    _, _, path, lora_sd, _ = trained
    alphas = [k for k in lora_sd if k.endswith(".alpha")]
    assert len(alphas) == len(families.WAN21.lora_targets) * tw.WAN_TINY["num_layers"]
    # ComfyUI's core LoRA loading: every key mapped
    patches = _comfy_patches(wan_twin, lora_sd, caplog)
    assert len(patches) == len(alphas)
    clone = wan_twin.comfy.clone()
    assert len(clone.add_patches(patches, 1.0)) == len(patches)
    x, context = _inputs(7, 3, 4), tw.tiny_text_embedding("a cat")
    ours = _run(clone, x, context)
    base = _run(wan_twin.comfy, x, context)
    assert (ours - base).abs().max() > 1e-4, "the student LoRA changes nothing: the comparisons would be empty"

    # the TDM LoRA Loader: auto strength 1 (recorded), every module matched
    loader = _modules(pack, "lora_loader")
    monkeypatch.setattr(loader, "_lora_path", lambda name: str(path.parent / name))
    monkeypatch.setattr(loader, "_lora_files", lambda: [path.name])
    out = loader.TDMLoraLoader.execute(wan_twin.comfy, path.name, "auto", 0.3)
    text = out.ui.as_dict()["text"][0]
    assert f"matched {len(alphas)}/{len(alphas)} modules" in text and "strength 1" in text
    torch.testing.assert_close(_run(out.result[0], x, context), ours, rtol=0, atol=1e-6)
    # auto on the student: the preset it was trained on
    assert _modules(pack, "sampling_grids").resolve_preset(out.result[0], "auto").name == "wan21"

    # diffusers: WanPipeline's LoRA loader converts the native file to its own names; same output
    converted = WanLoraLoaderMixin.lora_state_dict(str(path))
    transformer = tw.wan_diffusers_transformer(tw.wan_native_state_dict(seed=0))  # peft wraps it: not the shared twin
    transformer.load_lora_adapter(converted, prefix="transformer", adapter_name="tdm")
    with torch.no_grad():
        reference = transformer(x, torch.tensor([889.0]), context, return_dict=False)[0]
    torch.testing.assert_close(ours, reference, rtol=0, atol=PARITY_RTOL * reference.abs().max().item())

    # the same LoRA in diffusers' layout (peft keys `transformer.blocks.N.attn1.to_q`): recognised as Wan 2.1 and
    # matched onto the native MODEL through the adapter's aliases, with the same output
    diffusers_file = tmp_path / "tdm_wan21_diffusers.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in converted.items()}, str(diffusers_file))
    monkeypatch.setattr(loader, "_lora_path", lambda name: str(tmp_path / name))
    monkeypatch.setattr(loader, "_lora_files", lambda: [diffusers_file.name])
    out = loader.TDMLoraLoader.execute(wan_twin.comfy, diffusers_file.name, "manual", 1.0)
    assert f"matched {len(alphas)}/{len(alphas)} modules" in out.ui.as_dict()["text"][0]
    torch.testing.assert_close(_run(out.result[0], x, context), ours, rtol=0, atol=1e-5 * ours.abs().max().item())



def test_frames_set_the_clip_length_and_only_video_jobs_learn_them(pack, wan_twin):
    """TDM Distill's frames input: the training latent's length for a video teacher (4k + 1, else refused), part of
    what a Wan job learns (a queue with other frames is an edit), and nothing an image job learns."""
    distill_jobs = _modules(pack, "distill_jobs")
    settings = distill_jobs.new_job_settings(wan_twin.comfy, dict(SETTINGS, frames=9), ["a cat"])
    assert settings.comfy["frames"] == 9
    with torch.inference_mode(False):
        runtime, _, _ = distill_jobs.job_runtime(wan_twin.comfy, tw.TinyWanCLIP(), settings)
    assert runtime.backend.latent_shape == (16, 3, 4, 4)  # (9 − 1)/4 + 1 latent frames
    longer = distill_jobs.settings_from_inputs(dict(SETTINGS, frames=13), ["a cat"], families.WAN21.name)
    assert distill_jobs.edited_settings(settings, longer) == ["frames 9 → 13"]
    image = [distill_jobs.settings_from_inputs(dict(SETTINGS, frames=f), ["a cat"], families.SD3.name) for f in (9, 13)]
    assert distill_jobs.edited_settings(*image) == []
    with pytest.raises(ValueError, match="4k"):
        distill_jobs.new_job_settings(wan_twin.comfy, dict(SETTINGS, frames=8), ["a cat"])


# ---------------------------------------------------------------------------------------------------------------
# the job's preview of a video: a few frames across time


def test_preview_frames_are_spread_from_the_first_to_the_last(pack):
    backend = pack.nodes.comfy_backend
    assert backend.PREVIEW_FRAMES == 4
    assert backend.preview_frame_indices(9) == [0, 3, 5, 8]  # 33 frames' 9 latent frames
    assert backend.preview_frame_indices(33) == [0, 11, 21, 32]
    assert backend.preview_frame_indices(3) == [0, 1, 2] and backend.preview_frame_indices(1) == [0]


def test_video_preview_shows_frames_across_time_with_the_latent_rgb_factors(pack, wan_twin):
    """The latent preview of a [B, 16, T, h, w] latent: column b, row r is sample b's latent frame
    preview_frame_indices(T)[r], exactly as the image preview renders that frame alone; distinct frames differ."""
    backend = pack.nodes.comfy_backend
    decode = backend.latent_preview_decoder(wan_twin.comfy)
    x0 = torch.randn(2, 16, 9, 3, 5, generator=torch.Generator().manual_seed(3))
    grid = decode(x0)
    h, w = 3 * backend.LATENT_TO_PIXELS, 5 * backend.LATENT_TO_PIXELS
    assert grid.shape == (4 * h, 2 * w, 3)
    for row, frame in enumerate([0, 3, 5, 8]):
        alone = decode(x0[:, :, frame])  # a 4-D latent: the image preview, both samples side by side
        np.testing.assert_array_equal(grid[row * h:(row + 1) * h], alone)
    assert not np.array_equal(grid[:h], grid[h:2 * h])


def test_video_preview_decoded_by_the_vae_shows_the_clips_own_frames(pack, wan_twin):
    """With the teacher's VAE (TDM Distill's optional vae input): each sample decoded whole by a (tiny, real) ComfyUI
    Wan 2.1 VAE, 33 frames from 9 latent frames, and frames 0, 11, 21, 32 shown, as ComfyUI's own VAE decode gives
    them (a later frame of Wan's causal VAE depends on the frames before it: it is never decoded alone)."""
    backend = pack.nodes.comfy_backend
    vae = tw.tiny_vae(seed=0)
    decode = backend.vae_preview_decoder(wan_twin.comfy, vae, "cpu")
    x0 = torch.randn(2, 16, 9, 2, 3, generator=torch.Generator().manual_seed(4))
    grid = decode(x0)
    assert grid.shape == (4 * 16, 2 * 24, 3) and grid.dtype == np.uint8
    for sample in range(2):
        frames = vae.decode(wan_twin.comfy.model.latent_format.process_out(x0[sample:sample + 1]))[0]
        assert frames.shape == (33, 16, 24, 3)  # ComfyUI's VAE.decode: [frames, H, W, 3] in [0, 1]
        for row, frame in enumerate([0, 11, 21, 32]):
            expected = (frames[frame] * 255).round().to(torch.uint8).numpy().astype(int)
            tile = grid[row * 16:(row + 1) * 16, sample * 24:(sample + 1) * 24].astype(int)
            assert np.abs(tile - expected).max() <= 1  # rounding of the same float decode
    assert not np.array_equal(grid[:16], grid[16:32])
