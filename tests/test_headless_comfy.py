"""The headless trainer on ComfyUI model files (tdm_comfy), and a TDM Distill job exported to it (issue 26).

Real files on disk (a tiny SD3 diffusion model, a real-size random CLIP-L: tdm_devkit/comfy_files.py) loaded by
ComfyUI's own loader nodes, in this process for the node's job and in a `python -m tdm_core.distill` subprocess for
the headless run: the two must learn the same LoRA, from scratch and when the headless run continues the job's
checkpoint.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tdm_core import jobs
from tdm_core.distill.config import ConfigError
from tdm_devkit import comfy_files

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a cat", "a dog"]
# TDM Distill's inputs, with test-sized overrides for CPU time only: iterations 2 (node: 500), lora_rank 4 (-1: the
# recipe's 16), 64×64 (512×512), saves every step (100) so that a resume has a checkpoint, no previews (50), offload
# train_on_cpu (none: this machine has no accelerator, so both train on the CPU). Every other value is as shipped.
VALUES = dict(steps=4, grid="auto", iterations=2, lora_rank=4, lora_alpha=-1.0, learning_rate=-1.0, cfg=-1.0,
              batch_size=-1, width=64, height=64, save_every=1, keep_last=3, preview_every=0, seed=0,
              gradient_checkpointing=False, dtype="auto", offload="train_on_cpu", unconditional_prompt="",
              prompts="\n".join(PROMPTS), prompts_file="(none)", output_name="tiny_sd3_job", if_exists="refuse")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return comfy_files.write_models(tmp_path_factory.mktemp("comfy_base"))


@pytest.fixture
def comfy_folders(pack, base, monkeypatch):
    """ComfyUI's model folders of this process, with the test's folders added (restored afterwards)."""
    import copy

    import folder_paths

    monkeypatch.setattr(folder_paths, "folder_names_and_paths", copy.deepcopy(folder_paths.folder_names_and_paths))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    for folder in ("diffusion_models", "text_encoders"):
        folder_paths.add_model_folder_path(folder, str(base / "models" / folder))
    return folder_paths


def _module(pack, name):
    return sys.modules[f"{pack.__name__}.nodes.{name}"]


def _graph(**node_values) -> dict:
    """TDM Distill's queued graph in ComfyUI's API format: Load Diffusion Model and Load CLIP feed it."""
    return {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": comfy_files.TINY_SD3_FILE,
                                                          "weight_dtype": "default"}},
            "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": comfy_files.CLIP_L_FILE, "type": "sd3",
                                                          "device": "default"}},
            "3": {"class_type": "TDMDistillStart", "inputs": dict(node_values, model=["1", 0], clip=["2", 0])}}


def _start(pack, manager, **changes):
    """TDM Distill's start_job as the node runs it, on the files loaded by ComfyUI's loader nodes."""
    import nodes as comfy_nodes

    values = dict(VALUES, **changes)
    (model,) = comfy_nodes.UNETLoader().load_unet(comfy_files.TINY_SD3_FILE, "default")
    (clip,) = comfy_nodes.CLIPLoader().load_clip(comfy_files.CLIP_L_FILE, "sd3")
    trainer = _module(pack, "trainer")
    files = _module(pack, "headless_export").trace_teacher_files(_graph(**values), "3")
    with torch.inference_mode():  # as ComfyUI executes nodes
        return _module(pack, "distill_jobs").start_job(
            manager, model, clip, values, check_record=functools.partial(_module(pack, "inputs").check_inputs,
                                                                         trainer.TDMDistillStart),
            teacher_files=files)


def _headless(config: dict, path: Path, *args: str) -> dict:
    path.write_text(json.dumps(config))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "tdm_core.distill", "--config", str(path), "--no-progress", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"stdout: {proc.stdout[-1000:]}\nstderr: {proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _exported(pack, manager, record, base: Path, output_dir: Path) -> dict:
    answer = _module(pack, "routes").headless_run(manager, record.id)
    config = answer["config"]
    assert config["teacher"]["factory"] == "tdm_comfy.teacher:make_backend"
    assert {k: config["teacher"][k] for k in ("diffusion_model", "text_encoders", "clip_type", "width", "height")} == {
        "diffusion_model": comfy_files.TINY_SD3_FILE, "text_encoders": [comfy_files.CLIP_L_FILE], "clip_type": "sd3",
        "width": 64, "height": 64}
    assert config["family"] == "sd3" and config["timesteps"] and config["prompts"] == PROMPTS
    # The test's files live outside the ComfyUI tree (ComfyUI's --base-directory), and this process runs ComfyUI
    # with PyTorch attention (tdm_devkit/comfy_runtime.py): the headless run must compute as this process does.
    config["teacher"].update(base_directory=str(base), comfyui_args={"use_pytorch_cross_attention": True})
    config["output_dir"] = str(output_dir)
    assert Path(config["lora_file"]).parent == Path(manager.loras_dir)  # lands in ComfyUI's LoRA list
    return dict(answer, config=config)


def _lora(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    return load_file(str(path)), metadata


def test_a_job_exported_to_a_headless_run_learns_the_same_lora(pack, comfy_folders, base, tmp_path):
    manager = jobs.JobManager(tmp_path / "loras")
    try:
        record = _start(pack, manager)
        assert manager.wait(record.id, timeout=300).state == "finished"
        answer = _exported(pack, manager, manager.get(record.id), base, tmp_path / "headless")
        summary = _headless(answer["config"], tmp_path / answer["file_name"])
    finally:
        manager.close()
    assert summary["step"] == VALUES["iterations"]
    job_lora, job_meta = _lora(tmp_path / "loras" / "tiny_sd3_job.safetensors")
    run_lora, run_meta = _lora(tmp_path / "headless" / "student_lora.safetensors")
    assert Path(answer["config"]["lora_file"]).name == "tiny_sd3_job_headless.safetensors"
    listed, _ = _lora(Path(answer["config"]["lora_file"]))  # the same student, in models/loras
    assert all(torch.equal(listed[k], run_lora[k]) for k in run_lora)
    assert set(job_lora) == set(run_lora) and job_lora
    worst = max((job_lora[k].float() - run_lora[k].float()).abs().max().item() for k in job_lora)
    print(f"max |job − headless| = {worst:.3g}")
    # Measured 2.9e-7. One AdamW step of the student moves a weight by up to its lr (2e-5 here): a different
    # computation differs by steps, round-off by far less (this process runs torch on 2 threads, the headless
    # subprocess on 1, so sums differ in order); half a step is the line between them.
    assert worst <= 1e-5, worst
    assert any(job_lora[k].abs().max() > 0 for k in job_lora if "lora_B" in k or "lora_up" in k)
    for key in ("tdm.family", "tdm.sampler_preset", "tdm.timesteps", "tdm.steps", "tdm.recipe"):
        assert run_meta.get(key) == job_meta.get(key), key


def test_a_headless_run_continues_the_jobs_checkpoint(pack, comfy_folders, base, tmp_path):
    """The export's command resumes the job's newest checkpoint headless; the LoRA equals the job continued in
    ComfyUI to the same step."""
    manager = jobs.JobManager(tmp_path / "loras")
    try:
        record = _start(pack, manager)
        assert manager.wait(record.id, timeout=300).state == "finished"
        answer = _exported(pack, manager, manager.get(record.id), base, tmp_path / "headless")
        assert answer["resume_from"] and "--resume" in answer["command"]
        summary = _headless(answer["config"], tmp_path / answer["file_name"], "--resume", answer["resume_from"],
                            "--iterations", "4")
        continued = _start(pack, manager, iterations=4, if_exists="resume")
        assert manager.wait(continued.id, timeout=300).state == "finished"
    finally:
        manager.close()
    assert summary["step"] == 4
    metrics = [json.loads(x)["step"] for x in (tmp_path / "headless" / "metrics.jsonl").read_text().splitlines()]
    assert metrics == [3, 4]  # it started where the job's checkpoint was
    job_lora, _ = _lora(tmp_path / "loras" / "tiny_sd3_job.safetensors")
    run_lora, _ = _lora(tmp_path / "headless" / "student_lora.safetensors")
    worst = max((job_lora[k].float() - run_lora[k].float()).abs().max().item() for k in job_lora)
    print(f"max |job − headless| = {worst:.3g}")
    assert worst <= 1e-5, worst  # as above (measured 1.0e-8)


def test_a_graph_with_other_nodes_says_why_it_cannot_run_headless(pack):
    trace = _module(pack, "headless_export").trace_teacher_files
    graph = _graph()
    graph["4"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 3.0}}
    graph["3"]["inputs"]["model"] = ["4", 0]
    assert "ModelSamplingSD3 (node 4)" in trace(graph, "3")["error"]
    graph = _graph()
    graph["5"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["2", 0], "lora_name": "a.safetensors",
                                                         "strength_model": 0.5, "strength_clip": 1.0}}
    graph["3"]["inputs"].update(model=["5", 0], clip=["5", 1])
    assert trace(graph, "3") == {"diffusion_model": comfy_files.TINY_SD3_FILE, "weight_dtype": "default",
                                 "text_encoders": [comfy_files.CLIP_L_FILE], "clip_type": "sd3",
                                 "loras": [{"name": "a.safetensors", "strength_model": 0.5, "strength_clip": 1.0}]}
    graph["1"]["inputs"]["unet_name"] = ["9", 0]  # a file name from another node: not in the graph a run rebuilds
    assert "takes its unet_name from another node" in trace(graph, "3")["error"]
    assert "not available" in trace(None, "3")["error"]


def test_the_export_refuses_a_tampered_teacher_record(pack, tmp_path):
    export = _module(pack, "headless_export").headless_config
    from tdm_core.distill import DistillConfig

    record = jobs.JobRecord(id="0123456789abcdef", name="x", state="finished", iterations=2)
    settings = {"config": DistillConfig(prompts=["a"], family="sd3").to_dict(), "comfy": {}}
    record.settings = settings
    with pytest.raises(ValueError, match="no record of its teacher"):
        export(record, "/c", "/o")
    settings["teacher_files"] = {"error": "Foo (node 7) sits between"}
    with pytest.raises(ValueError, match="cannot run headless: Foo"):
        export(record, "/c", "/o")
    settings["teacher_files"] = {"checkpoint": "a.safetensors", "text_encoders": ["b.safetensors"]}
    with pytest.raises(ValueError, match="text_encoders is for teacher.diffusion_model"):
        export(record, "/c", "/o")
    settings["teacher_files"] = {"checkpoint": "a.safetensors", "loras": [{"name": 3}]}
    with pytest.raises(ValueError, match=r"loras\[0\].name"):
        export(record, "/c", "/o")


def _config(tmp_path, **teacher) -> Path:
    data = {"family": "sd3", "recipe": "auto", "prompts": ["a"], "iterations": 1, "output_dir": str(tmp_path / "out"),
            "teacher": {"factory": "tdm_comfy.teacher:make_backend", "comfyui_dir": str(REPO / ".comfyui"),
                        **teacher}}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("teacher, message", [
    ({}, "exactly one of teacher.checkpoint"),
    ({"checkpoint": "a.safetensors", "diffusion_model": "b.safetensors"}, "exactly one of teacher.checkpoint"),
    ({"diffusion_model": "b.safetensors"}, "needs teacher.text_encoders"),
    ({"diffusion_model": "b.safetensors", "text_encoders": ["c"]}, "teacher.clip_type must say"),
    ({"checkpoint": "a.safetensors", "width": 100}, "teacher.width must be a multiple of 16"),
    ({"checkpoint": "a.safetensors", "fps": 9}, "unknown teacher keys ['fps']"),
    ({"checkpoint": "a.safetensors", "frames": 8}, "teacher.frames must be 4k + 1"),
    ({"checkpoint": "a.safetensors", "comfyui_dir": "/nonexistent"}, "is not a ComfyUI folder"),
    ({"checkpoint": "a.safetensors", "comfyui_args": {"listen": True}}, "listen cannot be set"),
    ({"checkpoint": "missing.safetensors"}, "teacher.checkpoint = 'missing.safetensors' is not in ComfyUI's "
                                            "checkpoints folders"),
])
def test_config_errors_name_the_field_and_come_before_any_model_loads(tmp_path, teacher, message):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("TDM_COMFYUI_DIR", None)
    proc = subprocess.run([sys.executable, "-m", "tdm_core.distill", "--config", str(_config(tmp_path, **teacher)),
                           "--no-progress"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_the_family_is_checked_against_the_loaded_model(pack, comfy_folders, base):
    from tdm_comfy import teacher
    from tdm_core.distill import DistillConfig

    config = DistillConfig(prompts=["a"], family="flux")
    with pytest.raises(ConfigError, match="files hold a 'sd3' model"):
        teacher.make_backend(config, comfyui_dir=str(Path(sys.modules["comfy.model_management"].__file__).parents[1]),
                             diffusion_model=comfy_files.TINY_SD3_FILE, text_encoders=[comfy_files.CLIP_L_FILE],
                             clip_type="sd3", width=64, height=64)


def _documented_configs() -> list[tuple[str, dict]]:
    import re

    import tomllib

    text = (REPO / "docs" / "headless.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^### (.+?)\n.*?```toml\n(.*?)```", text, flags=re.S | re.M)
    return [(title, tomllib.loads(body)["distill"]) for title, body in blocks]


def test_every_documented_run_config_passes_the_checks_made_before_loading():
    """docs/headless.md's run.toml per family: a DistillConfig with its family's recipe, and a teacher table the
    ComfyUI-files teacher accepts (everything but the files' presence, which needs the user's ComfyUI)."""
    from tdm_core import families
    from tdm_core.distill import DistillConfig
    from tdm_core.distill.teacher_files import OPTION_DEFAULTS, TeacherFiles, check_options

    documented = _documented_configs()
    assert sorted(data["family"] for _, data in documented) == sorted(f.name for f in families.distillable())
    for title, data in documented:
        teacher = dict(data.pop("teacher"))
        config = DistillConfig.from_dict(data).validate()
        assert config.recipe == families.FAMILIES[config.family].training_recipe, title  # recipe "auto" resolved
        assert teacher.pop("factory") == "tdm_comfy.teacher:make_backend", title
        assert teacher.pop("comfyui_dir"), title
        options = {k: teacher.pop(k) for k in list(teacher) if k in OPTION_DEFAULTS}
        check_options(options)
        TeacherFiles(**teacher)


def test_a_jobs_teacher_record_survives_a_restart_and_a_bad_one_loses_nothing(tmp_path):
    """job.json is read back when ComfyUI starts: the teacher's files come back as recorded; a damaged record of them
    becomes a reason the export shows, and the job itself is still listed."""
    from tdm_core.distill import DistillConfig

    files = {"diffusion_model": "a.safetensors", "weight_dtype": "default", "text_encoders": ["b.safetensors"],
             "clip_type": "sd3", "loras": [{"name": "c.safetensors", "strength_model": 0.5, "strength_clip": 1.0}]}
    manager = jobs.JobManager(tmp_path)
    settings = {"config": DistillConfig(prompts=["a"], family="sd3").to_dict(), "comfy": {"width": 64},
                "teacher_files": files}
    good = manager.submit("good", None, 2, settings=settings)
    bad = manager.submit("bad", None, 2, settings=dict(settings, teacher_files={"checkpoint": ["x"]}))
    # a job on TDM CogVideoX Loader's pipeline records the diffusers folder (nodes/cogvideox_teacher.py)
    folder = {"diffusers_folder": "CogVideoX-2b", "dtype": "bfloat16"}
    pipe = manager.submit("pipe", None, 2, settings=dict(settings, teacher_files=folder))
    escaping = manager.submit("escaping", None, 2, settings=dict(settings, teacher_files=dict(
        folder, diffusers_folder="../../etc")))
    manager.close()
    reread = jobs.JobManager(tmp_path)
    try:
        assert reread.get(good.id).settings["teacher_files"] == files
        assert "unusable" in reread.get(bad.id).settings["teacher_files"]["error"]
        assert reread.get(pipe.id).settings["teacher_files"] == folder
        assert "'..'" in reread.get(escaping.id).settings["teacher_files"]["error"]
    finally:
        reread.close()
