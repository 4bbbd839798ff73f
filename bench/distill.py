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
    args = parser.parse_args()

    import torch

    torch.set_num_threads(max(1, args.threads))
    from tdm_core.toy.experiment import run_toy_distillation

    result = run_toy_distillation(iterations=args.iterations, eval_every=0, cache_dir=args.cache_dir,
                                  log=lambda msg: print(msg, file=sys.stderr))
    line = result.bench_line()
    line.update(switch_timings())
    print(json.dumps(line))
    return 0


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
