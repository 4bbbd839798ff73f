"""Noise schedules and the exact timestep/sigma grids of the TDM recipes (`docs/tdm_method.md` §3).

Three parametrisations, each written as `x_t = α_t x0 + σ_t ε`:

- **VP-ε** (SD1.5 / Dreamshaper): scaled-linear betas 0.00085–0.012, `α = sqrt(ᾱ)`, `σ = sqrt(1 − ᾱ)`.
  ComfyUI and k-diffusion work in the variance-exploding view of the same process, `x_ve = x_vp / α` with
  `σ_ve = sqrt((1 − ᾱ)/ᾱ)` (`ve_sigmas`), where `α = 1`.
- **VP-v** (CogVideoX-2b): the same betas, SNR shift `ᾱ ← ᾱ / (s + (1 − s) ᾱ)` (s = 3), then the zero-terminal-SNR
  rescale of `sqrt(ᾱ)`, so `ᾱ_999 = 0` and `x0 = −v` at t = 999 (`cogvideox_alphas_cumprod`).
- **Rectified flow** (SD3 / SD3.5): `α = 1 − σ`, timesteps `σ · 1000`, shifted sigmas `s u / (1 + (s − 1) u)`.
- **Rectified flow, resolution-dependent shift** (Flux): `α = 1 − σ`, the network is given σ itself, and the sigmas
  are shifted by `e^μ / (e^μ + 1/u − 1)` with μ linear in the latent's token count (`flux_mu`, diffusers'
  `calculate_shift`, ComfyUI's ModelSamplingFlux node).

`alpha_of_sigma(space, σ)` gives α for the three *state spaces* the solvers run in: "flow" (α = 1 − σ), "ve"
(α = 1, ComfyUI's space for discrete ε/v models) and "vp" (α = sqrt(1 − σ²)).

Grids return integer model timesteps, descending; they are the official recipes' lists, computed the way diffusers
0.42.1 computes them (numpy float64, then the same rounding or truncation), so that a test can compare them
element for element. Every grid is registered by name in `GRIDS`; presets refer to grids by these names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000

# Scaled-linear betas shared by SD1.5 and CogVideoX-2b (their diffusers scheduler configs).
SCALED_LINEAR_BETA_START = 0.00085
SCALED_LINEAR_BETA_END = 0.012
COGVIDEOX_SNR_SHIFT = 3.0

# The timesteps the CogVideoX-2b TDM LoRA was trained on (official README); only defined for 4 steps.
COGVIDEOX_TRAINED_TIMESTEPS = (999, 856, 665, 399)

# Flux's resolution-dependent shift (diffusers FLUX.1 scheduler config and `calculate_shift`; ComfyUI's
# ModelSamplingFlux node): μ goes linearly from 0.5 at 256 image tokens to 1.15 at 4096 (1024×1024 px), one token per
# 2×2 patch of the 8×-downsampled latent.
FLUX_BASE_SHIFT = 0.5
FLUX_MAX_SHIFT = 1.15
FLUX_BASE_SEQ_LEN = 256
FLUX_MAX_SEQ_LEN = 4096
FLUX_PATCH_SIZE = 2

# `train_tdm_demo.py`'s default `total_steps` (the README run used 900).
TRAINING_DEMO_TOTAL_STEPS = 800


# ---------------------------------------------------------------------------------------------------------------
# Noise schedules


def scaled_linear_alphas_cumprod(
    beta_start: float = SCALED_LINEAR_BETA_START,
    beta_end: float = SCALED_LINEAR_BETA_END,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
) -> torch.Tensor:
    """ᾱ_t of the "scaled_linear" schedule (betas linear in sqrt), float64."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def snr_shift_alphas_cumprod(alphas_cumprod: torch.Tensor, shift: float) -> torch.Tensor:
    """Divides the SNR ᾱ/(1 − ᾱ) by `shift` (CogVideoX's `snr_shift_scale`): ᾱ ← ᾱ / (s + (1 − s) ᾱ)."""
    return alphas_cumprod / (shift + (1.0 - shift) * alphas_cumprod)


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(ᾱ) so that ᾱ_T = 0 and ᾱ_0 is unchanged."""
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    return root**2


def sd15_alphas_cumprod() -> torch.Tensor:
    return scaled_linear_alphas_cumprod()


def cogvideox_alphas_cumprod() -> torch.Tensor:
    """CogVideoX-2b: scaled-linear betas, SNR shift 3, zero terminal SNR (ᾱ_999 = 0 exactly)."""
    shifted = snr_shift_alphas_cumprod(scaled_linear_alphas_cumprod(), COGVIDEOX_SNR_SHIFT)
    return rescale_zero_terminal_snr(shifted)


def ve_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """σ_ve = sqrt((1 − ᾱ)/ᾱ): k-diffusion's / ComfyUI's sigma of a discrete VP model (inf where ᾱ = 0)."""
    return ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()


def timestep_of_ve_sigma(alphas_cumprod: torch.Tensor, sigma: float) -> int:
    """The timestep whose VE σ is nearest to `sigma` in log σ (σ = ∞ is the timestep where ᾱ = 0)."""
    table = ve_sigmas(alphas_cumprod)
    sigma = float(sigma)
    if math.isinf(sigma):
        infinite = torch.nonzero(torch.isinf(table)).flatten()
        if len(infinite) == 0:
            raise ValueError("σ = ∞ needs a schedule with ᾱ = 0 (zero terminal SNR); this one has none")
        return int(infinite[0])
    if not sigma > 0.0:
        raise ValueError(f"σ must be positive to have a timestep, got {sigma}")
    distance = (table.log() - math.log(sigma)).abs()
    distance[~torch.isfinite(table)] = math.inf
    return int(distance.argmin())


def vp_alpha_sigma(alpha_cumprod: float) -> tuple[float, float]:
    return math.sqrt(alpha_cumprod), math.sqrt(1.0 - alpha_cumprod)


def alpha_of_sigma(space: str, sigma: float) -> float:
    """α of the state `x = α x0 + σ ε` in the solvers' state spaces ("flow", "ve", "vp")."""
    if space == "flow":
        return 1.0 - sigma
    if space == "ve":
        return 1.0
    if space == "vp":
        return math.sqrt(max(0.0, 1.0 - sigma * sigma))
    raise ValueError(f"unknown state space {space!r}; expected 'flow', 've' or 'vp'")


