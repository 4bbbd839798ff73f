"""CogVideoX-2B as a TDM Distill teacher: newer ComfyUI's native CogVideoX (the core loaders' MODEL; absent from
0.3.75, where TDM Distill refuses it naming the headless diffusers-folder teacher instead).

On the tiny native twin (`tdm_devkit.cogvideox_native`, the 2B's layout at tiny width): a job built as TDM Distill
builds it trains on the released LoRA's timesteps (999/856/665/399) over the 2B's own ᾱ table, its teacher is the
diffusers-folder teacher on the same weights, and its LoRA loads in ComfyUI's core loader and the TDM LoRA Loader
with every key matched.
"""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import torch

from tdm_core import families, schedules
from tdm_core.distill import DiscreteSchedule
from tdm_devkit import cogvideox_native, cogvideox_tiny

native_only = pytest.mark.skipif(not cogvideox_native.has_native_cogvideox(), reason=cogvideox_native.SKIP_REASON)

GEOMETRY = cogvideox_tiny.tiny_frame_geometry()  # 9 frames of 48×32: the twin's sample size (its stored positions)
SETTINGS = dict(unconditional_prompt="", steps=4, grid="auto", iterations=1, lora_rank=4, lora_alpha=0.0,
                learning_rate=1e-3, batch_size=1, width=GEOMETRY.width, height=GEOMETRY.height,
                frames=GEOMETRY.num_frames, save_every=1, keep_last=1, preview_every=1, seed=0,
                gradient_checkpointing=True, dtype="auto", offload="train_on_cpu", cfg=6.0)
LATENT = (cogvideox_tiny.LATENT_CHANNELS, GEOMETRY.latent_frames, GEOMETRY.latent_height, GEOMETRY.latent_width)
# fp32 twins: the native and diffusers attention and reshapes differ at the 1e-7 level per layer
PARITY_RTOL = 1e-5


def _modules(pack, name):
    return sys.modules[f"{pack.__name__}.nodes.{name}"]


@pytest.fixture(scope="module")
def native_model():
    return cogvideox_native.load_native(cogvideox_native.native_state_dict(
        cogvideox_native.build_diffusers_transformer(seed=0)))


