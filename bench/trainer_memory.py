"""Peak memory of TDM training: LoRA student + LoRA fake score on one frozen teacher vs. the official layout of three
full copies (teacher, trainable student, trainable fake score), on one model, in one run.

Model: an SD1.5-layout diffusers UNet2DConditionModel at (128, 256, 512, 512) channels (~100 M parameters, fp32),
big enough that weights, gradients and AdamW moments dominate; batch 1, 4×16×16 latent, LoRA rank 16 on attention and
feed-forward layers. Each mode runs 2 TDM iterations in a fresh subprocess. On CUDA the figure is
torch.cuda.max_memory_allocated; on CPU it is the peak resident set size (ru_maxrss) minus the resident size after
the imports, i.e. what the model and training added.

    .venv/bin/python bench/trainer_memory.py        -> {"bench":"trainer_memory","peak_lora_mb":…,"peak_full_mb":…,"ratio":…}
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


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--measure":
        print(json.dumps(measure(sys.argv[2])))
        return
    results = {}
    for mode in ("lora", "full"):
        out = subprocess.run([sys.executable, __file__, "--measure", mode], cwd=REPO, capture_output=True, text=True,
                             check=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    lora, full = results["lora"]["peak_mb"], results["full"]["peak_mb"]
    print(json.dumps({
        "bench": "trainer_memory", "peak_lora_mb": round(lora, 1), "peak_full_mb": round(full, 1),
        "ratio": round(lora / full, 3), "params_m": round(results["lora"]["params"] / 1e6, 1),
        "trainable_lora_m": round(results["lora"]["trainable"] / 1e6, 2), "device": results["lora"]["device"],
    }))


if __name__ == "__main__":
    main()
