"""The TDM sampler as ComfyUI runs it: the KSAMPLER function around the tdm_core solvers (tdm_core.solvers).

The maths lives in tdm_core; this module adapts it to ComfyUI's sampling:

- **State space.** ComfyUI hands a sampler the model's own state: the flow state x = (1 − σ) x0 + σ ε for
  rectified-flow models (SD3/SD3.5), the variance-exploding state x = x0 + σ ε for discrete ε/v models (SD1.5).
  The tdm_core solvers run in that space ("flow" or "ve"); λ = ln(α/σ) is then diffusers' λ in both cases.
- **Integer timesteps** (`model_timesteps="integer"`, every preset's reference): diffusers gives the SD3
  transformer `int(σ·1000)` while ComfyUI passes σ·1000 as a float (947 vs 947.169 changes the output by ~4e-3).
  On flow models the TDM sampler evaluates the model at the noise level whose timestep is that integer and turns
  the prediction back into x̂0 at the solver's σ (x̂0 = x − σ v̂, v̂ recovered from the model's own output), so the
  solver keeps diffusers' float σ. Discrete VP models already get integer timesteps from ComfyUI, and the SIGMAS
  node takes their sigmas from the model's own table, so t ↔ σ is exact there.
- **Initial noise** (`initial_noise="unit"`, every preset's reference): from an empty latent, the first state is
  plain N(0, I) noise labelled σ_0, as diffusers' pipelines and the TDM rollout start (VE view: ε·sqrt(1 + σ_0²)).
  ComfyUI scales it by σ_0 on flow models (σ_0 = 0.99983 for SD3 at shift 6), and by σ_0 on VP models whenever
  σ_0 < σ_max (e.g. the training demo's grid from t = 899). Non-empty latents (img2img) keep ComfyUI's forward
  process, which is also diffusers' img2img convention.
- **Native CogVideoX** (newer ComfyUI: `model_base.CogVideoX`, model sampling `V_PREDICTION_DDPM`). Its
  `calculate_input` hands the state to the network unscaled, and the network was trained on the VP state
  x = sqrt(ᾱ) x0 + sqrt(1 − ᾱ) ε, so the solver runs in "vp" space (the VE state would be x·sqrt(1 + σ²), ~4500×
  too large at t = 999). Its ᾱ table is CogVideoX's schedule with SNR shift 1 (the 5B's), while CogVideoX-2B — the
  only model with a TDM LoRA — was trained with shift 3 (diffusers' 2B scheduler config, `snr_shift_scale` 3.0): the
  SIGMAS are the 2B's (`schedules.cogvideox_alphas_cumprod`, σ = ∞ at t = 999 where ᾱ = 0), the network is given the
  trained integer timestep (through its own table's σ for it) and x̂0 is formed on the 2B's schedule.
"""


from __future__ import annotations

import math
import types

import comfy.model_sampling
import comfy.samplers
import torch

from tdm_core import families, presets, schedules, solvers

from .family_adapters import is_native_vp_model, model_family, model_parametrisation
from .sampling_grids import flow_multiplier, is_flux_sampling
from .student_record import STUDENT_SOLVER_OPTION

SOLVER_CHOICES = ["auto", "dpmpp_2m", "ddim"]
# Preset solver names → the node's solver (the same algorithm; the state space comes from the model).
_SOLVER_ALIASES = solvers.WIDGET_NAMES


def state_space(model_sampling) -> str:
    if is_native_vp_model(model_sampling):
        return "vp"  # see the module docstring: the network takes the VP state as it is
    return "flow" if model_parametrisation(model_sampling) == "flow" else "ve"


# ---------------------------------------------------------------------------------------------------------------
# SAMPLER


class _IntegerTimestepDenoiser:
    """Evaluates a flow model at the integer timestep int(σ·1000) while returning x̂0 at the solver's σ.

    The model at noise level σ_t (model_sampling.timestep(σ_t) == t exactly) returns x̂0' = x − σ_t v̂; with
    v̂ = (x − x̂0')/σ_t the recipe's x̂0 = x − σ v̂ (diffusers' `convert_model_output` for flow_prediction).
    """

    def __init__(self, model, model_sampling, sigmas: torch.Tensor):
        self.model = model
        self.inner_model = model.inner_model
        multiplier = flow_multiplier(model_sampling)
        self.feed = {}
        for sigma in sigmas.tolist():
            if sigma > 0:
                timestep = schedules.flow_model_timestep(sigma, multiplier)
                self.feed[sigma] = _sigma_for_timestep(model_sampling, timestep, multiplier)

    def __call__(self, x, sigma, **kwargs):
        value = float(sigma.reshape(-1)[0])
        feed = self.feed.get(value)
        if feed is None or feed == value:
            return self.model(x, sigma, **kwargs)
        denoised = self.model(x, torch.full_like(sigma, feed), **kwargs)
        return x - (value / feed) * (x - denoised)


