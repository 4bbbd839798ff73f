"""Headless teachers for benchmarks: real-size (or tiny) networks of a real layout with random weights, built by the
headless trainer's factory hook (`teacher = {"factory": "tdm_devkit.bench_teachers:sd15_unet", ...}`), so a multi-GPU
run measures the pass costs, memory and scaling of the real shapes with nothing to download.

Random weights are no model of any data: what these teachers give is time and memory, never quality.
"""

from __future__ import annotations

import zlib

import torch

from tdm_core.distill import DiscreteSchedule
from tdm_core.distill.backend import diffusers_backend

# SD1.5's UNet (diffusers' UNet2DConditionModel defaults are SD1.5's: 320-640-1280-1280, cross-attention 768,
# 860 M parameters) at 512² (a 64² latent), and a tiny one of the same layout for CPU runs of the same code.
SD15_SIZES = {
    "real": {"block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 768, "attention_head_dim": 8,
             "sample_size": 64, "layers_per_block": 2, "text_tokens": 77},
    "tiny": {"block_out_channels": (32, 64), "cross_attention_dim": 32, "attention_head_dim": 4, "sample_size": 8,
             "layers_per_block": 1, "text_tokens": 8,
             "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
             "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "norm_num_groups": 8},
}


def sd15_unet(config=None, size: str = "real", dtype: str = "bfloat16", gradient_checkpointing: bool = True,
              seed: int = 0, **_ignored):
    """A PeftBackend on a random-weight SD1.5-layout UNet; prompts become fixed random embeddings of the real shape
    (77 tokens × 768), the empty prompt zeros. Placed on this process's device (the CLI has set it from torchrun's
    LOCAL_RANK before any factory runs)."""
    from diffusers import UNet2DConditionModel

    if size not in SD15_SIZES:
        raise ValueError(f"size must be one of {sorted(SD15_SIZES)}, not {size!r}")
    settings = dict(SD15_SIZES[size])
    tokens = settings.pop("text_tokens")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**settings)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    unet.to(device=device, dtype=getattr(torch, dtype))
    width = settings["cross_attention_dim"]

    def encode(prompts: list[str]) -> dict:
        rows = [torch.zeros(tokens, width) if not p else
                torch.randn(tokens, width, generator=torch.Generator().manual_seed(zlib.crc32(p.encode())))
                for p in prompts]
        return {"encoder_hidden_states": torch.stack(rows).to(device=device, dtype=getattr(torch, dtype))}

    rank = config.lora_rank if config is not None else 16
    return diffusers_backend(unet, schedule=DiscreteSchedule.scaled_linear(), encode=encode, lora_rank=rank,
                             lora_alpha=config.lora_alpha if config is not None else None)
