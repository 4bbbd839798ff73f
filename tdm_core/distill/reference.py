"""A tiny reference teacher for the distillation's own tests and examples: an MLP denoiser over a small latent.

Its weights are random (seeded), so it is no model of any data; it exercises every code path of the trainer
(ε, v and flow parametrisations, CFG, peft adapters, checkpoints, data-parallel runs) in milliseconds. The CLI builds
it from a config with `teacher = {"factory": "tdm_core.distill.reference:make_backend", ...}`. The toy teacher with
real data is `tdm_core.toy`.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from .backend import PeftBackend
from .schedule import DiscreteSchedule

LATENT_SHAPE = (2, 4, 4)
COND_DIM = 8
TARGETS = ["in_proj", "mid", "out_proj"]


class TinyDenoiser(nn.Module):
    def __init__(self, latent_shape=LATENT_SHAPE, hidden: int = 64, cond_dim: int = COND_DIM, time_dim: int = 16):
        super().__init__()
        self.latent_shape = tuple(latent_shape)
        self.time_dim = time_dim
        d = math.prod(latent_shape)
        self.in_proj = nn.Linear(d + cond_dim + time_dim, hidden)
        self.mid = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        half = self.time_dim // 2
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=x.dtype, device=x.device) / half)
        angles = t.to(x.dtype)[:, None] * freqs[None]
        h = torch.cat([x.flatten(1), cond.to(x.dtype), angles.sin(), angles.cos()], dim=1)
        h = torch.nn.functional.silu(self.in_proj(h))
        h = torch.nn.functional.silu(self.mid(h))
        return self.out_proj(h).view(x.shape)


def encode_prompts(prompts: list[str]) -> torch.Tensor:
    """A deterministic stand-in for a text encoder; the empty prompt is the zero vector (unconditional)."""
    rows = []
    for prompt in prompts:
        if prompt == "":
            rows.append(torch.zeros(COND_DIM))
        else:
            g = torch.Generator().manual_seed(zlib.crc32(prompt.encode("utf-8")))
            rows.append(torch.randn(COND_DIM, generator=g))
    return torch.stack(rows)


def make_backend(config=None, parametrisation: str = "eps", seed: int = 0, hidden: int = 64, mode: str | None = None,
                 lora_rank: int | None = None) -> PeftBackend:
    torch_state = torch.get_rng_state()
    torch.manual_seed(seed)
    model = TinyDenoiser(hidden=hidden)
    torch.set_rng_state(torch_state)
    schedule = DiscreteSchedule.flow(shift=3.0) if parametrisation == "flow" else DiscreteSchedule.scaled_linear()
    return PeftBackend(
        model, schedule=schedule, parametrisation=parametrisation, latent_shape=LATENT_SHAPE, encode=encode_prompts,
        family="reference", mode=mode or (config.mode if config is not None else "lora"),
        lora_rank=lora_rank or (config.lora_rank if config is not None else 4),
        lora_alpha=config.lora_alpha if config is not None else None,
        target_modules=(config.lora_target_modules if config is not None and config.lora_target_modules else TARGETS),
        adapter_seed=seed,
    )
