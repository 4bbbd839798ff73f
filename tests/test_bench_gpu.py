"""bench/gpu.py, the GPU benchmark, at tiny sizes on this machine: the same code a GPU session runs at real sizes
(ComfyUI's sampling path for both recipes, TDM Distill's runtime in bf16 with gradient checkpointing), so it cannot
rot between sessions that have a GPU. Checks what the line reports, not how fast (timings belong to bench/)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tdm_core import presets

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_bench_runs_tiny_and_prints_one_json_line(tmp_path):
    from tdm_devkit import comfy_runtime

    env = dict(os.environ, TDM_COMFYUI_DIR=str(comfy_runtime.comfyui_dir()))
    # the multi-device section has its own test below (it does not use ComfyUI: once per test.sh run is enough);
    # batch 2 rather than the bench's 1 and 4, so that micro_batch 1 runs each update in two passes
    result = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--tiny", "--repeats", "1",
                             "--iterations", "1", "--batches", "2", "--micro-batches", "0,1",
                             "--sections", "sampling,distill"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=900)
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
        passes = report["distill"][f"{family}.batch2.micro1"]  # the job with micro_batch 1: it trains, no cost rounds
        assert (passes["batch"], passes["micro_batch"], passes["finite"]) == (2, 1, True) and passes["it_per_s"] > 0
        assert "iteration_cost_ratio" not in passes
        distill = report["distill"][f"{family}.batch2"]
        assert distill["micro_batch"] == 0
        assert distill["finite"] is True and distill["it_per_s"] > 0 and distill["peak_mb"] > 0
        assert 1 <= distill["student_steps_per_iteration"] <= preset.steps
        # the same trainer's iteration cost against its network passes (bench/distill.py's _cost): present and sane
        assert math.isfinite(distill["iteration_cost_ratio"]) and distill["iteration_cost_ratio"] > 0
        assert distill["iteration_cost_rounds"] == 3
        assert 1 <= distill["student_forwards"] <= preset.steps
        for part in ("iteration_ms", "student_forward_ms", "fake_forward_backward_ms", "student_forward_backward_ms",
                     "teacher_forward_ms", "fake_forward_ms"):
            assert math.isfinite(distill[part]) and distill[part] > 0, part


# The headless trainer never imports ComfyUI: the multi-device section runs once per test.sh run, on its last runtime.
_ONCE_RUNTIME = os.environ.get("TDM_QUALITY_COMFYUI")


def test_the_multi_device_section_runs_data_parallel_on_two_cpu_processes(tmp_path):
    from tdm_devkit import comfy_runtime

    if _ONCE_RUNTIME is not None and Path(_ONCE_RUNTIME).resolve() != comfy_runtime.comfyui_dir().resolve():
        pytest.skip("the multi-device section runs once per test.sh run, on its newest ComfyUI")
    env = dict(os.environ, TDM_COMFYUI_DIR=str(comfy_runtime.comfyui_dir()))
    result = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--tiny", "--iterations", "2",
                             "--sections", "multi_device"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout[-2000:]
    section = json.loads(lines[0])["multi_device"]
    assert set(section["runs"]) == {"1", "2"}
    for world, run in section["runs"].items():
        assert run["world_size"] == int(world) and run["global_batch"] == 2 * int(world)
        assert run["samples_per_s"] > 0 and len(run["peak_memory_mb_per_device"]) == int(world)
        assert all(peak > 0 for peak in run["peak_memory_mb_per_device"])
    assert section["scaling_efficiency"] > 0
    assert "sampling" not in json.loads(lines[0]) or not json.loads(lines[0])["sampling"]
    # the same 2-process run with the teacher sharded (parallel fsdp): each process holds half of what DDP's holds
    (sharded,) = section["fsdp"].values()
    replicated = section["runs"]["2"]
    assert sharded["world_size"] == 2 and sharded["parallel"] == "fsdp" and sharded["sharded"] is True
    assert replicated["sharded"] is False and replicated["teacher_parameters_per_device"][0] > 0
    assert sum(sharded["teacher_parameters_per_device"]) == replicated["teacher_parameters_per_device"][0]
    assert all(0.4 <= n / replicated["teacher_parameters_per_device"][0] <= 0.6
               for n in sharded["teacher_parameters_per_device"])
    assert sharded["it_per_s"] > 0 and all(peak > 0 for peak in sharded["peak_memory_mb_per_device"])
    versus = section["fsdp_vs_ddp"]
    assert versus["it_per_s"] == {"ddp": replicated["it_per_s"], "fsdp": sharded["it_per_s"]}
    assert versus["peak_memory_ratio"] > 0 and versus["speed_ratio"] > 0


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine would run the section")
def test_the_multi_device_section_says_skipped_with_fewer_than_two_gpus():
    """On a machine with 0 or 1 CUDA device, the real-size section runs nothing (neither DDP nor FSDP) and says so."""
    spec = importlib.util.spec_from_file_location("tdm_bench_gpu", REPO / "bench" / "gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    section = gpu.bench_multi_device(tiny=False, iterations=1, per_device_batch=1)
    assert set(section) == {"skipped"} and "nothing was run" in section["skipped"]

