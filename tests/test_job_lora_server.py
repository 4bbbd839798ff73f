"""TDM LoRA from Distill Job through a live ComfyUI server with the injected tiny SD3 teacher: a finished job's LoRA
samples exactly as TDM LoRA Loader applies the same file and is then served from ComfyUI's cache; `latest` before
the first save, Cancel while waiting, a stopped job's checkpoint, a failed job, an unknown job and a LoRA file that
resolves outside models/loras each give what the node's help page promises."""

from __future__ import annotations

import shutil
import time

import pytest
import torch
from safetensors.torch import save_file
from test_trainer_server import job, post_status, sample_graph, saved_latent, start_graph, ui_text, wait_job

from tdm_devkit.server import ServerError


def job_lora_graph(job_ref: str, use: str = "finished") -> dict:
    """The tiny SD3 teacher → TDM LoRA from Distill Job → TDM KSampler (sd3 preset) → SaveLatent, with the node's
    lora_name output shown by PreviewAny."""
    graph = sample_graph("sd3", "sd3", 4)
    graph["lora"] = {"class_type": "TDMDistillLoraLoader", "inputs": {
        "model": ["model", 0], "job": job_ref, "use": use, "strength_mode": "auto", "strength": 1.0}}
    graph["sample"]["inputs"]["model"] = ["lora", 0]
    graph["name"] = {"class_type": "PreviewAny", "inputs": {"source": ["lora", 2]}}
    return graph


def execution_start(entry: dict) -> float:
    """When ComfyUI began the prompt (ms since the epoch, the server's clock), from its history entry."""
    return next(data["timestamp"] for kind, data in entry["status"]["messages"] if kind == "execution_start")


def cached_nodes(entry: dict) -> list[str]:
    return [node for kind, data in entry["status"]["messages"] if kind == "execution_cached" for node in data["nodes"]]


def test_finished_job_samples_like_tdm_lora_loader_and_is_then_served_from_the_cache(comfy_server):
    server, name = comfy_server, "tdm_joblora_done"
    # iterations/save_every 3: a test-sized job (CPU time); one save, at the end
    server.run_prompt(start_graph("sd3", name, iterations=3, save_every=3, preview_every=0))
    entry = server.run_prompt(job_lora_graph(name))  # waits for the job to finish
    report = ui_text(entry, "lora")
    assert f"from TDM job {job(server, name)['id']} '{name}': {name}.safetensors, its final LoRA (step 3 of 3)" \
        in report, report
    assert "strength 1 (recorded in the LoRA file)" in report and "WARNING" not in report, report
    assert ui_text(entry, "name") == f"{name}.safetensors"
    # Queued while the job trained, the node ran unkeyed; from the first queue after the job ended it has a stable
    # key, so the next unchanged queue is served from ComfyUI's cache (which keeps the previous prompt's outputs:
    # nothing else may run in between). A 3-iteration job may end before the first queue began (one thread per test
    # worker is fast): then that queue was keyed already, and the very next one is served from the cache.
    ended_before_the_first_queue = job(server, name)["updated"] * 1000 < execution_start(entry)
    assert ("lora" in cached_nodes(server.run_prompt(job_lora_graph(name)))) == ended_before_the_first_queue
    assert "lora" in cached_nodes(server.run_prompt(job_lora_graph(name)))

    # the same file through TDM LoRA Loader: the same patches, so the same 4-step sample
    by_file = server.run_prompt(sample_graph("sd3", "sd3", 4, "tdm", f"{name}.safetensors"))
    torch.testing.assert_close(saved_latent(server, entry), saved_latent(server, by_file))
    # by job id as by output name
    by_id = job_lora_graph(job(server, name)["id"])
    server.run_prompt(by_id)
    assert "lora" in cached_nodes(server.run_prompt(by_id))


def test_the_waiting_node_shows_the_jobs_progress(comfy_server):
    """Issue 27: a graph that waits for training sat at 0 % on the waiting node while the job ran. The node's
    progress bar now follows the job's steps (the messages the browser gets on /ws); the last one is the job's end.
    Intermediate values depend on timing (the node looks once a second), so only their order is asserted."""
    server, name = comfy_server, "tdm_joblora_progress"
    server.run_prompt(start_graph("sd3", name, iterations=12, save_every=12, preview_every=0))
    _, messages = server.run_prompt_watching(job_lora_graph(name))
    progress = [(m["data"]["value"], m["data"]["max"]) for m in messages
                if m["type"] == "progress" and m["data"].get("node") == "lora"]
    assert progress and progress[-1] == (12, 12), progress
    assert all(total == 12 for _, total in progress), progress
    assert [value for value, _ in progress] == sorted(value for value, _ in progress), progress


