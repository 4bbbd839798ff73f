"""Deterministic DDIM (η = 0) sampling of the toy models, with optional classifier-free guidance.

The same deterministic step the TDM student uses (predict (x̂0, ε̂), re-noise to the next grid time with ε̂), ending
with x̂0 at the last grid time; the grid and the step are the shared ones of `tdm_core.schedules` / `solvers`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .. import schedules, solvers


def uniform_grid(steps: int, num_timesteps: int = 1000) -> list[int]:
    """t_k = N−1 − kΔ, Δ = N // steps (TDM's student grid; 4 of 1000 -> 999, 749, 499, 249; 50 -> 999, 979, …, 19)."""
    if steps < 1 or steps > num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}")
    return list(schedules.training_demo_timesteps(steps, num_timesteps))


@torch.no_grad()
def ddim_sample(
    eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    timesteps: list[int],
    alphas_cumprod: torch.Tensor,
    stop_at: int | None = None,
) -> torch.Tensor:
    """DDIM from `noise` (labelled t_0 = timesteps[0]) through the descending `timesteps` to x̂0, or, with `stop_at`
    (below the last of them), to the state x at that timestep.

    eps_fn(x, t[B]) -> ε̂. x_{k+1} = α_{k+1} x̂0 + σ_{k+1} ε̂ with x̂0 = (x − σ_k ε̂)/α_k; the last step returns x̂0.
    """
    abar = alphas_cumprod.to(torch.float64)
    sigmas = schedules.vp_sigmas_for_timesteps(abar, timesteps)  # ends in 0: the last step returns x̂0
    if stop_at is not None:
        sigmas[-1] = math.sqrt(1.0 - float(abar[stop_at]))
    x = noise
    for k, t in enumerate(timesteps):
        a_t, s_t = schedules.vp_alpha_sigma(float(abar[t]))
        eps = eps_fn(x, torch.full((x.shape[0],), t, dtype=torch.long))
        x0 = (x - s_t * eps) / a_t
        x = solvers.ddim_step(x, x0, sigmas[k], sigmas[k + 1], "vp")
    return x


def vp_alphas_cumprod(kind: str, num_timesteps: int = 1000) -> torch.Tensor:
    """ᾱ_t for t = 0..N−1 (float64).

    "scaled_linear": Stable Diffusion 1.x betas, linspace(sqrt(0.00085), sqrt(0.012), N)², ᾱ_999 ≈ 0.0047;
    "cosine": Nichol & Dhariwal's cosine schedule (s = 0.008, betas clipped at 0.999).
    """
    if kind == "scaled_linear":
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, num_timesteps, dtype=torch.float64) ** 2
    elif kind == "cosine":
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    else:
        raise ValueError(f"unknown toy schedule {kind!r}; use 'scaled_linear' or 'cosine'")
    return torch.cumprod(1.0 - betas, dim=0)