class _NativeCogVideoXDenoiser:
    """Native CogVideoX in VP space on CogVideoX-2B's schedule (see the module docstring).

    The solver works with VP sigmas σ_vp = sqrt(1 − ᾱ_t) of the 2B's table; for each, the network gets the VP state
    as it is and the integer timestep t (ComfyUI derives t from σ, so it is given its own table's σ for t). ComfyUI
    returns x̂0' = (x − σ' v̂)/sqrt(1 + σ'²) at that σ'; v̂ = (x − sqrt(1 + σ'²) x̂0')/σ', and the recipe's
    x̂0 = sqrt(ᾱ_t) x − sqrt(1 − ᾱ_t) v̂ (= −v̂ at t = 999, where ᾱ = 0).
    """

    def __init__(self, model, model_sampling, vp_sigmas: list[float], timesteps: list[int],
                 alphas_cumprod: torch.Tensor):
        self.model = model
        self.inner_model = model.inner_model
        own_sigmas = model_sampling.sigmas.detach().cpu().double()
        self.steps = {}
        for sigma, timestep in zip(vp_sigmas[:-1], timesteps, strict=True):  # the final 0 is never evaluated
            alpha_cumprod = float(alphas_cumprod[timestep])
            self.steps[sigma] = (float(own_sigmas[timestep]), math.sqrt(alpha_cumprod), math.sqrt(1.0 - alpha_cumprod))

    def __call__(self, x, sigma, **kwargs):
        # The solver's σ reaches here in x's dtype (float32), the table keys are float64: take the nearest.
        value = float(sigma.reshape(-1)[0])
        feed, alpha, sigma_vp = self.steps[min(self.steps, key=lambda key: abs(key - value))]
        denoised = self.model(x, torch.full_like(sigma, feed, dtype=torch.float32), **kwargs)
        v = (x - math.sqrt(1.0 + feed * feed) * denoised) / feed
        return alpha * x - sigma_vp * v


def _native_cogvideox_setup(model, x, sigmas, model_sampling):
    """The VP start state, VP sigmas and denoiser of native CogVideoX (see _NativeCogVideoXDenoiser).

    `sigmas` are VE sigmas of the 2B's schedule (TDM Scheduler's), ∞ where ᾱ = 0. The start state is built from
    ComfyUI's noise and latent directly — sqrt(ᾱ_0) latent + sqrt(1 − ᾱ_0) noise, pure noise from t = 999 — since
    ComfyUI's own VE scaling of it is ∞ there.
    """
    table = schedules.cogvideox_alphas_cumprod()
    ve = [float(s) for s in sigmas.tolist()]
    timesteps = [schedules.timestep_of_ve_sigma(table, s) for s in ve[:-1]]
    vp = [math.sqrt(1.0 - float(table[t])) for t in timesteps] + [0.0]
    if ve[-1] != 0.0:
        raise ValueError("TDM on native CogVideoX samples down to σ = 0; use TDM Scheduler's sigmas (they end in 0)")
    table_ve = schedules.ve_sigmas(table)
    foreign = [s for s, t in zip(ve[:-1], timesteps, strict=True)
               if math.isfinite(s) and abs(math.log(s) - math.log(float(table_ve[t]))) > 1e-4]
    if foreign:
        # e.g. BasicScheduler's sigmas come from the native model's own (shift-1) table: other timesteps entirely
        raise ValueError(f"sigmas: {foreign[0]:.4g} is not a sigma of CogVideoX-2B's schedule, which TDM samples "
                         "native CogVideoX on; connect TDM Scheduler (preset cogvideox) to the sampler's sigmas")
    noise, latent = getattr(model, "noise", None), getattr(model, "latent_image", None)
    if noise is None or getattr(noise, "is_nested", False) or noise.shape != x.shape:
        raise ValueError("TDM on native CogVideoX needs ComfyUI's noise for the start state (a plain latent, not "
                         "a nested one)")
    alpha0, sigma0 = math.sqrt(float(table[timesteps[0]])), vp[0]
    start = noise.to(device=x.device, dtype=x.dtype) * sigma0
    if latent is not None and alpha0 > 0.0:
        start = start + alpha0 * latent.to(device=x.device, dtype=x.dtype)
    denoiser = _NativeCogVideoXDenoiser(model, model_sampling, vp, timesteps, table)
    return start, torch.tensor(vp, dtype=torch.float64), denoiser


def _sigma_for_timestep(model_sampling, timestep: int, multiplier: float) -> float:
    """The float32 σ for which the model's own `timestep(σ)` is exactly the integer `timestep`."""
    value = torch.tensor([timestep / multiplier], dtype=torch.float32)
    for _ in range(16):
        got = float(model_sampling.timestep(value)[0])
        if got == timestep:
            return float(value[0])
        value = torch.nextafter(value, torch.full_like(value, math.inf if got < timestep else -math.inf))
    raise ValueError(f"no float32 sigma gives model timestep {timestep}")


