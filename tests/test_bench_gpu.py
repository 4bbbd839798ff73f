"""bench/gpu.py, the GPU benchmark, at tiny sizes on this machine: the same code a GPU session runs at real sizes
(ComfyUI's sampling path for both recipes, TDM Distill's runtime in bf16 with gradient checkpointing), so it cannot
rot between sessions that have a GPU. Checks what the line reports, not how fast (timings belong to bench/)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tdm_core import presets

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_bench_runs_tiny_and_prints_one_json_line(tmp_path):
    from tdm_devkit import comfy_runtime

    env = dict(os.environ, TDM_COMFYUI_DIR=str(comfy_runtime.comfyui_dir()))
    result = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--tiny", "--repeats", "1",
                             "--iterations", "1", "--batches", "1"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout[-2000:]
    report = json.loads(lines[0])
    assert report["bench"] == "gpu" and report["sizes"] == "tiny"
    assert report["comfyui"] == comfy_runtime.comfyui_version()
    for family, preset_name in (("sd15", "dreamshaper"), ("sd3", "sd3")):
        preset = presets.get_preset(preset_name)
        sampling = report["sampling"][family]
        # the TDM KSampler's 4 evaluations at CFG 1 against the base recipe's steps × 2 (CFG)
        assert (sampling["nfe_tdm"], sampling["nfe_teacher"]) == (preset.nfe, preset.teacher.nfe)
        assert sampling["time_tdm_s"] > 0 and sampling["time_teacher_s"] > 0
        distill = report["distill"][f"{family}.batch1"]
        assert distill["finite"] is True and distill["it_per_s"] > 0 and distill["peak_mb"] > 0
        assert 1 <= distill["student_steps_per_iteration"] <= preset.steps
