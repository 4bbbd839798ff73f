"""Headless teachers from diffusers image folders (tdm_core/distill/diffusers_folder.py): SD1.5, SDXL, SD3 and
SD3.5-medium, on tiny folders of the real layout (tdm_devkit/diffusers_image_tiny.py). The teacher is fed what the
folder's own pipeline feeds its denoiser, trains on its family's preset grid, and the CLI's student LoRA is read by the
pack's LoRA reader as that family's, with the preset to sample it with."""

from __future__ import annotations

import json

import pytest
import torch

from tdm_core import families, presets, schedules
from tdm_core import lora as tdm_lora
from tdm_core.distill import ConfigError, DistillConfig, cli
from tdm_core.distill.diffusers_folder import make_backend
from tdm_devkit import diffusers_image_tiny

PROMPTS = ["a red ball", "a blue cube"]
SAVERS = {"sd15": diffusers_image_tiny.save_sd15_folder, "sdxl": diffusers_image_tiny.save_sdxl_folder,
          "sd3": diffusers_image_tiny.save_sd3_folder,
          "sd35": lambda path: diffusers_image_tiny.save_sd3_folder(path, sd35=True),
          "wan21": diffusers_image_tiny.save_wan_folder, "flux": diffusers_image_tiny.save_flux_folder}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    made = {}

    def folder(family: str):
        if family not in made:
            made[family] = SAVERS[family](tmp_path_factory.mktemp(family) / family)
        return made[family]

    return folder


def _pipeline(family, folder):
    import diffusers

    cls = {"sd15": diffusers.StableDiffusionPipeline, "sdxl": diffusers.StableDiffusionXLPipeline,
           "wan21": diffusers.WanPipeline, "flux": diffusers.FluxPipeline}.get(family, diffusers.StableDiffusion3Pipeline)
    absent = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False} \
        if family == "sd15" else {"text_encoder_3": None, "tokenizer_3": None} if family.startswith("sd3") else {}
    return cls.from_pretrained(folder, **absent)


