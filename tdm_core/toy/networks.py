"""The toy teachers' network: a residual MLP that predicts ε from (x_t, t, class).

Every weight that matters is an `nn.Linear` with a stable name (`inp`, `blocks.i.fc1`, `blocks.i.fc2`,
`blocks.i.emb`, `out`, `time_mlp.0/2`), so peft LoRA targets it exactly as it targets a UNet's or a DiT's linears.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

#: Module-name suffixes a LoRA adapter targets on a `ToyEpsNet` (every linear layer).
LORA_TARGET_MODULES = ("inp", "fc1", "fc2", "emb", "out")


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer (or real) timesteps t [B] -> [B, dim], as in DDPM/Stable Diffusion."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResidualBlock(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.emb = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        y = self.fc1(F.silu(self.norm(h))) + self.emb(emb)
        return h + self.fc2(F.silu(y))


class ToyEpsNet(nn.Module):
    """ε-prediction MLP: x_t [B, dim], t [B] (integer timesteps), class ids [B] (`num_classes` = unconditional)."""

    def __init__(self, dim: int, num_classes: int, hidden: int = 256, depth: int = 3, time_dim: int = 64):
        super().__init__()
        self.dim, self.num_classes, self.hidden, self.depth, self.time_dim = dim, num_classes, hidden, depth, time_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        # One extra row: the null class, i.e. the empty prompt of classifier-free guidance.
        self.class_embed = nn.Embedding(num_classes + 1, hidden)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(ResidualBlock(hidden) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        emb = F.silu(self.time_mlp(timestep_embedding(t, self.time_dim)) + self.class_embed(labels))
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(F.silu(self.out_norm(h)))