def test_registry_entry_trains_the_native_linears_and_keeps_the_released_layout():
    family = families.COGVIDEOX
    assert family.distillable and family.video and family.parametrisation == "v"
    assert family.lora_targets == ("q", "k", "v", "attn_out", "ff_proj", "ff_out")
    assert family.repeated_blocks == ("blocks",)
    # what TDM Distill exports (ComfyUI-native names) and the released LoRA (peft, diffusers names) are both CogVideoX
    native = families.LoraKeyLayout(comfy=tuple(f"blocks.{i}.{t}" for i in range(2) for t in family.lora_targets),
                                    diffusers=())
    released = families.LoraKeyLayout(comfy=(), diffusers=tuple(
        f"transformer_blocks.{i}.{m}" for i in range(2)
        for m in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2")))
    assert families.detect_lora(native) == families.detect_lora(released) == family.name


def test_auto_grid_is_the_released_loras_timesteps_on_the_2b_table():
    """The grid `auto` trains CogVideoX on, asked as the ComfyUI side asks (grids.preset_grid on the adapter's
    schedule): the released LoRA's 999/856/665/399, on the 2B's ᾱ (SNR shift 3, zero terminal SNR)."""
    from tdm_core.distill.grids import preset_grid

    grid = preset_grid(DiscreteSchedule.cogvideox(), families.COGVIDEOX.default_preset, 4)
    assert grid.timesteps == [999, 856, 665, 399] == list(schedules.cogvideox_trained_timesteps())
    assert float(grid.schedule.alphas[999]) == 0.0  # zero terminal SNR: the first step starts from pure noise


def test_without_native_cogvideox_tdm_distill_names_the_pipeline_teacher(pack):
    """0.3.75 cannot load CogVideoX as a MODEL; TDM Distill's refusal of any MODEL it cannot train says how
    CogVideoX-2B is trained there instead (its cogvideox input). (On upstream the note is absent: the native MODEL is a teacher.)"""
    import comfy.supported_models

    from tdm_devkit import twins

    config = comfy.supported_models.SD20(dict(twins.SD15_TINY_UNET_CONFIG))
    config.set_inference_dtype(torch.float32, None)
    sd2 = twins._patcher(config.get_model({}))
    distill_jobs = _modules(pack, "distill_jobs")
    with pytest.raises(ValueError, match=r"supported families: .*cogvideox \(CogVideoX-2B\)") as refused:
        distill_jobs.build_runtime(sd2, cogvideox_native.TinyCogVideoXCLIP(), dict(SETTINGS), ["a cat"])
    instead = "connect TDM CogVideoX Loader (lora_name none) to TDM Distill's cogvideox input"
    if cogvideox_native.has_native_cogvideox():
        assert instead not in str(refused.value)
    else:
        assert "native CogVideoX (newer than 0.3.75" in str(refused.value) and instead in str(refused.value)


# ---------------------------------------------------------------------------------------------------------------
# the native twin as a teacher (upstream ComfyUI)


@pytest.fixture(scope="module")
def trained(pack, native_model, tmp_path_factory):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from tdm_core.distill import TDMTrainer, checkpoint

    with torch.inference_mode(False):
        runtime, _, grid = _modules(pack, "distill_jobs").build_runtime(
            native_model, cogvideox_native.TinyCogVideoXCLIP(), dict(SETTINGS), ["a cat", "a dog surfing"])
        trainer = TDMTrainer(runtime.backend, runtime.config)
        before = runtime.backend.adapter_state_dict("student")
        metrics = [trainer.step() for _ in range(2)]
        after = runtime.backend.adapter_state_dict("student")
    assert any(not torch.equal(before[k], after[k]) for k in before), "the student did not change"
    assert np.isfinite([[m["loss_fake"], m["loss_gen"]] for m in metrics]).all()
    path = checkpoint.export_student_lora(trainer, tmp_path_factory.mktemp("cogvideox") / "tdm_cogvideox_student.safetensors")
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    return runtime, grid, path, load_file(str(path)), metadata


@native_only
def test_job_trains_a_video_latent_on_the_released_grid_and_the_2b_table(native_model, trained):
    runtime, grid, _, _, metadata = trained
    assert runtime.backend.latent_shape == LATENT == (16, 3, 4, 6)  # 9 frames → 3 latent frames, 48×32 → 6×4
    assert grid.preset == "cogvideox" and grid.timesteps == [999, 856, 665, 399]
    schedule = runtime.backend.schedule
    torch.testing.assert_close(schedule.alphas ** 2, schedules.cogvideox_alphas_cumprod().double(), rtol=0, atol=1e-12)
    assert schedule.model_timesteps[[999, 856, 665, 399]].tolist() == [999.0, 856.0, 665.0, 399.0]
    # not the native MODEL's own (SNR shift 1) table, which the student would otherwise train on: at t = 856 its
    # VE σ is 11.6, the 2B's 20.5
    own = native_model.get_model_object("model_sampling").sigmas.double()
    ve = (schedule.sigmas / schedule.alphas)[856]
    assert abs(float(own[856]) - 11.60) < 0.05 and abs(float(ve) - 20.51) < 0.01
    assert metadata["tdm.family"] == families.COGVIDEOX.name and metadata["tdm.preset"] == "cogvideox"
    # gradient checkpointing wrapped the CogVideoX blocks (they were recomputed in the student update above)
    assert all(block.forward.__name__ == "checkpointed" for block in runtime.backend.model.blocks)
    # ComfyUI has no latent-RGB factors for CogVideoX: without the VAE input a job shows no preview
    assert runtime.preview_decode is None


@native_only
def test_job_conditioning_is_what_comfyui_builds_for_cogvideox(native_model, trained):
    """The trainer's context is the c_crossattn ComfyUI's CogVideoX.extra_conds builds, and for the 16-channel
    text-to-video 2B ComfyUI builds no other input (no c_concat, no ofs) the trainer would lack."""
    runtime = trained[0]
    for prompt in ("a cat", ""):
        [[context, extra]] = cogvideox_native.tiny_conditioning(prompt)
        built = native_model.model.extra_conds(cross_attn=context, noise=torch.zeros(1, *LATENT),
                                               device=torch.device("cpu"), **extra)
        assert set(built) == {"c_crossattn"}
        encoded = runtime.backend.encode([prompt])
        assert set(encoded) == {"context"}
        torch.testing.assert_close(encoded["context"], built["c_crossattn"].cond, rtol=0, atol=0)


@native_only
def test_native_teacher_is_the_diffusers_folder_teacher(trained):
    """The job's teacher (ComfyUI's native network on the raw VP state, the 2B table) predicts what the headless
    diffusers-folder teacher (diffusers' CogVideoXTransformer3DModel, the 2B scheduler's ᾱ) predicts on the same
    weights, at each trained timestep: same layout conversion, same state, same timestep fed."""
    from tdm_core.distill.backend import diffusers_backend

    runtime = trained[0]
    context = cogvideox_native.tiny_conditioning("a cat")[0][0]  # what the job encoded for "a cat"
    reference = diffusers_backend(cogvideox_native.build_diffusers_transformer(seed=0),
                                  schedule=DiscreteSchedule.from_diffusers_scheduler(cogvideox_tiny.build_tiny_scheduler()),
                                  encode=lambda prompts: {"encoder_hidden_states": context.repeat(len(prompts), 1, 1)})
    torch.testing.assert_close(reference.schedule.alphas, runtime.backend.schedule.alphas, rtol=0, atol=1e-7)
    x = torch.randn(1, *LATENT, generator=torch.Generator().manual_seed(3))
    cond = runtime.backend.encode(["a cat"])
    for t in (999, 856, 665, 399):
        with torch.no_grad():
            ours = runtime.backend.forward(x, torch.tensor([t]), cond, "teacher")
            theirs = reference.forward(x.permute(0, 2, 1, 3, 4), torch.tensor([t]), reference.encode(["a"]), "teacher")
        assert theirs.abs().max() > 0.1
        error = float((ours.permute(0, 2, 1, 3, 4) - theirs).abs().max() / theirs.abs().max())
        assert error <= PARITY_RTOL, (t, error)


@native_only
def test_student_lora_loads_in_comfyui_and_the_tdm_loader(pack, native_model, trained, monkeypatch, caplog):
    import comfy.lora
    import comfy.model_management

    from tdm_core.lora import parse_lora
    from tdm_core.lora.parse import key_layout

    _, _, path, lora_sd, _ = trained
    alphas = [k for k in lora_sd if k.endswith(".alpha")]
    assert len(alphas) == len(families.COGVIDEOX.lora_targets) * cogvideox_tiny.TINY_TRANSFORMER_CONFIG["num_layers"]
    # recognised as CogVideoX by its keys alone (the header's family entry aside)
    assert families.detect_lora(key_layout(parse_lora(lora_sd).modules.values())) == families.COGVIDEOX.name
    key_map = comfy.lora.model_lora_keys_unet(native_model.model, {})
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        patches = comfy.lora.load_lora(lora_sd, key_map)
    assert [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()] == []
    assert len(patches) == len(alphas)
    clone = native_model.clone()
    assert len(clone.add_patches(patches, 1.0)) == len(patches)

    def run(patcher):
        comfy.model_management.load_models_gpu([patcher], force_full_load=True)
        try:
            with torch.no_grad():
                return patcher.model.diffusion_model(x, torch.tensor([856.0]), context)
        finally:
            comfy.model_management.unload_all_models()

    x = torch.randn(1, *LATENT, generator=torch.Generator().manual_seed(7))
    context = cogvideox_native.text_embedding(seed=1)
    ours, base = run(clone), run(native_model)
    assert (ours - base).abs().max() > 1e-4, "the student LoRA changes nothing: the comparisons would be empty"

    loader = _modules(pack, "lora_loader")
    monkeypatch.setattr(loader, "_lora_path", lambda name: str(path.parent / name))
    monkeypatch.setattr(loader, "_lora_files", lambda: [path.name])
    out = loader.TDMLoraLoader.execute(native_model, path.name, "auto", 0.3)
    text = out.ui.as_dict()["text"][0]
    assert f"matched {len(alphas)}/{len(alphas)} modules" in text and "strength 1" in text
    torch.testing.assert_close(run(out.result[0]), ours, rtol=0, atol=1e-6)
    # the sampler's auto on the student: the preset it was trained on (the released LoRA's)
    assert _modules(pack, "sampling_grids").resolve_preset(out.result[0], "auto").name == "cogvideox"


@native_only
def test_vae_preview_shows_frames_of_each_decoded_clip(pack, native_model):
    """With TDM Distill's vae input (a real ComfyUI CogVideoX VAE, random weights): each clip decoded whole, 9 frames
    from 3 latent frames, and frames 0, 3, 5, 8 shown below each other."""
    decode = pack.nodes.comfy_backend.vae_preview_decoder(native_model, cogvideox_native.tiny_vae(seed=0), "cpu")
    grid = decode(torch.randn(1, *LATENT, generator=torch.Generator().manual_seed(4)))
    assert grid.shape == (4 * GEOMETRY.height, GEOMETRY.width, 3) and grid.dtype == np.uint8
    assert not np.array_equal(grid[:GEOMETRY.height], grid[GEOMETRY.height:2 * GEOMETRY.height])


@native_only
@pytest.mark.parametrize(("change", "refusal"), [
    (dict(width=64), r"trained at 48×32 with up to 9 frames, not 64×32.*stored position table"),
    (dict(frames=13), r"up to 9 frames, not 48×32 with 13"),
    (dict(frames=8), r"4k \+ 1"),
])
def test_sizes_the_native_positions_do_not_hold_are_refused(pack, native_model, change, refusal):
    with pytest.raises(ValueError, match=refusal):
        _modules(pack, "distill_jobs").build_runtime(native_model, cogvideox_native.TinyCogVideoXCLIP(),
                                                     dict(SETTINGS, **change), ["a cat"])


@native_only
def test_other_cogvideox_models_are_refused_naming_the_2b(pack):
    state = cogvideox_native.native_state_dict(cogvideox_native.build_diffusers_transformer(seed=0))
    weight = state["patch_embed.proj.weight"]
    state["patch_embed.proj.weight"] = torch.cat([weight, weight], dim=1)
    image_to_video = cogvideox_native.load_native(state, in_channels=32)
    with pytest.raises(ValueError, match=r"CogVideoX 5B, 1.5 or image-to-video.*CogVideoX-2B text-to-video only"):
        _modules(pack, "distill_jobs").build_runtime(image_to_video, cogvideox_native.TinyCogVideoXCLIP(),
                                                     dict(SETTINGS), ["a cat"])
