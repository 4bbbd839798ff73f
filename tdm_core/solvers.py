"""Few-step TDM samplers as short pure functions, k-diffusion style (`f(model, x, sigmas, extra_args, callback,
disable, **options)`, the model returns x0), plus the per-step formulas they are made of.

Every solver runs in a *state space* where `x = α x0 + σ ε` (`schedules.alpha_of_sigma`): "flow" (α = 1 − σ,
SD3/SD3.5, ComfyUI's and diffusers' flow state), "ve" (α = 1, k-diffusion's/ComfyUI's view of discrete ε/v
models) and "vp" (α = sqrt(1 − σ²), diffusers' view of VP models, which holds ᾱ = 0 exactly for CogVideoX).

- `sample_ddim`: the deterministic TDM/DDIM step `x_s = α_s x̂0 + σ_s ε̂`, ε̂ = (x − α x̂0)/σ — the student's own
  rollout in the TDM paper. Optional `gamma` (TCD-style, an *extension*, not part of TDM, which is deterministic):
  DDIM to s = ⌊(1 − γ) t_next⌋, then forward-noise s → t_next with fresh noise; γ = 0 is DDIM exactly.
- `sample_dpmpp_2m`: DPM-Solver++(2M) with diffusers' semantics (`DPMSolverMultistepScheduler`, dpmsolver++,
  order 2, midpoint): λ = ln(α/σ) of the state space, first step first order, final step (σ = 0) first order.
  In "flow" space this is the flow-aware solver of the SD3 TDM recipe; ComfyUI's `dpmpp_2m` uses λ = −ln σ,
  which is the "ve" case and is *not* equivalent on flow models. In "ve" space it is the SD1.5 ε DPM++(2M).
- `sample_ddim_v_timesteps`: v-prediction DDIM at arbitrary integer timesteps (CogVideoX's trained
  999/856/665/399, which diffusers' `CogVideoXDDIMScheduler` cannot hit: it steps by a fixed stride 1000 // n).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from . import schedules

try:  # console progress like k-diffusion; tqdm ships with ComfyUI and diffusers, but tdm_core must not need it
    from tqdm.auto import trange
except ImportError:  # pragma: no cover
    def trange(n, disable=None):
        return range(n)


# ---------------------------------------------------------------------------------------------------------------
# One step of each solver (scalars are Python floats: exact float64 coefficients, no device syncs)


def ddim_step(x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float, space: str) -> torch.Tensor:
    """Deterministic DDIM / TDM re-noise: x_s = α_s x̂0 + σ_s ε̂ with the model's own ε̂ = (x − α x̂0)/σ.

    Written as x_s = (σ_s/σ) x + (α_s − α σ_s/σ) x̂0 (diffusers' `a_t`, `b_t` of CogVideoXDDIMScheduler.step).
    """
    alpha, alpha_next = schedules.alpha_of_sigma(space, sigma), schedules.alpha_of_sigma(space, sigma_next)
    if sigma_next == 0.0:
        return alpha_next * denoised
    ratio = sigma_next / sigma
    return ratio * x + (alpha_next - alpha * ratio) * denoised


def forward_noise(x: torch.Tensor, sigma: float, sigma_next: float, noise: torch.Tensor, space: str) -> torch.Tensor:
    """The forward kernel from noise level σ to a higher σ': x' = (α'/α) x + β z, β = sqrt(σ'² − (α' σ/α)²)."""
    alpha, alpha_next = schedules.alpha_of_sigma(space, sigma), schedules.alpha_of_sigma(space, sigma_next)
    scale = alpha_next / alpha
    beta = math.sqrt(max(0.0, sigma_next**2 - (scale * sigma) ** 2))
    return scale * x + beta * noise


def dpmpp_2m_step(x: torch.Tensor, denoised: torch.Tensor, old_denoised: torch.Tensor | None, sigma: float,
                  sigma_next: float, sigma_prev: float | None, space: str) -> torch.Tensor:
    """DPM-Solver++(2M), data prediction, diffusers' midpoint form.

    1st order: x' = (σ'/σ) x − α'(e^{−h} − 1) D,  h = λ' − λ,  λ = ln(α/σ).
    2nd order: D ← D + (D − D_prev)/(2r),  r = (λ − λ_prev)/h.  σ' = 0 always takes the first-order step (x' = D).
    """
    alpha_next = schedules.alpha_of_sigma(space, sigma_next)
    if sigma_next == 0.0:
        return alpha_next * denoised
    lam, lam_next = schedules.log_snr_half(space, sigma), schedules.log_snr_half(space, sigma_next)
    h = lam_next - lam
    phi = -math.expm1(-h)  # 1 − e^{−h}
    if old_denoised is not None:
        r = (lam - schedules.log_snr_half(space, sigma_prev)) / h
        if math.isfinite(r):
            denoised = denoised + (denoised - old_denoised) * (1.0 / (2.0 * r))
    return (sigma_next / sigma) * x + (alpha_next * phi) * denoised


# ---------------------------------------------------------------------------------------------------------------
# Samplers


def default_noise_sampler(x: torch.Tensor, seed: int | None = None) -> Callable[[float, float], torch.Tensor]:
    generator = torch.Generator(device=x.device)
    if seed is not None:
        generator.manual_seed(int(seed))
    else:
        generator.seed()
    return lambda sigma, sigma_next: torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype,
                                                 layout=x.layout)


def flow_timestep_of_sigma(sigma: float) -> float:
    return sigma * schedules.NUM_TRAIN_TIMESTEPS


def flow_sigma_of_timestep(timestep: float) -> float:
    return timestep / schedules.NUM_TRAIN_TIMESTEPS


@torch.no_grad()
def sample_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, space: str = "ve",
                gamma: float = 0.0, noise_sampler=None, timestep_of_sigma=None, sigma_of_timestep=None):
    """Deterministic TDM/DDIM sampler (γ = 0); γ > 0 is the TCD-style stochastic extension.

    With γ > 0, each step goes by DDIM to the timestep s = ⌊(1 − γ) t_next⌋ and forward-noises s → t_next with
    fresh noise; `timestep_of_sigma` / `sigma_of_timestep` map between σ and model timesteps (defaults: the flow
    relation t = 1000 σ).
    """
    extra_args = {} if extra_args is None else extra_args
    gamma = float(gamma)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1] (0 = deterministic TDM), got {gamma}")
    if gamma > 0.0:
        noise_sampler = noise_sampler or default_noise_sampler(x, extra_args.get("seed"))
        timestep_of_sigma = timestep_of_sigma or flow_timestep_of_sigma
        sigma_of_timestep = sigma_of_timestep or flow_sigma_of_timestep
    levels = [float(s) for s in sigmas.tolist()]
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(levels) - 1, disable=disable):
        sigma, sigma_next = levels[i], levels[i + 1]
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if gamma > 0.0 and sigma_next > 0.0:
            sigma_s = float(sigma_of_timestep(math.floor((1.0 - gamma) * timestep_of_sigma(sigma_next))))
            x_s = ddim_step(x, denoised, sigma, sigma_s, space)
            x = forward_noise(x_s, sigma_s, sigma_next, noise_sampler(sigma, sigma_next), space) if sigma_s < sigma_next else x_s
        else:
            x = ddim_step(x, denoised, sigma, sigma_next, space)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None, space: str = "ve"):
    """DPM-Solver++(2M) with diffusers' semantics in the given state space (see the module docstring)."""
    extra_args = {} if extra_args is None else extra_args
    levels = [float(s) for s in sigmas.tolist()]
    s_in = x.new_ones([x.shape[0]])
    old_denoised = None
    for i in trange(len(levels) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        sigma_prev = levels[i - 1] if i > 0 else None
        x = dpmpp_2m_step(x, denoised, old_denoised, levels[i], levels[i + 1], sigma_prev, space)
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_ddim_v_timesteps(v_model, x, timesteps, alphas_cumprod, callback=None):
    """v-prediction DDIM at arbitrary integer timesteps, in VP space (diffusers' latents, x_T = plain noise).

    `v_model(x, t)` returns v̂ at integer timestep t; x̂0 = sqrt(ᾱ) x − sqrt(1 − ᾱ) v̂ (= −v̂ at ᾱ = 0); the step is
    x_prev = sqrt((1−ᾱ_p)/(1−ᾱ_t)) x + (sqrt(ᾱ_p) − sqrt(ᾱ_t) sqrt((1−ᾱ_p)/(1−ᾱ_t))) x̂0 with ᾱ_p = 1 after the
    last step — CogVideoXDDIMScheduler.step with η = 0 and `set_alpha_to_one`, at any timesteps.
    """
    timesteps = schedules.validate_timesteps(timesteps, len(alphas_cumprod))
    sigmas = schedules.vp_sigmas_for_timesteps(alphas_cumprod, timesteps)
    for i, t in enumerate(timesteps):
        alpha_cumprod = float(alphas_cumprod[t])
        v = v_model(x, t)
        denoised = math.sqrt(alpha_cumprod) * x - math.sqrt(1.0 - alpha_cumprod) * v
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "timestep": t, "denoised": denoised})
        x = ddim_step(x, denoised, sigmas[i], sigmas[i + 1], "vp")
    return x


# Solver names as presets (tdm_core.presets) and nodes use them. "flow_dpmpp_2m" and "dpmpp_2m" are one
# algorithm; the name says which state space the recipe runs it in ("flow" vs the model's VP/VE space).
SOLVERS = {
    "flow_dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m": sample_dpmpp_2m,
    "ddim": sample_ddim,
    "ddim_v": sample_ddim,
}
# The same solvers as TDM Sampler's `solver` widget names them: the widget has one entry per algorithm, and the
# state space comes from the MODEL. Notes and docs that tell a user what to pick use these names.
WIDGET_NAMES = {"flow_dpmpp_2m": "dpmpp_2m", "dpmpp_2m": "dpmpp_2m", "ddim": "ddim", "ddim_v": "ddim"}


def get_solver(name: str):
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown TDM solver {name!r}; known solvers: {', '.join(SOLVERS)}") from None
