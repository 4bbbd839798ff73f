"""CogVideoX-2B as a TDM Distill teacher through the pack's own diffusers pipeline (TDM CogVideoX Loader's output,
nodes/cogvideox_teacher.py): the teacher ComfyUI 0.3.75 has, on both runtimes, on the tiny CogVideoX-2b folder.

A job on the pipeline trains what the headless diffusers-folder teacher trains from the same folder (the same
encoded prompts, latent layout, schedule and grid, so the same LoRA), never changes the pipeline it shares weights
with, writes a LoRA the pack's CogVideoX path loads, and is refused loudly when the graph gives it two teachers, a
pipeline with a LoRA, or a size the model cannot take."""

from __future__ import annotations

import functools
import sys

import pytest
import torch
from safetensors.torch import load_file

from tdm_core import cogvideox, jobs, schedules
from tdm_core.distill import DistillConfig, TDMTrainer
from tdm_core.distill.diffusers_folder import make_backend
from tdm_core.lora import load_lora
from tdm_devkit import cogvideox_tiny

PROMPTS = ["a red fox running", "waves on a beach"]
# TDM Distill's inputs, test-sized for CPU time only: 2 iterations (node: 500), rank 4 (recipe: 16), 48×32 pixels and
# 9 frames (the tiny transformer's sample size is 12×8 latents; the real 2B trains at 720×480, 49 frames), no periodic
# saves or previews (100/50), keep_last 2 (3). grid auto, recipe auto, dtype auto and offload none are as shipped.
VALUES = dict(steps=4, grid="auto", iterations=2, lora_rank=4, lora_alpha=-1.0, learning_rate=-1.0, cfg=-1.0,
              batch_size=-1, width=48, height=32, frames=9, save_every=0, keep_last=2, preview_every=0, seed=3,
              gradient_checkpointing=False, dtype="auto", offload="none", unconditional_prompt="",
              prompts="\n".join(PROMPTS), prompts_file="(none)", output_name="tiny_cogvideox", if_exists="refuse")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return cogvideox_tiny.save_tiny_cogvideox_folder(tmp_path_factory.mktemp("cogvideox") / "CogVideoX-2b")


@pytest.fixture(scope="module")
def pipe(folder):
    with torch.inference_mode():  # as TDM CogVideoX Loader runs, inside ComfyUI's executor
        return cogvideox.load_pipeline(folder, cogvideox.LoadOptions(dtype="fp32", vae_slicing=False,
                                                                      vae_tiling=False))


def _modules(pack, name: str):
    return sys.modules[f"{pack.__name__}.nodes.{name}"]


def _start(pack, manager, pipe, **changes):
    trainer = _modules(pack, "trainer")
    check = functools.partial(_modules(pack, "inputs").check_inputs, trainer.TDMDistillStart)
    with torch.inference_mode():
        return _modules(pack, "distill_jobs").start_job(manager, None, None, dict(VALUES, **changes),
                                                         check_record=check, cogvideox=pipe)


def _sample(pipe, seed: int = 1) -> torch.Tensor:
    return cogvideox.sample_latents(pipe, PROMPTS[0], num_frames=9, height=32, width=48, seed=seed)


