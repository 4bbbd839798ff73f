"""The live server is real: it starts ComfyUI's main.py, loads this pack, runs a prompt end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image


def tiny_ksampler_graph(family: str, prefix: str, steps: int = 2) -> dict:
    """Injected tiny model → core KSampler → core VAEDecode → core SaveImage (API format)."""
    return {
        "model": {"class_type": "TDMTest_TinyModel", "inputs": {"family": family, "seed": 0}},
        "positive": {"class_type": "TDMTest_TinyConditioning", "inputs": {"family": family, "text": "a cat"}},
        "negative": {"class_type": "TDMTest_TinyConditioning", "inputs": {"family": family, "text": ""}},
        "latent": {"class_type": "EmptySD3LatentImage" if family != "sd15" else "EmptyLatentImage",
                   "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": ["model", 0], "positive": ["positive", 0], "negative": ["negative", 0],
            "latent_image": ["latent", 0], "seed": 7, "steps": steps, "cfg": 2.0,
            "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "vae": {"class_type": "TDMTest_TinyVAE", "inputs": {"family": family, "seed": 0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["vae", 0]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}},
    }


def test_server_runs_a_real_prompt_and_reports_success(comfy_server):
    for family in ("sd15", "sd3"):
        entry = comfy_server.run_prompt(tiny_ksampler_graph(family, f"harness_{family}"))
        assert entry["status"]["status_str"] == "success"
        images = entry["outputs"]["save"]["images"]
        assert len(images) == 1
        path = comfy_server.base_directory / "output" / images[0]["subfolder"] / images[0]["filename"]
        pixels = np.asarray(Image.open(path))
        assert pixels.shape == (128, 128, 3)
        assert pixels.std() > 0  # a real decode of a real sample, not a blank


def test_server_loads_this_pack_without_import_failure(comfy_server):
    # The whole log: the import-time line is printed once at start-up, and the session's server has run many prompts
    # by the time this test runs.
    log = comfy_server.log_tail(10**9)
    pack_lines = [line for line in log.splitlines() if "seconds" in line and line.rstrip().endswith("comfyui-tdm")]
    assert pack_lines, f"the pack's import-time line is missing:\n{log[-3000:]}"
    assert not any("IMPORT FAILED" in line for line in pack_lines), pack_lines
    info = comfy_server.object_info()
    assert "TDMTest_TinyModel" in info


def test_server_reports_a_failing_prompt(comfy_server):
    graph = tiny_ksampler_graph("sd15", "harness_bad")
    graph["sample"]["inputs"]["model"] = ["missing_node", 0]
    from tdm_devkit.server import ServerError

    # the harness must surface ComfyUI's own refusal (naming the dangling node), not hang or pass
    with pytest.raises(ServerError, match=r"/prompt refused the graph.*prompt_outputs_failed_validation.*missing_node"):
        comfy_server.run_prompt(graph)
    assert json.dumps(comfy_server.get("/system_stats"))  # still serving


def test_server_serves_the_jobs_panel_extension(comfy_server):
    """The frontend loads every script /extensions lists; ours must be among them and be served."""
    import urllib.request

    listed = comfy_server.get("/extensions")
    ours = [path for path in listed if path.endswith("/tdm_jobs.js")]
    assert ours == ["/extensions/comfyui-tdm/tdm_jobs.js"], listed
    with urllib.request.urlopen(comfy_server.url + ours[0], timeout=10) as response:
        source = response.read().decode()
    assert "registerSidebarTab" in source and "/tdm/jobs" in source
