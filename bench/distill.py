"""Offline TDM benchmark on the toy digits teacher; prints ONE JSON line.

    .venv/bin/python bench/distill.py [--iterations 500] [--threads 1]

{"bench": "distill", "fd_teacher_50", "fd_teacher_4", "fd_tdm_4", "acc_teacher_50", "acc_tdm_4", "iterations",
 "seconds", "nfe_per_iteration", ...}. FD: Fréchet distance between 2000 generated digits (200 per class, fixed
noise seed 0) and all 1797 real digits on their 64 pixels clamped to [-1, 1] (fd_clf_*: on the 64-d penultimate
features of a fixed classifier trained once with seed 0); acc: that classifier's agreement with the requested class,
averaged over classes (definitions in tdm_core/toy/metrics.py). Teacher: no CFG (cfg 1.0; see "cfg" in the line), DDIM on 999..19 (50 steps) or 999, 749, 499, 249 (4 steps); TDM student:
its own 4 steps on that grid, no CFG. "seconds" is the TDM training time (evaluation excluded).
Goals (issue 6): fd_tdm_4 ≤ 1.1 × fd_teacher_50 within ≤ 500 iterations; fd_teacher_4 ≥ 2 × fd_teacher_50.
student_steps_per_iteration: the rollout's student evaluations per iteration, averaged over the run (the full
rollout would be K = "student_steps_full_rollout"). switch_ms_per_iteration: CPU time of the five adapter switches
of one iteration (student, fake, student, teacher, fake) on the 137 M-parameter SD1.5-layout UNet of
bench/trainer_memory.py with rank-16 adapters, the trainer's switch ("switch_ms_per_iteration") against peft's
public per-layer switch plus the requires_grad walk it needs ("switch_ms_per_iteration_peft_public"); goal ≤ 5 ms.
iteration_cost_ratio_toy / _sd15 (goal ≤ 1.15): one training iteration's wall time ÷ the wall time of exactly the
network passes it makes, each timed alone on the same shapes in the same run (see iteration_cost), with the parts in
ms. `--only cost` prints just the switch and cost figures (about 3 minutes and 4 GB of RAM on 2 CPU cores);
`--only quality` just the toy distillation's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--only", choices=("quality", "cost"), default=None,
                        help="just the toy distillation's figures, or just the iteration cost and switch timings")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(max(1, args.threads))
    from tdm_core.toy.experiment import run_toy_distillation

    line = {"bench": "distill"}
    if args.only != "cost":
        result = run_toy_distillation(iterations=args.iterations, eval_every=0, cache_dir=args.cache_dir,
                                      log=lambda msg: print(msg, file=sys.stderr))
        line = result.bench_line()
    if args.only != "quality":
        line.update(switch_timings())
        line.update(iteration_cost(args.cache_dir))
    print(json.dumps(line))
    return 0


def network_passes(trainer) -> dict:
    """The network passes one TDM iteration makes, as calls to time alone on the iteration's shapes with their adapter
    already active: a student forward without grad (the rollout makes `forwards` of them), the fake score's
    forward+backward, the student's forward+backward, the teacher's forward (conditional and unconditional in one
    batch when cfg ≠ 1) and the fake score's forward without grad. Backward passes reach the adapter weights only, as
    in training; their gradients are dropped after each call."""
    import torch

    from tdm_core.distill.backend import forward_pair

    backend, batch = trainer.backend, trainer.local_batch
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((batch, *backend.latent_shape), generator=generator).to(trainer.device)
    t = torch.full((batch,), trainer.grid[1], dtype=torch.long, device=trainer.device)
    prompts = [trainer.config.prompts[i % len(trainer.config.prompts)] for i in range(batch)]
    cond = backend.encode(prompts)
    uncond = backend.uncond(batch) if trainer.config.cfg != 1.0 else None

    def no_grad(adapter):
        def run():
            with torch.no_grad():
                backend.forward(x, t, cond, adapter)
        return run

    def with_grad(adapter):
        params = backend.trainable_parameters(adapter)

        def run():
            backend.forward(x, t, cond, adapter).square().mean().backward()
            for param in params:
                param.grad = None
        return run

    def teacher():
        with torch.no_grad():
            if uncond is None:
                backend.forward(x, t, cond, "teacher")
            else:
                forward_pair(backend, x, t, cond, uncond, "teacher")

    return {"student_forward": no_grad("student"), "fake_forward_backward": with_grad("fake"),
            "student_forward_backward": with_grad("student"), "teacher_forward": teacher,
            "fake_forward": no_grad("fake")}


def _cost(trainer, rounds: int, warmup: int = 2) -> dict:
    """`warmup` untimed training steps, then one training step and each of its network passes alone (each after one
    untimed call that activates its adapter, as the step's own switches do), `rounds` times in turn, so that a
    machine's drifting speed weighs on both alike; medians. ratio = step ÷ (forwards × student forward + the other
    passes). On a CUDA trainer every timing waits for the device before and after (torch.cuda.synchronize): its
    kernels run asynchronously, and the clock would otherwise read when they were queued, not when they ran."""
    import statistics
    import time

    import torch

    device = torch.device(trainer.device)

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(run):
        synchronize()
        start = time.perf_counter()
        out = run()
        synchronize()
        return time.perf_counter() - start, out

    with torch.inference_mode(False), torch.enable_grad():  # ComfyUI's nodes run under inference mode
        passes = network_passes(trainer)
        for _ in range(warmup):
            trainer.step()
        steps, forwards, parts = [], [], {name: [] for name in passes}
        for _ in range(rounds):
            seconds, metrics = timed(trainer.step)
            steps.append(seconds)
            forwards.append(metrics["student_steps"])
            for name, run in passes.items():
                run()
                parts[name].append(timed(run)[0])
    step = statistics.median(steps)
    part = {name: statistics.median(times) for name, times in parts.items()}
    mean_forwards = sum(forwards) / len(forwards)
    floor = mean_forwards * part["student_forward"] + sum(v for k, v in part.items() if k != "student_forward")
    return {"iteration_s": round(step, 4), "ratio": round(step / floor, 3), "student_forwards": round(mean_forwards, 2),
            **{f"{k}_ms": round(v * 1000, 3) for k, v in part.items()}}


def iteration_cost(cache_dir=None, sd15_rounds: int = 5) -> dict:
    """`iteration_cost_ratio_*`: the wall time of one training iteration ÷ the wall time of the network passes it
    needs (network_passes, timed in turn with the steps by _cost), same run, same shapes; goal ≤ 1.15. Host syncs, copies, adapter switches, the loss
    arithmetic, optimiser steps and logging are what the ratio adds above 1. On the toy digits teacher (batch 256 as
    the toy recipe) and on a real-size SD1.5 UNet in ComfyUI's layout through TDM Distill's own job runtime (random
    weights, fp32 CPU, batch 1, 64×64 px: 8×8 latents, cfg 2)."""
    from tdm_core.distill import TDMTrainer
    from tdm_core.toy.backend import ToyBackend
    from tdm_core.toy.experiment import digits_distill_config
    from tdm_core.toy.teacher import DIGITS_TEACHER, load_or_train_teacher

    teacher = load_or_train_teacher(DIGITS_TEACHER, cache_dir, log=lambda msg: print(msg, file=sys.stderr))
    config = digits_distill_config(iterations=1000)
    toy = _cost(TDMTrainer(ToyBackend(teacher, lora_rank=config.lora_rank, adapter_seed=config.seed), config), 60)
    sd15 = _cost(_comfy_sd15_trainer(), sd15_rounds)
    out = {"iteration_cost_ratio_toy": toy.pop("ratio"), "iteration_cost_ratio_sd15": sd15.pop("ratio"),
           "iteration_cost_goal": 1.15}
    out.update({f"iteration_cost_toy_{k}": v for k, v in toy.items()})
    out.update({f"iteration_cost_sd15_{k}": v for k, v in sd15.items()})
    return out


def _comfy_sd15_trainer():
    """TDM Distill's runtime on a real-size SD1.5 UNet as a ComfyUI checkpoint loader builds it (bench/gpu.py's
    model builder and CLIP stand-in), the trainer of the job session."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gpu
    import trainer_memory

    from tdm_devkit import comfy_runtime

    comfy_runtime.bootstrap()
    import comfy.model_management
    import torch

    distill_jobs = sys.modules[comfy_runtime.load_pack().__name__ + ".nodes.distill_jobs"]
    size = gpu.SIZES["real"]["sd15"]
    model = gpu.build_model("sd15", size, torch.float32)
    with torch.inference_mode():
        comfy.model_management.load_models_gpu([model], force_full_load=True)
        runtime, _, _ = distill_jobs.build_runtime(model, gpu.BenchCLIP(size),
                                                     dict(trainer_memory.COMFY_JOB_SETTINGS, iterations=1000),
                                                     ["a cat", "a dog"])
    return runtime.build(None).trainer