def _start_state(model, x, sigmas, space: str, initial_noise: str):
    """diffusers' pure-noise start (see the module docstring); ComfyUI's state otherwise."""
    if initial_noise != "unit":
        return x
    noise, latent = getattr(model, "noise", None), getattr(model, "latent_image", None)
    if noise is None or getattr(noise, "is_nested", False) or noise.shape != x.shape:
        return x
    if latent is not None and torch.count_nonzero(latent) > 0:
        return x
    sigma0 = float(sigmas[0])
    scale = 1.0 if space == "flow" else math.sqrt(1.0 + sigma0 * sigma0)
    return noise.to(device=x.device, dtype=x.dtype) * scale


def _students_solver(family: str | None) -> str | None:
    """For a family with no released TDM LoRA (its preset samples distilled students), its preset's solver: "auto"
    takes it rather than the release recipe of the parametrisation (SDXL is ε like Dreamshaper, Flux flow like SD3,
    but their students' solvers were chosen by measuring the students: SDXL's DDIM step, Flux's flow 2M)."""
    entry = families.get(family or "")
    if entry is None or entry.released_lora:
        return None
    return presets.get_preset(entry.default_preset).solver


def resolve_solver(solver: str, model_sampling, base_model=None, recorded: str | None = None) -> str:
    """The tdm_core solver for a widget's `solver`. "auto": the solver a distilled student's LoRA records
    (`recorded`, which TDM LoRA Loader puts in the MODEL's options), else its family's students' solver, else the
    release recipe of its parametrisation."""
    if solver == "auto":
        family = model_family(types.SimpleNamespace(model=base_model)) if base_model is not None else None
        solver = recorded or _students_solver(family) or \
            presets.solver_for_parametrisation(model_parametrisation(model_sampling))
    try:
        return _SOLVER_ALIASES[solver]
    except KeyError:
        raise ValueError(f"unknown TDM solver {solver!r}; choose one of {', '.join(SOLVER_CHOICES)}") from None


def sample_tdm(model, x, sigmas, extra_args=None, callback=None, disable=None, solver: str = "auto",
               gamma: float = 0.0, model_timesteps: str = "integer", initial_noise: str = "unit"):
    """The KSAMPLER function: picks the tdm_core solver and state space from the model, applies the recipe's
    conventions, and reports every step through `callback` (previews, progress bar, Cancel)."""
    model_sampling = model.inner_model.inner_model.model_sampling
    space = state_space(model_sampling)
    recorded = ((extra_args or {}).get("model_options") or {}).get(STUDENT_SOLVER_OPTION)
    name = resolve_solver(solver, model_sampling, model.inner_model.inner_model, recorded)
    if len(sigmas) <= 1:
        return x
    denoiser = model
    if space == "vp":
        x, sigmas, denoiser = _native_cogvideox_setup(model, x, sigmas, model_sampling)
    else:
        x = _start_state(model, x, sigmas, space, initial_noise)
    # Flux's network takes σ itself (diffusers passes it as a float): there is no integer timestep to round to.
    if model_timesteps == "integer" and space == "flow" and not is_flux_sampling(model_sampling):
        denoiser = _IntegerTimestepDenoiser(model, model_sampling, sigmas)
    options = {"space": space}
    if name == "ddim":
        options["gamma"] = gamma
        if space == "flow":
            multiplier = flow_multiplier(model_sampling)
            options["timestep_of_sigma"] = lambda s: s * multiplier
            options["sigma_of_timestep"] = lambda t: t / multiplier
        elif space == "vp":
            if gamma > 0:
                raise ValueError("gamma (TCD-style noise) is not available on native CogVideoX; set gamma to 0")
        else:
            options["timestep_of_sigma"] = lambda s: float(model_sampling.timestep(torch.tensor(s)))
            options["sigma_of_timestep"] = lambda t: float(model_sampling.sigma(torch.tensor(float(t))))
    elif gamma > 0:
        raise ValueError("gamma (TCD-style noise) applies to the ddim solver only; set gamma to 0 for dpmpp_2m")
    return solvers.get_solver(name)(denoiser, x, sigmas, extra_args=extra_args, callback=callback,
                                    disable=disable, **options)


def tdm_sampler(solver: str = "auto", gamma: float = 0.0, model_timesteps: str = "integer",
                initial_noise: str = "unit") -> comfy.samplers.KSAMPLER:
    if solver not in SOLVER_CHOICES and solver not in _SOLVER_ALIASES:
        raise ValueError(f"unknown TDM solver {solver!r}; choose one of {', '.join(SOLVER_CHOICES)}")
    return comfy.samplers.KSAMPLER(sample_tdm, extra_options={
        "solver": solver, "gamma": float(gamma), "model_timesteps": model_timesteps, "initial_noise": initial_noise,
    })
