"""A TDM distillation job on the tiny Wan 2.1 text-to-video teacher through a live ComfyUI server: the job finishes
at TDM Distill's default 33 frames with Wan's negative prompt as its unconditional prompt, the jobs panel's preview
(GET /tdm/jobs/<job>/preview.png) shows frames across time, and the student LoRA loads through TDM LoRA Loader and
core LoraLoader with zero unmatched keys and samples a video latent with the `wan21` preset of TDM KSampler. Few
iterations: this proves the path, not the quality."""

from __future__ import annotations

import io
import sys
import urllib.request
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_trainer_server import sample_graph as trainer_sample_graph
from test_trainer_server import start_graph, ui_text, wait_job

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from build_workflows import WAN_NEGATIVE_PROMPT  # noqa: E402  (the example workflow's value)

FAMILY = "wan21"
SIZE = 64  # pixels: the tiny twin's 8×8 latent (the workflow's 832×480 is far beyond its purpose)


def sample_graph(loader: str | None = None, lora: str = "") -> dict:
    """TDM KSampler (preset wan21, 4 steps) on a 9-frame Wan latent (3 latent frames) from the tiny twin, with the
    LoRA through TDM LoRA Loader or core LoraLoaderModelOnly, or none; the latent saved."""
    return trainer_sample_graph(FAMILY, FAMILY, 4, loader, lora, latent={
        "class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": SIZE, "height": SIZE, "length": 9,
                                                            "batch_size": 1}})


def saved_latent(server, entry: dict) -> torch.Tensor:
    saved = entry["outputs"]["save"]["latents"][0]
    return load_file(str(server.base_directory / "output" / saved["subfolder"] / saved["filename"]))["latent_tensor"]


def test_wan_job_finishes_previews_frames_across_time_and_its_student_samples_a_video(comfy_server):
    from PIL import Image

    server, name = comfy_server, "tdm_wan21_job"
    # iterations/save_every/preview_every: 3 instead of 500/100/50 to keep the CI short; frames left to the node's
    # default (33); the width/height of the tiny twin.
    server.run_prompt(start_graph(FAMILY, name, iterations=3, save_every=3, preview_every=3, width=SIZE, height=SIZE,
                                  unconditional_prompt=WAN_NEGATIVE_PROMPT))
    finished = wait_job(server, name, lambda r: r["state"] in ("finished", "failed"), timeout=600, what="ended")
    assert finished["state"] == "finished", finished["message"]
    assert finished["settings"]["comfy"]["frames"] == 33
    assert finished["settings"]["comfy"]["unconditional_prompt"] == WAN_NEGATIVE_PROMPT
    with safe_open(str(server.base_directory / "models" / "loras" / f"{name}.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["tdm.family"] == FAMILY and metadata["tdm.preset"] == FAMILY

    # the jobs panel's preview: the two prompts side by side, four of the 9 latent frames below each other
    assert finished["has_preview"]
    with urllib.request.urlopen(f"{server.url}/tdm/jobs/{finished['id']}/preview.png", timeout=30) as response:
        assert response.headers["Content-Type"] == "image/png"
        preview = np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"))
    assert preview.shape == (4 * SIZE, 2 * SIZE, 3)
    rows = [preview[i * SIZE:(i + 1) * SIZE].astype(int) for i in range(4)]
    assert all(np.abs(rows[0] - row).mean() > 1 for row in rows[1:])  # frames across time, not one frame repeated

    # the student: TDM LoRA Loader (auto strength, recorded) and core's loader apply the same patches, and change
    # the 4-step sample of a video latent
    log_before = len(server.log_tail(10**8))
    base = saved_latent(server, server.run_prompt(sample_graph()))
    tdm = server.run_prompt(sample_graph("tdm", f"{name}.safetensors"))
    core = saved_latent(server, server.run_prompt(sample_graph("core", f"{name}.safetensors")))
    report = ui_text(tdm, "lora")
    assert "strength 1 (recorded in the LoRA file)" in report and "WARNING" not in report, report
    student = saved_latent(server, tdm)
    assert student.shape == (1, 16, 3, SIZE // 8, SIZE // 8) and torch.isfinite(student).all()
    torch.testing.assert_close(student, core)
    assert not torch.allclose(student, base, atol=1e-6)
    new_log = server.log_tail(10**8)[log_before:]
    assert "lora key not loaded" not in new_log.lower(), new_log[-3000:]