def test_a_job_on_the_pipeline_trains_the_headless_folder_teachers_lora_and_leaves_the_pipeline_as_it_was(
        pack, pipe, folder, tmp_path):
    before = _sample(pipe)
    weights = {name: tensor.clone() for name, tensor in pipe.transformer.state_dict().items()}
    manager = jobs.JobManager(tmp_path / "loras")
    record = manager.wait(_start(pack, manager, pipe).id, timeout=600)
    assert record.state == "finished", record.message
    settings = manager.get(record.id).settings
    config = jobs.record_config(settings["config"])
    assert config.family == "cogvideox" and config.timesteps == list(schedules.COGVIDEOX_TRAINED_TIMESTEPS)
    assert settings["grid_description"] == "cogvideox: t 999, 856, 665, 399"

    # the pipeline the job shared its weights with samples exactly as before, with no adapter in it
    assert not getattr(pipe.transformer, "peft_config", None)
    assert all(torch.equal(weights[n], t) for n, t in pipe.transformer.state_dict().items())
    torch.testing.assert_close(_sample(pipe), before, rtol=0, atol=0)

    path = manager.outputs.lora_path(record.latest_lora)
    lora = load_lora(path)
    assert (lora.family, lora.format, lora.recorded_preset, lora.unrecognised_keys) == (
        "cogvideox", "peft", "cogvideox", [])

    # The same config on the headless diffusers-folder teacher of the same folder: the same LoRA (round-off only).
    headless = DistillConfig.from_dict(dict(config.to_dict(), output_dir=str(tmp_path / "headless"),
                                            checkpoint_every=0, preview_every=0, lora_file=""))
    backend = make_backend(headless, folder=str(folder), dtype="float32", device="cpu", frames=9, height=32,
                           width=48)
    trainer = TDMTrainer(backend, headless)
    for _ in range(headless.iterations):
        trainer.step()
    expected, _ = backend.export_student_lora()
    written = load_file(str(path))
    assert set(written) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(written[name], tensor, rtol=0, atol=1e-5, msg=name)
    assert any(written[n].abs().max() > 0 for n in written if "lora_B" in n)  # it learned something

    # the student samples through with_lora: another output, the teacher pipeline still unchanged
    student, strength, source = cogvideox.with_lora(pipe, path)
    assert (strength, source) == (1.0, "recorded in the LoRA file")
    assert not torch.equal(_sample(student), before)
    torch.testing.assert_close(_sample(pipe), before, rtol=0, atol=0)
    assert student.text_encoder is pipe.text_encoder and student.vae is pipe.vae
    shared = {p.data_ptr() for p in pipe.transformer.parameters()}
    assert all(p.data_ptr() in shared for n, p in student.transformer.named_parameters() if "lora_" not in n)


def test_the_node_refuses_two_teachers_or_none(pack, pipe):
    check = _modules(pack, "cogvideox_teacher").check_teacher_inputs  # what TDM Distill runs first
    with pytest.raises(ValueError, match="teacher on cogvideox and on model, clip"):
        check(object(), object(), None, pipe)
    with pytest.raises(ValueError, match="no teacher: connect clip"):
        check(object(), None, None, None)
    check(None, None, None, pipe)  # the pipeline alone is a teacher


def test_a_pipeline_with_a_lora_or_an_impossible_size_is_refused_before_anything_trains(pack, pipe, folder, tmp_path):
    manager = jobs.JobManager(tmp_path / "loras")
    with pytest.raises(ValueError, match="multiples of 16"):
        _start(pack, manager, pipe, width=40)
    with pytest.raises(ValueError, match="4k\\+1"):
        _start(pack, manager, pipe, frames=8)
    with pytest.raises(ValueError, match="is for flow models"):
        _start(pack, manager, pipe, grid="sd3")
    with pytest.raises(ValueError, match="unconditional prompt is the empty one"):
        _start(pack, manager, pipe, unconditional_prompt="blurry")
    assert manager.list() == []

    student_file = tmp_path / "student.safetensors"
    record = manager.wait(_start(pack, manager, pipe, output_name="for_lora").id, timeout=600)
    student_file.write_bytes(manager.outputs.lora_path(record.latest_lora).read_bytes())
    with torch.inference_mode():
        with_lora = cogvideox.load_pipeline(folder, cogvideox.LoadOptions(
            dtype="fp32", lora_path=str(student_file), vae_slicing=False, vae_tiling=False))
    with pytest.raises(ValueError, match="carries a LoRA"):
        _start(pack, manager, with_lora, output_name="on_a_lora")
    with pytest.raises(cogvideox.CogVideoXError, match="already carries a LoRA"):
        cogvideox.with_lora(with_lora, student_file)