def _pipeline_prediction(family, pipe, x, t, prompt):
    """The denoiser's output as the pipeline computes it for `prompt` at model timestep `t` (no CFG)."""
    cpu = torch.device("cpu")
    with torch.no_grad():
        if family == "sd15":
            embeds, _ = pipe.encode_prompt(prompt, cpu, 1, False)
            return pipe.unet(x, t, encoder_hidden_states=embeds, return_dict=False)[0]
        if family == "sdxl":
            embeds, _, pooled, _ = pipe.encode_prompt(prompt, device=cpu, do_classifier_free_guidance=False)
            size = (x.shape[-2] * pipe.vae_scale_factor, x.shape[-1] * pipe.vae_scale_factor)
            time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=embeds.dtype,
                                              text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
            return pipe.unet(x, t, encoder_hidden_states=embeds, return_dict=False,
                             added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})[0]
        if family == "flux":  # the pipeline's own packing, ids and guidance around its transformer
            embeds, pooled, text_ids = pipe.encode_prompt(prompt, prompt, device=cpu, max_sequence_length=512)
            b, c, h, w = x.shape
            packed = pipe._pack_latents(x, b, c, h, w)
            ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, cpu, x.dtype)
            # `t` is the fed σ: the pipeline's timestep σ·1000, divided by 1000 before its transformer
            out = pipe.transformer(hidden_states=packed, timestep=t, guidance=torch.full((b,), 3.5),
                                   pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                                   img_ids=ids, return_dict=False)[0]
            return pipe._unpack_latents(out, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor,
                                        pipe.vae_scale_factor)
        if family == "wan21":
            embeds, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=512,
                                           device=cpu)
            return pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=embeds, return_dict=False)[0]
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, prompt, prompt, device=cpu, do_classifier_free_guidance=False)
        return pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled,
                                return_dict=False)[0]


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "sd35", "wan21", "flux"])
def test_the_teacher_is_the_pipelines_denoiser_on_its_family_grid(folders, family):
    config = DistillConfig.from_dict({"prompts": PROMPTS, "family": family, "recipe": "auto", "lora_rank": 4})
    video = {"frames": 9} if family == "wan21" else {}  # 9 frames: 3 latent frames
    backend = make_backend(config, folder=str(folders(family)), device="cpu", height=16, width=32, **video)
    assert backend.family == family and config.sampler_preset == families.FAMILIES[family].default_preset
    pipe = _pipeline(family, folders(family))
    scale = getattr(pipe, "vae_scale_factor", None) or pipe.vae_scale_factor_spatial  # tiny VAEs: ×2; Wan's: ×8
    assert backend.latent_shape[-2:] == (16 // scale, 32 // scale)
    if video:
        assert backend.latent_shape[:2] == (16, 3)
    x = torch.randn(1, *backend.latent_shape, generator=torch.Generator().manual_seed(0))
    for step in config.timesteps[:2]:
        t = torch.tensor([step])
        feed = backend.schedule.model_timesteps[t]  # what the network is fed at that index
        with torch.no_grad():
            ours = backend.forward(x, t, backend.encode([PROMPTS[0]]), "teacher")  # the adapters off
        theirs = _pipeline_prediction(family, pipe, x, feed, PROMPTS[0])
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    if family.startswith("sd3") or family == "wan21":  # the flow preset's exact σ are pinned at the grid's indices
        sigmas = schedules.flow_shift_grid(4, presets.get_preset(config.sampler_preset).shift).sigmas[:-1]
        assert [float(backend.schedule.sigmas[t]) for t in config.timesteps] == pytest.approx(list(sigmas), abs=1e-12)
    elif family == "flux":  # Flux's size-dependent σ, fed as σ itself
        sigmas = schedules.flux_shift_grid(4, schedules.flux_mu(*backend.latent_shape[-2:])).sigmas[:-1]
        assert [float(backend.schedule.sigmas[t]) for t in config.timesteps] == pytest.approx(list(sigmas), abs=1e-12)
        assert [float(backend.schedule.model_timesteps[t]) for t in config.timesteps] == pytest.approx(list(sigmas))
    else:  # the VP presets' integer grid, on the folder's own ᾱ table
        preset = presets.get_preset(families.FAMILIES[family].default_preset)
        assert config.timesteps == list(schedules.grid_timesteps(preset.grid, 4, shift=preset.shift))


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "wan21", "flux"])
def test_the_cli_distils_it_and_the_lora_is_read_as_that_family(folders, family, tmp_path):
    out = tmp_path / "out"
    config = {"prompts": PROMPTS, "family": family, "recipe": "auto", "lora_rank": 4, "iterations": 2,
              "preview_every": 0, "checkpoint_every": 0, "output_dir": str(out),
              "teacher": {"factory": "tdm_core.distill.diffusers_folder:make_backend", "folder": str(folders(family)),
                          "device": "cpu", "height": 16, "width": 16} | ({"frames": 5} if family == "wan21" else {})}
    (tmp_path / "run.json").write_text(json.dumps(config))
    assert cli.main(["--config", str(tmp_path / "run.json"), "--no-progress"]) == 0
    lora = tdm_lora.load_lora(out / "student_lora.safetensors")
    preset = families.FAMILIES[family].default_preset
    assert (lora.family, lora.recorded_preset, lora.recorded_grid) == (family, preset, ("preset", preset))
    assert lora.modules and lora.unrecognised_keys == []
    assert any(module.delta().abs().max() > 0 for module in lora.modules.values())


def test_refusals_name_what_to_set(folders, tmp_path):
    folder = str(folders("sd15"))
    with pytest.raises(ConfigError, match='holds a sd15 pipeline: set family = "sd15"'):
        make_backend(DistillConfig(prompts=PROMPTS, family="sdxl"), folder=folder, device="cpu")
    with pytest.raises(ConfigError, match="teacher.height must be a multiple of 16"):
        make_backend(DistillConfig(prompts=PROMPTS, family="sd15"), folder=folder, device="cpu", height=60)
    config = DistillConfig(prompts=PROMPTS, family="sd15", timesteps=[999, 500, 300, 100])
    with pytest.raises(ConfigError, match="leave timesteps out"):
        make_backend(config, folder=folder, device="cpu")
    # an SD2-style folder (v-prediction) is not a family TDM distils
    import shutil

    sd2 = tmp_path / "sd2"
    shutil.copytree(folder, sd2)
    scheduler = json.loads((sd2 / "scheduler" / "scheduler_config.json").read_text())
    (sd2 / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(scheduler,
                                                                             prediction_type="v_prediction")))
    with pytest.raises(ConfigError, match="Stable Diffusion 2.x"):
        make_backend(DistillConfig(prompts=PROMPTS, family="sd15"), folder=str(sd2), device="cpu")