SWITCHES_PER_ITERATION = ("student", "fake", "student", "teacher", "fake")


def switch_timings(iterations: int = 40) -> dict:
    import time

    import torch
    from diffusers import UNet2DConditionModel

    from tdm_core.distill import DiscreteSchedule, diffusers_backend
    from tdm_core.distill.backend import switch_adapter

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(128, 256, 512, 512),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, layers_per_block=2, cross_attention_dim=256,
        attention_head_dim=8, norm_num_groups=32)
    backend = diffusers_backend(unet, schedule=DiscreteSchedule.scaled_linear(), encode=lambda prompts: {},
                                latent_shape=(4, 16, 16), lora_rank=16)
    layers = backend._layers
    trainable = [p for name in ("student", "fake") for _, p in backend._params[name]]

    def peft_public(adapter):
        for layer in layers:
            if adapter == "teacher":
                layer.enable_adapters(False)
            else:
                layer.enable_adapters(True)
                layer.set_adapter(adapter)
        for param in trainable:  # set_adapter freezes the other adapter; the trainer needs both trainable
            param.requires_grad_(True)

    def per_iteration_ms(switch) -> float:
        for adapter in SWITCHES_PER_ITERATION:
            switch(adapter)
        start = time.perf_counter()
        for _ in range(iterations):
            for adapter in SWITCHES_PER_ITERATION:
                switch(adapter)
        return (time.perf_counter() - start) / iterations * 1000

    return {"switch_ms_per_iteration": round(per_iteration_ms(lambda a: switch_adapter(layers, a)), 3),
            "switch_ms_per_iteration_peft_public": round(per_iteration_ms(peft_public), 3),
            "switch_goal_ms": 5.0, "switch_lora_layers": len(layers),
            "switch_model_params_m": round(sum(p.numel() for n, p in unet.named_parameters() if ".lora_" not in n)
                                           / 1e6, 1)}


if __name__ == "__main__":
    raise SystemExit(main())
