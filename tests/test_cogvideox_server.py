"""A TDM distillation job on the tiny native CogVideoX-2B teacher (upstream ComfyUI's own CogVideoX, loaded by
UNETLoader from a file in ComfyUI's layout) through a live ComfyUI server: the job finishes on the released LoRA's
grid, and its student LoRA loads through TDM LoRA Loader and core LoraLoaderModelOnly with zero unmatched keys and
samples a video latent with the `cogvideox` preset of TDM KSampler. (The pack's diffusers-backed CogVideoX teacher,
which both runtimes have, goes through the live server in tests/test_workflows.py.) Few iterations: this proves the
path, not the quality."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_trainer_server import START_DEFAULTS, sample_graph, ui_text, wait_job

from tdm_devkit import cogvideox_native

pytestmark = pytest.mark.skipif(not cogvideox_native.has_native_cogvideox(), reason=cogvideox_native.SKIP_REASON)

FILE = "tdm_test_cogvideox_2b_native.safetensors"
# The native model reads the 2B's stored position table by token index, so it trains at the 2B's own 720×480 (other
# sizes are refused); one frame (one latent frame, 1350 tokens) instead of 49 keeps a CPU iteration short.
SIZE = dict(width=720, height=480, frames=1)


def _graph(name: str) -> dict:
    # iterations 2, save_every 2, preview_every 0 instead of 500/100/50: CPU time (the Wan server test checks video
    # previews; a full-width CogVideoX VAE decode at 720×480 costs more than the job)
    return {
        "model": {"class_type": "UNETLoader", "inputs": {"unet_name": FILE, "weight_dtype": "default"}},
        "clip": {"class_type": "TDMTest_TinyCLIP", "inputs": {"family": "cogvideox"}},
        "start": {"class_type": "TDMDistillStart", "inputs": dict(
            START_DEFAULTS, model=["model", 0], clip=["clip", 0], output_name=name, iterations=2, save_every=2,
            preview_every=0, **SIZE)},
    }


def _sample_graph(loader: str | None, lora: str = "") -> dict:
    """TDM KSampler (preset cogvideox, 4 steps) on a one-frame 720×480 latent from the native file, with the LoRA
    through TDM LoRA Loader or core LoraLoaderModelOnly, or none; the latent saved."""
    graph = sample_graph("cogvideox", "cogvideox", 4, loader, lora, latent={
        "class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 720, "height": 480, "length": 1,
                                                            "batch_size": 1}})
    graph["model"] = {"class_type": "UNETLoader", "inputs": {"unet_name": FILE, "weight_dtype": "default"}}
    return graph


def _saved(server, entry: dict) -> torch.Tensor:
    saved = entry["outputs"]["save"]["latents"][0]
    return load_file(str(server.base_directory / "output" / saved["subfolder"] / saved["filename"]))["latent_tensor"]


def test_native_cogvideox_job_finishes_and_its_student_samples_a_video(comfy_server):
    server, name = comfy_server, "tdm_cogvideox_native_job"
    cogvideox_native.save_native_file(server.base_directory / "models" / "diffusion_models" / FILE)
    server.run_prompt(_graph(name))
    finished = wait_job(server, name, lambda r: r["state"] in ("finished", "failed"), timeout=600, what="ended")
    assert finished["state"] == "finished", finished["message"]
    assert finished["settings"]["config"]["timesteps"] == [999, 856, 665, 399]
    with safe_open(str(server.base_directory / "models" / "loras" / f"{name}.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["tdm.family"] == "cogvideox" and metadata["tdm.preset"] == "cogvideox"

    log_before = len(server.log_tail(10**8))
    base = _saved(server, server.run_prompt(_sample_graph(None)))
    tdm = server.run_prompt(_sample_graph("tdm", f"{name}.safetensors"))
    core = _saved(server, server.run_prompt(_sample_graph("core", f"{name}.safetensors")))
    report = ui_text(tdm, "lora")
    assert "strength 1 (recorded in the LoRA file)" in report and "WARNING" not in report, report
    student = _saved(server, tdm)
    assert student.shape == (1, 16, 1, 60, 90) and torch.isfinite(student).all()
    torch.testing.assert_close(student, core)
    assert not torch.allclose(student, base, atol=1e-6)
    new_log = server.log_tail(10**8)[log_before:]
    assert "lora key not loaded" not in new_log.lower(), new_log[-3000:]