def test_a_job_on_the_pipeline_exports_to_a_headless_run_of_its_folder_that_learns_the_same_lora(
        pack, pipe, folder, tmp_path, monkeypatch):
    """The queued graph's TDM CogVideoX Loader is traced to its folder; the export's teacher is the diffusers-folder
    teacher of that folder (this ComfyUI's path to it), and the headless run of the export learns the job's LoRA."""
    import json
    import os
    import subprocess
    from pathlib import Path

    import folder_paths

    graph = {"1": {"class_type": "TDMCogVideoXLoader", "inputs": {"model_folder": folder.name, "dtype": "fp32",
                                                                   "lora_name": "none", "lora_strength": 1.0,
                                                                   "vae_tiling": False, "vae_slicing": False,
                                                                   "offload": "none"}},
             "2": {"class_type": "TDMDistillStart", "inputs": dict(VALUES, cogvideox=["1", 0])}}
    files = _modules(pack, "headless_export").trace_teacher_files(graph, "2")
    assert files == {"diffusers_folder": folder.name, "dtype": "float32"}
    graph["1"]["class_type"] = "SomeOtherLoader"
    assert "error" in _modules(pack, "headless_export").trace_teacher_files(graph, "2")

    manager = jobs.JobManager(tmp_path / "loras")
    trainer = _modules(pack, "trainer")
    check = functools.partial(_modules(pack, "inputs").check_inputs, trainer.TDMDistillStart)
    with torch.inference_mode():
        record = _modules(pack, "distill_jobs").start_job(manager, None, None, dict(VALUES, output_name="exported"),
                                                          check_record=check, teacher_files=files, cogvideox=pipe)
    try:
        assert manager.wait(record.id, timeout=600).state == "finished"
        original = folder_paths.get_folder_paths
        monkeypatch.setattr(folder_paths, "get_folder_paths",
                            lambda kind: [str(folder.parent)] if kind == "diffusers" else original(kind))
        answer = _modules(pack, "routes").headless_run(manager, record.id)
    finally:
        manager.close()
    config = answer["config"]
    assert config["teacher"] == {"factory": "tdm_core.distill.diffusers_folder:make_backend",
                                 "folder": os.path.realpath(folder), "dtype": "float32", "width": 48, "height": 32,
                                 "frames": 9}
    config.update(output_dir=str(tmp_path / "headless"), lora_file="")
    path = tmp_path / answer["file_name"]
    path.write_text(json.dumps(config))
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "tdm_core.distill", "--config", str(path), "--no-progress"],
                          cwd=repo, env=dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job_lora = load_file(str(manager.outputs.lora_path(manager.get(record.id).latest_lora)))
    run_lora = load_file(str(tmp_path / "headless" / "student_lora.safetensors"))
    assert set(job_lora) == set(run_lora)
    worst = max((job_lora[k] - run_lora[k]).abs().max().item() for k in job_lora)
    # Round-off only (this process runs torch on 2 threads, the run on 1): far below one student AdamW step (2e-5).
    assert worst <= 1e-5, worst


def test_a_pipeline_job_resumes_on_its_pipeline_and_refuses_another_teacher(pack, pipe, tmp_path):
    manager = jobs.JobManager(tmp_path / "loras")
    try:
        record = manager.wait(_start(pack, manager, pipe, output_name="resumed").id, timeout=600)
        assert (record.state, record.step) == ("finished", 2)
        more = manager.wait(_start(pack, manager, pipe, output_name="resumed", iterations=3, if_exists="resume").id,
                            timeout=600)
        assert (more.id, more.state, more.step) == (record.id, "finished", 3)
        with torch.inference_mode():
            other = cogvideox_tiny.build_tiny_cogvideox_pipeline(seed=1)  # another CogVideoX-2B: other weights
        with pytest.raises(ValueError, match="different teacher weights"):
            _start(pack, manager, other, output_name="resumed", iterations=4, if_exists="resume")
        assert manager.get(record.id).step == 3
    finally:
        manager.close()


def test_parking_a_pipeline_job_moves_only_its_adapters_while_the_pipeline_holds_the_weights(pack, pipe):
    """A waiting job parks its network off the device but the weights the pipeline itself holds there (moving them
    would free nothing and add a CPU copy). The only device here is the CPU: the test asks what parking on another
    device would move."""
    distill_jobs = _modules(pack, "distill_jobs")
    with torch.inference_mode():
        settings = distill_jobs.new_job_settings(None, dict(VALUES), PROMPTS, pipe)
        runtime, _, _ = distill_jobs.job_runtime(None, None, settings, cogvideox=pipe)
    assert runtime.shared_network is pipe.transformer
    held = _modules(pack, "training_network").weight_memory(pipe.transformer)
    moved = {id(t) for _, _, t in runtime.backend.tensors_to_move(torch.device("meta"), keep=held)}
    named = dict(runtime.backend.model.named_parameters())
    assert {n for n, p in named.items() if id(p) in moved} == {n for n in named if ".lora_" in n}
