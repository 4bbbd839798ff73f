"""A headless teacher from a diffusers folder (tdm_core/distill/diffusers_folder.py), on the tiny CogVideoX-2b folder
(real layout, random weights): the teacher sees what the pipeline would feed it, the CLI trains it, and the student
LoRA it writes loads onto the pipeline through the pack's own CogVideoX path."""

from __future__ import annotations

import json

import pytest
import torch

from tdm_core import cogvideox, schedules
from tdm_core import lora as tdm_lora
from tdm_core.distill import ConfigError, DistillConfig, cli
from tdm_core.distill.diffusers_folder import make_backend
from tdm_devkit import cogvideox_tiny

PROMPTS = ["a red ball rolling", "a blue cube"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return cogvideox_tiny.save_tiny_cogvideox_folder(tmp_path_factory.mktemp("cogvideox") / "CogVideoX-2b")


def _config(folder, out, **changes) -> dict:
    return {"prompts": PROMPTS, "iterations": 2, "batch_size": 1, "lora_rank": 4, "preview_every": 0,
            "checkpoint_every": 0, "family": "cogvideox", "sampler_preset": "cogvideox", "steps": 4,
            "timesteps": list(schedules.COGVIDEOX_TRAINED_TIMESTEPS), "recipe": "auto", "output_dir": str(out),
            "teacher": {"factory": "tdm_core.distill.diffusers_folder:make_backend", "folder": str(folder)}} | changes


def test_the_teacher_is_fed_what_the_pipeline_feeds_its_transformer(folder):
    config = DistillConfig(prompts=PROMPTS, lora_rank=4, family="cogvideox")
    backend = make_backend(config, folder=str(folder), device="cpu")
    pipe = cogvideox.load_pipeline(folder, cogvideox.LoadOptions(dtype="fp32", vae_slicing=False, vae_tiling=False))
    with torch.no_grad():  # as the teacher encodes (and as the pipeline does under its own no_grad)
        expected, _ = pipe.encode_prompt(prompt=PROMPTS[0], do_classifier_free_guidance=False,
                                         num_videos_per_prompt=1, device=torch.device("cpu"), dtype=torch.float32)
    torch.testing.assert_close(backend.encode([PROMPTS[0]])["encoder_hidden_states"], expected, rtol=0, atol=0)
    assert backend.parametrisation == "v" and backend.family == "cogvideox"
    # the folder's own schedule: the 2B's SNR shift 3 and zero terminal SNR
    torch.testing.assert_close(backend.schedule.alphas ** 2, schedules.cogvideox_alphas_cumprod().to(
        backend.schedule.alphas.dtype), rtol=1e-6, atol=1e-9)
    transformer = pipe.transformer.config
    assert backend.latent_shape == ((transformer.sample_frames - 1) // transformer.temporal_compression_ratio + 1,
                                    16, transformer.sample_height, transformer.sample_width)


def test_the_cli_distils_it_and_the_lora_loads_on_the_pipeline(folder, tmp_path):
    (tmp_path / "run.json").write_text(json.dumps(_config(folder, tmp_path / "out")))
    assert cli.main(["--config", str(tmp_path / "run.json"), "--no-progress"]) == 0
    path = tmp_path / "out" / "student_lora.safetensors"
    lora = tdm_lora.load_lora(path)
    assert (lora.family, lora.format, lora.recorded_preset) == ("cogvideox", "peft", "cogvideox")
    assert lora.recorded_grid == ("preset", "cogvideox") and lora.unrecognised_keys == []
    pipe = cogvideox.load_pipeline(folder, cogvideox.LoadOptions(dtype="fp32", vae_slicing=False, vae_tiling=False))
    before = cogvideox.sample_latents(pipe, PROMPTS[0], num_frames=9, height=32, width=48, seed=1)
    strength, source = cogvideox.attach_lora(pipe, path)
    assert strength == 1.0, source
    after = cogvideox.sample_latents(pipe, PROMPTS[0], num_frames=9, height=32, width=48, seed=1)
    assert not torch.equal(before, after)  # the trained student's LoRA takes effect


@pytest.mark.parametrize(("teacher", "message"), [
    ({"folder": ""}, "teacher.folder must name"),
    ({"folder": "/nonexistent/folder"}, "no model_index.json"),
    ({"dtype": "int8"}, "teacher.dtype must be one of"),
])
def test_bad_teacher_settings_exit_with_the_field_named(folder, tmp_path, capsys, teacher, message):
    config = _config(folder, tmp_path / "out")
    config["teacher"] = config["teacher"] | teacher
    (tmp_path / "run.json").write_text(json.dumps(config))
    assert cli.main(["--config", str(tmp_path / "run.json"), "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "student_lora.safetensors").exists()


def test_a_folder_of_another_pipeline_is_refused_before_loading(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    with pytest.raises(ConfigError, match="'PixArtAlphaPipeline' pipeline; a diffusers-folder teacher can be "
                                          "CogVideoXPipeline, StableDiffusionPipeline"):
        make_backend(folder=str(tmp_path))