def test_latest_before_the_first_save_cancel_while_waiting_and_a_stopped_job(comfy_server):
    server, name = comfy_server, "tdm_joblora_stopped"
    # iterations 400, save_every 100: a job still far from its first save when the node asks (CPU time aside, the
    # node's defaults are 500/100)
    server.run_prompt(start_graph("sd3", name, iterations=400, save_every=100, preview_every=0))
    wait_job(server, name, lambda r: r["state"] == "running" and r["step"] >= 1, what="started")
    with pytest.raises(ServerError) as refused:
        server.run_prompt(job_lora_graph(name, use="latest"))
    message = str(refused.value)
    assert "has not saved a LoRA yet (running, step" in message, message
    assert "its first LoRA is saved at step 100 (save_every 100)" in message and "set use to 'finished'" in message

    # Cancel ends the node's wait for the job, not the job
    prompt_id = server.queue_prompt(job_lora_graph(name))
    deadline = time.monotonic() + 60
    while not server.get("/queue")["queue_running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.5)  # the prompt's other nodes are cached: it is in the node's wait now
    step = job(server, name)["step"]
    server.post("/interrupt", {})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        entry = server.get(f"/history/{prompt_id}").get(prompt_id)
        if entry and entry["status"].get("completed") is not None:
            break
        time.sleep(0.1)
    assert [kind for kind, _ in entry["status"]["messages"]][-1] == "execution_interrupted", entry["status"]
    assert wait_job(server, name, lambda r: r["step"] > step + 1, what="trained on after Cancel")["state"] == "running"

    code, _ = post_status(server, f"/tdm/jobs/{name}/stop")
    assert code == 200
    stopped = wait_job(server, name, lambda r: r["state"] == "stopped", what="stopped")
    report = ui_text(server.run_prompt(job_lora_graph(name)), "lora")
    assert (f"the job was stopped at step {stopped['step']} of 400: the LoRA of its last checkpoint "
            f"(step {stopped['checkpoint_step']})") in report, report
    assert stopped["checkpoint_step"] == stopped["step"] > 0


def test_failed_and_unknown_jobs_are_errors_that_say_why(comfy_server):
    server, name = comfy_server, "tdm_joblora_nan"
    loras = server.base_directory / "models" / "loras"
    # A teacher patched with a broken (NaN) LoRA fails at its first step, before any save (as in test_trainer_server)
    save_file({"diffusion_model.joint_blocks.0.x_block.mlp.fc2.lora_up.weight": torch.full((128, 4), float("nan")),
               "diffusion_model.joint_blocks.0.x_block.mlp.fc2.lora_down.weight": torch.ones((4, 512))},
              str(loras / "joblora_broken_nan.safetensors"))
    server.run_prompt(start_graph("sd3", name, lora="joblora_broken_nan.safetensors", iterations=5))
    with pytest.raises(ServerError) as failed:
        server.run_prompt(job_lora_graph(name))
    message = str(failed.value)
    assert f"'{name}' failed at step 0 of 5: " in message and "loss became non-finite" in message, message
    assert "fix the cause and start it again" in message
    with pytest.raises(ServerError, match="is failed at step 0 of 5 and never saved a LoRA"):
        server.run_prompt(job_lora_graph(name, use="latest"))

    with pytest.raises(ServerError, match="no TDM job with id or output name 'tdm_no_such_job'"):
        server.run_prompt(job_lora_graph("tdm_no_such_job"))
    # Refused once, on `use`: by ComfyUI's own combo check where it has one (upstream), else by the node at execute
    # (0.3.75 checks no V3 combo).
    with pytest.raises(ServerError, match=r"input 'use' 'soon' is not one of the choices|use: 'soon' not in \["):
        server.run_prompt(job_lora_graph(name, use="soon"))


def test_a_lora_file_that_resolves_outside_the_lora_folder_is_refused(comfy_server, tmp_path):
    server, name = comfy_server, "tdm_joblora_link"
    loras = server.base_directory / "models" / "loras"
    server.run_prompt(start_graph("sd3", name, iterations=2, save_every=2, preview_every=0))
    job_id = wait_job(server, name, lambda r: r["state"] == "finished", what="finished")["id"]
    # the job's file replaced by a link to a file elsewhere: the record's name is fine, where it leads is not
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(loras / f"{name}.safetensors", outside)
    (loras / f"{name}.safetensors").symlink_to(outside)
    with pytest.raises(ServerError, match="its record names a LoRA file outside models/loras, refused"):
        server.run_prompt(job_lora_graph(job_id))
    # by output name the job manager already refuses the name (it resolves outside the LoRA folder)
    with pytest.raises(ServerError, match=f"no TDM job with id or output name '{name}'"):
        server.run_prompt(job_lora_graph(name))