def log_snr_half(space: str, sigma: float) -> float:
    """λ = ln(α/σ), DPM-Solver's time variable (diffusers' `lambda_t`): +inf at σ = 0, −inf where α = 0."""
    alpha = alpha_of_sigma(space, sigma)
    if sigma <= 0.0:
        return math.inf
    if alpha <= 0.0:
        return -math.inf
    return math.log(alpha) - math.log(sigma)


def flow_shift(u: np.ndarray | float, shift: float):
    """The SD3 time shift σ = s u / (1 + (s − 1) u) (diffusers `flow_shift`, ComfyUI `time_snr_shift`)."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def flux_mu(latent_height: int, latent_width: int) -> float:
    """μ of Flux's time shift for a latent of this size (diffusers `calculate_shift` on the packed sequence length,
    identical to ComfyUI's ModelSamplingFlux node at width = 8 · latent_width, height = 8 · latent_height)."""
    tokens = (int(latent_height) // FLUX_PATCH_SIZE) * (int(latent_width) // FLUX_PATCH_SIZE)
    if tokens < 1:
        raise ValueError(f"a Flux latent needs at least {FLUX_PATCH_SIZE}×{FLUX_PATCH_SIZE} elements, got "
                         f"{latent_height}×{latent_width}")
    slope = (FLUX_MAX_SHIFT - FLUX_BASE_SHIFT) / (FLUX_MAX_SEQ_LEN - FLUX_BASE_SEQ_LEN)
    return tokens * slope + (FLUX_BASE_SHIFT - slope * FLUX_BASE_SEQ_LEN)


def flux_time_shift(mu: float, u):
    """Flux's exponential time shift σ = e^μ / (e^μ + (1/u − 1)) (diffusers `time_shift_type="exponential"`,
    ComfyUI `flux_time_shift(μ, 1, u)`); u = 1 stays 1, u = 0 stays 0."""
    u = np.asarray(u, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.where(u > 0, math.exp(mu) / (math.exp(mu) + (1.0 / np.where(u > 0, u, 1.0) - 1.0)), 0.0)


# ---------------------------------------------------------------------------------------------------------------
# Timestep grids (integer model timesteps, descending)


@dataclass(frozen=True)
class FlowGrid:
    """A rectified-flow grid as diffusers' flow DPM scheduler builds it.

    `sigmas` (float64) are what the solver uses, ending in 0; `timesteps` are the integers the model is given,
    `int(σ · 1000)` truncated in float64 before the sigmas are stored in float32 (that order is why
    `floor(float32(σ) · 1000)` is off by one for some step counts, e.g. 3 steps at shift 1: σ = 0.333, t = 332).
    """

    sigmas: tuple[float, ...]
    timesteps: tuple[int, ...]


def flow_shift_grid(steps: int, shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> FlowGrid:
    """SD3/SD3.5: diffusers `DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=shift)`.

    u_k = 1 − linspace(1, 1/N, n + 1), σ = shift(u) descending without the final 0, timesteps = int(σ·N); e.g.
    4 steps at shift 6: t = 999, 947, 856, 666 and σ = .999833, .947169, .856898, .666370, 0.
    """
    _check_steps(steps)
    alphas = np.linspace(1, 1 / num_train_timesteps, steps + 1)
    u = 1.0 - alphas
    sigmas = np.flip(flow_shift(u, float(shift)))[:-1].copy()
    timesteps = (sigmas * num_train_timesteps).astype(np.int64)
    return FlowGrid(tuple(float(s) for s in sigmas) + (0.0,), tuple(int(t) for t in timesteps))


def flux_shift_grid(steps: int, mu: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> FlowGrid:
    """Flux: FluxPipeline's grid, u = linspace(1, 1/n, n) shifted by `flux_time_shift(μ)`, then 0 (diffusers
    `FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).set_timesteps(sigmas=u, mu=μ)`). The network is
    given σ itself (diffusers: timestep / 1000 = σ), so `timesteps` (int(σ·1000)) only label the grid."""
    _check_steps(steps)
    u = np.linspace(1.0, 1.0 / steps, steps)
    sigmas = flux_time_shift(float(mu), u)
    timesteps = (sigmas * num_train_timesteps).astype(np.int64).clip(max=num_train_timesteps - 1)
    return FlowGrid(tuple(float(s) for s in sigmas) + (0.0,), tuple(int(t) for t in timesteps))


def linspace_timesteps(steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> tuple[int, ...]:
    """diffusers' "linspace" spacing of DPMSolverMultistepScheduler (the SD1.5 DDPM config): 4 steps → 999, 749,
    500, 250 (round half to even, as numpy). ComfyUI's `simple` gives 999, 749, 499, 249 instead."""
    _check_steps(steps)
    grid = np.linspace(0, num_train_timesteps - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    return tuple(int(t) for t in grid)


def trailing_timesteps(steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> tuple[int, ...]:
    """diffusers' "trailing" spacing (CogVideoXDDIMScheduler default): 4 steps → 999, 749, 499, 249."""
    _check_steps(steps)
    ratio = num_train_timesteps / steps
    grid = np.round(np.arange(num_train_timesteps, 0, -ratio)).astype(np.int64) - 1
    return tuple(int(t) for t in grid)


def cogvideox_trained_timesteps(steps: int = 4) -> tuple[int, ...]:
    """The CogVideoX-2b TDM LoRA's training timesteps; the official README warns that uniform spacing "may cause
    inferior results". Defined for 4 steps only (the LoRA is a fixed 4-step student)."""
    if steps != len(COGVIDEOX_TRAINED_TIMESTEPS):
        raise ValueError(
            f"the cogvideox_trained grid exists only for {len(COGVIDEOX_TRAINED_TIMESTEPS)} steps "
            f"({', '.join(map(str, COGVIDEOX_TRAINED_TIMESTEPS))}); got steps={steps}. Use the 'trailing' grid or "
            "custom timesteps for other step counts."
        )
    return COGVIDEOX_TRAINED_TIMESTEPS


def training_demo_timesteps(steps: int, total_steps: int = TRAINING_DEMO_TOTAL_STEPS) -> tuple[int, ...]:
    """`train_tdm_demo.py`'s student rollout: Δ = N // K, t_k = N − 1 − kΔ (N = 900, K = 4: 899, 674, 449, 224).
    Students distilled with that recipe must be sampled on this grid, starting from pure noise labelled t_0."""
    _check_steps(steps)
    if total_steps < steps:
        raise ValueError(f"training demo grid needs total_steps ≥ steps, got N={total_steps}, K={steps}")
    delta = total_steps // steps
    return tuple(total_steps - 1 - k * delta for k in range(steps))


def parse_timesteps(text: str, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> tuple[int, ...]:
    """Custom timesteps from text ("999, 856, 665, 399"): integers, strictly descending, in [0, N − 1]."""
    parts = [p for p in text.replace(";", ",").replace(" ", ",").split(",") if p.strip()]
    if not parts:
        raise ValueError("custom timesteps are empty; write integers such as '999, 856, 665, 399'")
    try:
        timesteps = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"custom timesteps must be integers, got {text!r} (e.g. '999, 856, 665, 399')") from None
    return validate_timesteps(timesteps, num_train_timesteps)


def validate_timesteps(timesteps, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> tuple[int, ...]:
    timesteps = tuple(int(t) for t in timesteps)
    if not timesteps:
        raise ValueError("a timestep grid needs at least one timestep")
    bad = [t for t in timesteps if not 0 <= t < num_train_timesteps]
    if bad:
        raise ValueError(f"timesteps must lie in [0, {num_train_timesteps - 1}], got {bad}")
    if any(a <= b for a, b in zip(timesteps[:-1], timesteps[1:], strict=True)):
        raise ValueError(f"timesteps must be strictly descending, got {list(timesteps)}")
    return timesteps


def _check_steps(steps: int) -> None:
    if int(steps) < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")


def even_timesteps(steps: int, total_steps: int) -> tuple[int, ...]:
    """`steps` timesteps spread evenly from N − 1 down: t_k = N − 1 − ⌊kN / K⌋. The training demo's rule when K divides
    N; otherwise its remainder is spread over the steps instead of left below the last one (N = 999, K = 50:
    998 … 19 here, 998 … 67 by Δ = N // K, whose last step then jumps from σ 0.18 to 0 on SD3's shift-3 schedule)."""
    _check_steps(steps)
    if total_steps < steps:
        raise ValueError(f"an even grid needs total_steps ≥ steps, got N={total_steps}, K={steps}")
    return tuple(total_steps - 1 - (k * total_steps) // steps for k in range(steps))


# Grid names used by presets and nodes. "flow_shift" also has sigmas (FlowGrid); the others are integer grids
# whose sigmas come from the model's own schedule (ve_sigmas / vp sigmas / t/1000 for flow).
GRIDS = {
    "flow_shift": lambda steps, shift=None, **_: flow_shift_grid(steps, shift).timesteps,
    # Flux: `shift` is μ (flux_mu of the latent size being sampled); without one, ComfyUI's default Flux model
    # sampling (μ = 1.15, the 1024×1024 value)
    "flux_shift": lambda steps, shift=None, **_: flux_shift_grid(steps, FLUX_MAX_SHIFT if shift is None else shift
                                                                 ).timesteps,
    "sd15_linspace": lambda steps, **_: linspace_timesteps(steps),
    "trailing": lambda steps, **_: trailing_timesteps(steps),
    "cogvideox_trained": lambda steps, **_: cogvideox_trained_timesteps(steps),
    "training_demo": lambda steps, total_steps=TRAINING_DEMO_TOTAL_STEPS, **_: training_demo_timesteps(steps, total_steps),
}


def grid_timesteps(grid: str, steps: int, shift: float | None = None,
                   total_steps: int = TRAINING_DEMO_TOTAL_STEPS) -> tuple[int, ...]:
    try:
        build = GRIDS[grid]
    except KeyError:
        raise ValueError(f"unknown timestep grid {grid!r}; known grids: {', '.join(GRIDS)}") from None
    if grid == "flow_shift" and shift is None:
        raise ValueError("the flow_shift grid needs a shift (SD3/SD3.5 TDM: 6, documented range 1–6)")

    return build(steps, shift=shift, total_steps=total_steps)


# ---------------------------------------------------------------------------------------------------------------
# From grids to the sigmas a sampler runs on


def vp_sigmas_for_timesteps(alphas_cumprod: torch.Tensor, timesteps) -> list[float]:
    """VP-space σ = sqrt(1 − ᾱ_t) at each timestep, then 0 (the final clean state, ᾱ = 1)."""
    return [math.sqrt(1.0 - float(alphas_cumprod[t])) for t in timesteps] + [0.0]


def ve_sigmas_for_timesteps(alphas_cumprod: torch.Tensor, timesteps) -> list[float]:
    """VE σ at each timestep, then 0 (diffusers' `final_sigmas_type="zero"`)."""
    table = ve_sigmas(alphas_cumprod)
    return [float(table[t]) for t in timesteps] + [0.0]


def flow_model_timestep(sigma: float, multiplier: float = NUM_TRAIN_TIMESTEPS) -> int:
    """The integer timestep diffusers gives a flow transformer for σ: `int(σ · N)` (truncation, σ ≥ 0)."""
    return int(math.floor(float(sigma) * multiplier))


def flow_sigmas_float32(sigmas, timesteps, multiplier: float = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """float32 sigmas for a flow grid whose integer timesteps survive the float32 round trip.

    Each σ is the float32 nearest to the float64 value, moved by as few ulps as needed so that
    `flow_model_timestep(σ) == t` (diffusers truncates σ·N in float64 *before* storing σ in float32, which a
    float32 σ alone cannot reproduce: 0.333 must become 0.33299997 for t = 332). The shift is at most a few ulps
    (< 1e-7 relative), far below fp32 sampling noise; the final 0 stays 0.
    """
    out = []
    for k, sigma in enumerate(sigmas):
        value = np.float32(sigma)
        if k < len(timesteps):
            target = int(timesteps[k])
            for _ in range(64):
                got = flow_model_timestep(float(value), multiplier)
                if got == target:
                    break
                value = np.nextafter(value, np.float32(np.inf if got < target else -np.inf), dtype=np.float32)
            else:
                raise ValueError(f"no float32 sigma near {sigma} maps to timestep {target}")
        out.append(float(value))
    return torch.tensor(out, dtype=torch.float32)
