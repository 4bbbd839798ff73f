"""Peak memory of TDM training: LoRA student + LoRA fake score on one frozen teacher vs. the official layout of three
full copies (teacher, trainable student, trainable fake score), on one model, in one run.

Model: an SD1.5-layout diffusers UNet2DConditionModel at (128, 256, 512, 512) channels (~100 M parameters, fp32),
big enough that weights, gradients and AdamW moments dominate; batch 1, 4×16×16 latent, LoRA rank 16 on attention and
feed-forward layers. Each mode runs 2 TDM iterations in a fresh subprocess. On CUDA the figure is
torch.cuda.max_memory_allocated; on CPU it is the peak resident set size (ru_maxrss) minus the resident size after
the imports, i.e. what the model and training added.

The ComfyUI job path (`comfy_job_*`): TDM Distill's own `build_runtime` and two training steps on a real-size
SD1.5 UNet in ComfyUI's layout (ComfyUI's SD15 config: 320 channels, 768-d context, ~860 M parameters, random
weights, fp32 on the CPU, batch 1, 8×8 latents, LoRA rank 16), loaded through ComfyUI's model management as a
checkpoint is. `comfy_job_ratio` = what the process added from before the teacher existed to its peak during the job
÷ the teacher's weight bytes: a job that held the teacher twice (the deep copy it used to train) measures ≥ 2, one
that trains on ComfyUI's own weights ~1. `comfy_job_ratio_copy` is the same job with the weights copied instead of
shared, measured in the same run for comparison. CPU figures (ru_maxrss); the bench needs ~12 GB of RAM.

    .venv/bin/python bench/trainer_memory.py        -> {"bench":"trainer_memory","peak_lora_mb":…,"peak_full_mb":…,"ratio":…,
                                                        "comfy_job_peak_mb":…,"teacher_mb":…,"comfy_job_ratio":…,…}
    .venv/bin/python bench/trainer_memory.py --only comfy_job      (just the ComfyUI job path)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def measure(mode: str) -> dict:
    import resource

    import torch

    sys.path.insert(0, str(REPO))
    from diffusers import UNet2DConditionModel

    from tdm_core.distill import DiscreteSchedule, DistillConfig, TDMTrainer, diffusers_backend

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    baseline = _rss_mb()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(128, 256, 512, 512),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, layers_per_block=2, cross_attention_dim=256,
        attention_head_dim=8, norm_num_groups=32,
    ).to(device)
    params = sum(p.numel() for p in unet.parameters())

    def encode(prompts):
        g = torch.Generator().manual_seed(0)
        return {"encoder_hidden_states": torch.randn(len(prompts), 8, 256, generator=g).to(device)}

    config = DistillConfig(prompts=["a cat"], batch_size=1, total_steps=1000, lora_rank=16, mode=mode)
    backend = diffusers_backend(unet, schedule=DiscreteSchedule.scaled_linear(), encode=encode,
                                latent_shape=(4, 16, 16), mode=mode, lora_rank=16)
    trainer = TDMTrainer(backend, config)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        trainer.step()
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline
    trainable = sum(p.numel() for p in trainer.student_params) + sum(p.numel() for p in trainer.fake_params)
    return {"mode": mode, "peak_mb": peak, "params": params, "trainable": trainable, "device": str(device)}


COMFY_JOB_SETTINGS = dict(steps=4, grid="auto", iterations=2, lora_rank=16, lora_alpha=0.0, learning_rate=1e-4,
                          cfg=2.0, batch_size=1, width=64, height=64, save_every=0, keep_last=1, preview_every=0,
                          seed=0, gradient_checkpointing=False, dtype="auto", offload="none", unconditional_prompt="")


def measure_comfy_job(mode: str) -> dict:
    import resource

    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "bench"))
    import gpu  # ComfyUI's real SD1.5 layout, its model builder and CLIP stand-in: one copy for both benches

    from tdm_devkit import comfy_runtime

    comfy_runtime.bootstrap()
    import comfy.model_management
    import torch

    distill_jobs = sys.modules[comfy_runtime.load_pack().__name__ + ".nodes.distill_jobs"]
    backend_module = sys.modules[distill_jobs.__name__.rsplit(".", 1)[0] + ".training_network"]
    if mode == "copy":
        backend_module._alias = lambda tensor: tensor.detach().clone()  # the weights copied, as a deep copy did
    size = gpu.SIZES["real"]["sd15"]
    baseline = _rss_mb()
    model = gpu.build_model("sd15", size, torch.float32)  # random weights, built as a checkpoint loader node does
    base = model.model
    with torch.inference_mode():
        comfy.model_management.load_models_gpu([model], force_full_load=True)
    teacher_mb = sum(p.numel() * p.element_size() for p in base.diffusion_model.parameters()) / 2**20
    with torch.inference_mode():
        runtime, _, _ = distill_jobs.build_runtime(model, gpu.BenchCLIP(size), dict(COMFY_JOB_SETTINGS), ["a cat", "a dog"])
    shared = backend_module.shares_weights(runtime.backend.model, model)
    session = runtime.build(None)
    with torch.inference_mode(False):
        for _ in range(COMFY_JOB_SETTINGS["iterations"]):
            session.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline
    return {"mode": mode, "peak_mb": peak, "teacher_mb": teacher_mb, "params": int(teacher_mb * 2**20 / 4),
            "shared_weights": shared, "comfyui": comfy_runtime.comfyui_version(),
            "device": str(comfy.model_management.get_torch_device())}


def _subprocess(*args) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], cwd=REPO, capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--measure":
        print(json.dumps(measure(sys.argv[2])))
        return
    if len(sys.argv) == 3 and sys.argv[1] == "--measure-comfy-job":
        print(json.dumps(measure_comfy_job(sys.argv[2])))
        return
    only = sys.argv[2] if len(sys.argv) == 3 and sys.argv[1] == "--only" else None
    report = {"bench": "trainer_memory"}
    if only in (None, "lora_layout"):
        results = {mode: _subprocess("--measure", mode) for mode in ("lora", "full")}
        lora, full = results["lora"]["peak_mb"], results["full"]["peak_mb"]
        report.update({
            "peak_lora_mb": round(lora, 1), "peak_full_mb": round(full, 1), "ratio": round(lora / full, 3),
            "params_m": round(results["lora"]["params"] / 1e6, 1),
            "trainable_lora_m": round(results["lora"]["trainable"] / 1e6, 2), "device": results["lora"]["device"],
        })
    if only in (None, "comfy_job"):
        shared, copied = _subprocess("--measure-comfy-job", "shared"), _subprocess("--measure-comfy-job", "copy")
        report.update({
            "comfy_job_peak_mb": round(shared["peak_mb"], 1), "teacher_mb": round(shared["teacher_mb"], 1),
            "comfy_job_ratio": round(shared["peak_mb"] / shared["teacher_mb"], 3),
            "comfy_job_ratio_copy": round(copied["peak_mb"] / copied["teacher_mb"], 3),
            "comfy_job_params_m": round(shared["params"] / 1e6, 1), "comfy_job_shared_weights": shared["shared_weights"],
            "comfy_job_comfyui": shared["comfyui"], "comfy_job_device": shared["device"],
        })
    print(json.dumps(report))


if __name__ == "__main__":
    main()
