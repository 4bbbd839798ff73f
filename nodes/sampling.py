"""TDM sampler nodes: SAMPLER, SIGMAS and the all-in-one sampler (tdm_core.schedules / tdm_core.solvers).

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

import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch
from comfy_api.v0_0_2 import io, ui

from tdm_core import families, presets, schedules, solvers

from . import categories, inputs
from .family_adapters import (
    PARAMETRISATION_LABELS,
    adapter,
    describe_model,
    is_native_vp_model,
    model_family,
    model_parametrisation,
)
from .lora_loader import STUDENT_GRID_OPTION, STUDENT_SOLVER_OPTION

SOLVER_CHOICES = ["auto", "dpmpp_2m", "ddim"]
# Preset solver names → the node's solver (the same algorithm; the state space comes from the model).
_SOLVER_ALIASES = solvers.WIDGET_NAMES
GRID_CHOICES = ["preset", *schedules.GRIDS]
AUTO_PRESET = "auto"
# The flow presets' shift (6 for SD3/SD3.5, the official recipe): TDM Scheduler's shift widget shows it as a value.
DEFAULT_SHIFT = next(p.shift for p in presets.PRESETS.values() if p.shift)


def preset_choices() -> list[str]:
    """The presets a MODEL input can use on this ComfyUI: "auto" first, then every preset whose model family this
    ComfyUI can load as a MODEL (CogVideoX only with native support; the diffusers-backed TDM CogVideoX nodes serve
    it elsewhere)."""
    usable = [p.name for p in presets.PRESETS.values() if adapter(p.family).available()]
    return [AUTO_PRESET, *usable]


# ---------------------------------------------------------------------------------------------------------------
# Reading the MODEL


def state_space(model_sampling) -> str:
    if is_native_vp_model(model_sampling):
        return "vp"  # see the module docstring: the network takes the VP state as it is
    return "flow" if model_parametrisation(model_sampling) == "flow" else "ve"


def _fitting_presets_hint(suitable: list[str], model) -> str:
    """What to pick instead, `auto` first where it would have found the right recipe by itself."""
    if not suitable:
        return "no TDM preset exists for it"
    picked = presets.presets_for_family(model_family(model))
    names = " or ".join(repr(name) for name in suitable)
    if picked and picked[0].name in suitable:
        return f"use preset 'auto' (it picks {picked[0].name!r} for this MODEL) or {names}"
    return f"use preset {names}"


def check_preset_fits(preset: presets.ModelPreset, model) -> None:
    """A preset made for another kind of model gives noise, not an image: refuse it with both names."""
    parametrisation = model_parametrisation(model.get_model_object("model_sampling"))
    family = model_family(model)
    if family == families.OTHER_COGVIDEOX and preset.family == families.COGVIDEOX.name:
        raise ValueError(
            f"TDM preset {preset.name!r} is for CogVideoX-2B (text-to-video); this MODEL is {describe_model(model)}, "
            "a CogVideoX 5B, 1.5 or image-to-video model (or a 2B file without `patch_embed.pos_embedding`, which "
            "ComfyUI reads as rotary positions), and no TDM LoRA was released for those. Load CogVideoX-2B with its "
            "position table and the TDM_CogVideoX-2B LoRA, or sample this model with ComfyUI's own samplers."
        )
    if parametrisation == preset.parametrisation:
        if families.presets_fit(preset.family, family):
            return
        # A family with a schedule of its own (Flux's shift of μ, CogVideoX-2B's table): only its presets fit it.
        raise ValueError(f"TDM preset {preset.name!r} ({preset.display_name}) does not fit this MODEL: "
                         f"{describe_model(model)}, family {family}; "
                         f"{_fitting_presets_hint([p.name for p in presets.presets_for_family(family)], model)}")
    suitable = [p.name for p in presets.presets_for_parametrisation(parametrisation)
                if families.presets_fit(p.family, family)]
    hint = _fitting_presets_hint(suitable, model)
    raise ValueError(
        f"TDM preset {preset.name!r} ({preset.display_name}, {PARAMETRISATION_LABELS[preset.parametrisation]}) does "
        f"not fit this MODEL: {describe_model(model)}; {hint}, or load the {preset.display_name.split(' (')[0]} model."
    )


def is_flux_sampling(model_sampling) -> bool:
    """Flux's model sampling: the network takes σ itself, and the shift is the exponential one of μ."""
    return isinstance(model_sampling, comfy.model_sampling.ModelSamplingFlux)


def resolve_preset(model, preset_name: str) -> presets.ModelPreset:
    """The preset to sample `model` with. "auto" reads the MODEL's family (the same detection the TDM LoRA Loader
    uses) and takes the first preset of that family in tdm_core.presets, so a preset added there is found without
    code changes here."""
    if preset_name != AUTO_PRESET:
        return presets.get_preset(preset_name)
    recorded = recorded_student_grid(model)
    if recorded is not None and recorded[0] == "preset":  # a distilled student: the preset it was trained on
        preset = presets.get_preset(recorded[1])
        try:
            check_preset_fits(preset, model)
            return preset
        except ValueError:  # the LoRA on another family's model: the loader has said so; the model decides
            pass
    family = model_family(model)
    matching = presets.presets_for_family(family)
    if not matching:
        known = ", ".join(f"{p.name} ({p.display_name})" for p in presets.PRESETS.values())
        raise ValueError(f"TDM preset auto: no TDM recipe exists for this MODEL, {describe_model(model)} (model "
                         f"family {family!r}). TDM presets: {known}. Load one of those models, or sample this one "
                         "with ComfyUI's own samplers.")
    return matching[0]


def recorded_student_grid(model):
    """What a TDM-distilled LoRA on `model` records about its training grid (nodes/lora_loader.py puts it on the
    MODEL): ("preset", name), ("timesteps", (t_0, …)) or None."""
    return (getattr(model, "model_options", None) or {}).get(STUDENT_GRID_OPTION)


def recorded_timesteps(model, preset_name: str, steps: int) -> str:
    """preset auto on a student trained on a grid of no preset (the training demo's): its timesteps as
    custom_timesteps text when `steps` is its K, else "" (the preset's grid at that many steps)."""
    recorded = recorded_student_grid(model) if preset_name == AUTO_PRESET else None
    if recorded is None or recorded[0] != "timesteps" or len(recorded[1]) != steps:
        return ""
    return ", ".join(str(t) for t in recorded[1])


def img2img_step_count(steps: int, denoise: float, rule: str) -> int:
    """How many of `steps` steps an img2img pass at strength `denoise` runs, counted as the preset's diffusers
    img2img pipeline counts it (`get_timesteps`; see ModelPreset.img2img_steps)."""
    if rule == "sd3_pipeline":
        return steps - int(max(steps - min(steps * denoise, steps), 0))
    return min(int(steps * denoise), steps)


def denoise_tail(sigmas: torch.Tensor, run: int) -> torch.Tensor:
    """img2img: the last `run` steps of the full grid, as diffusers' img2img pipelines do, so a 4-step TDM LoRA still
    sees its trained timesteps. (ComfyUI's BasicScheduler instead stretches the schedule to steps/denoise steps and
    runs the last `steps` of them.) A tail of no step leaves the latent unchanged."""
    return sigmas[len(sigmas) - 1 - run:]


def _flow_multiplier(model_sampling) -> float:
    return float(getattr(model_sampling, "multiplier", schedules.NUM_TRAIN_TIMESTEPS))


# ---------------------------------------------------------------------------------------------------------------
# SIGMAS


def flux_mu_for(model_sampling, latent_size: tuple[int, int] | None) -> float:
    """μ of Flux's time shift: that of the latent being sampled (H, W), else the MODEL's own (ModelSamplingFlux sets
    it from width and height; 1.15 by default)."""
    if latent_size is not None:
        return schedules.flux_mu(*latent_size)
    return float(getattr(model_sampling, "shift", schedules.FLUX_MAX_SHIFT))


def tdm_sigmas(model, preset_name: str, steps: int, shift: float = 0.0, grid: str = "preset",
               custom_timesteps: str = "", demo_total_steps: int = schedules.TRAINING_DEMO_TOTAL_STEPS,
               denoise: float = 1.0, latent_size: tuple[int, int] | None = None) -> torch.Tensor:
    """The preset's grid as sigmas of this MODEL (float32, ending in 0); its img2img tail for denoise < 1.
    shift 0 means the preset's (what workflows saved before the shift widget showed its value hold). `latent_size`
    (H, W of the latent) sets Flux's resolution-dependent shift."""
    preset = resolve_preset(model, preset_name)
    check_preset_fits(preset, model)
    full = _grid_sigmas(model, preset, steps, shift, grid, custom_timesteps, demo_total_steps, latent_size)
    if denoise >= 1.0:
        return full
    return denoise_tail(full, img2img_step_count(len(full) - 1, denoise, preset.img2img_steps))


def _grid_sigmas(model, preset, steps, shift, grid, custom_timesteps, demo_total_steps,
                 latent_size=None) -> torch.Tensor:
    model_sampling = model.get_model_object("model_sampling")
    flow = model_parametrisation(model_sampling) == "flow"
    grid_name = preset.grid if grid == "preset" else grid
    shift_value = float(shift) if shift > 0 else preset.shift

    if custom_timesteps.strip():
        timesteps = schedules.parse_timesteps(custom_timesteps)
        grid_name = "custom"
    elif grid_name == "flux_shift":
        if not is_flux_sampling(model_sampling):
            raise ValueError(f"the flux_shift grid is for Flux models; this MODEL is {describe_model(model)}")
        # The shift input is SD3's flow shift (default 6), not Flux's μ: μ comes from the latent or the MODEL.
        flux_grid = schedules.flux_shift_grid(steps, flux_mu_for(model_sampling, latent_size))
        return torch.tensor(flux_grid.sigmas, dtype=torch.float32)
    elif grid_name == "flow_shift":
        if not flow:
            raise ValueError(f"the flow_shift grid is for rectified-flow models (SD3/SD3.5); this MODEL is "
                             f"{describe_model(model)}")
        if shift_value is None:
            raise ValueError(f"preset {preset.name!r} has no flow shift; set the shift input (1–6)")
        flow_grid = schedules.flow_shift_grid(steps, shift_value)
        return schedules.flow_sigmas_float32(flow_grid.sigmas, flow_grid.timesteps, _flow_multiplier(model_sampling))
    else:
        timesteps = schedules.grid_timesteps(grid_name, steps, shift=shift_value, total_steps=demo_total_steps)

    if flow:
        multiplier = _flow_multiplier(model_sampling)
        return schedules.flow_sigmas_float32([t / multiplier for t in timesteps] + [0.0], timesteps, multiplier)
    table = adapter(preset.family).sampling_alphas_cumprod()
    if table is not None:
        # The preset family's own schedule (CogVideoX-2B's, not the native model's SNR-shift-1 table): see the
        # module docstring.
        return torch.tensor(schedules.ve_sigmas_for_timesteps(table, timesteps), dtype=torch.float32)
    index = torch.tensor(timesteps, dtype=torch.long)
    table = getattr(model_sampling, "sigmas", None)
    if isinstance(model_sampling, comfy.model_sampling.ModelSamplingDiscrete) and table is not None:
        # The model's own table: model_sampling.timestep(σ) gives back exactly t (SD1.5: 14.61465 at 999, ...).
        sigmas = table.detach().cpu().float()[index]
    else:
        sigmas = model_sampling.sigma(index.float()).detach().cpu().float()
    return torch.cat([sigmas, sigmas.new_zeros(1)])


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
        multiplier = _flow_multiplier(model_sampling)
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
            multiplier = _flow_multiplier(model_sampling)
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


class _PositiveOnlyGuider(comfy.samplers.CFGGuider):
    """CFG 1 with no negative: one model evaluation per step (every TDM LoRA samples without CFG)."""

    def set_conds(self, positive):
        self.inner_set_conds({"positive": positive})


# ---------------------------------------------------------------------------------------------------------------
# Nodes

_PRESET_TOOLTIP = ("TDM recipe: the timestep grid, steps and solver a TDM LoRA was trained for. auto picks it from "
                   "the MODEL's family and names it on the node after the run; the help page lists every preset.")
_DENOISE_TOOLTIP = (
    "img2img / hires-fix strength, diffusers' convention: the last steps × denoise steps of the trained grid run (4 "
    "at 0.5: the last 2), not BasicScheduler's stretched schedule, which a 4-step LoRA never saw. 1.0 = txt2img.")


def _named(preset: presets.ModelPreset, requested: str) -> str:
    """The line the node shows after a run: which preset it used, and why."""
    how = "picked from the MODEL" if requested == AUTO_PRESET else "as set"
    return f"preset {preset.name} ({preset.display_name}), {how}"


class TDMSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TDMSampler",
            display_name="TDM Sampler",
            category=categories.CUSTOM_SAMPLERS,
            description="The few-step sampler of the official TDM recipes, for SamplerCustom / "
                        "SamplerCustomAdvanced. Use with TDM Scheduler sigmas and CFG 1.",
            inputs=[
                io.Combo.Input("solver", options=SOLVER_CHOICES, default="auto", tooltip=(
                    "auto: the recipe's solver for this model. dpmpp_2m: DPM-Solver++(2M) as diffusers computes it, "
                    "flow-aware on SD3 (ComfyUI's built-in dpmpp_2m is not). ddim: the deterministic TDM/DDIM step.")),
                categories.advanced(io.Float.Input("gamma", default=0.0, min=0.0, max=1.0, step=0.01, tooltip=(
                    "Extension, not part of TDM (which is deterministic): TCD-style stochasticity for the ddim "
                    "solver. 0 = deterministic; γ > 0 re-noises each step from ⌊(1−γ)·t_next⌋ with fresh noise."))),
                categories.advanced(io.Combo.Input("model_timesteps", options=["integer", "float"], default="integer",
                               tooltip=(
                    "integer: give the model the integer timesteps int(σ·1000) as diffusers does (exact parity "
                    "with the official SD3 recipe). float: ComfyUI's σ·1000. No effect on SD1.5 (already integer)."))),
                categories.advanced(io.Combo.Input("initial_noise", options=["unit", "scaled"], default="unit", tooltip=(
                    "unit: from an empty latent, start from plain N(0, I) noise as diffusers and the TDM rollout do. "
                    "scaled: ComfyUI's σ_0-scaled noise. Non-empty latents (img2img) are never changed."))),
            ],
            outputs=[io.Sampler.Output(display_name="sampler", tooltip="For SamplerCustom / SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, solver, gamma, model_timesteps, initial_noise) -> io.NodeOutput:
        inputs.check_inputs(cls, locals())
        return io.NodeOutput(tdm_sampler(solver, gamma, model_timesteps, initial_noise))


class TDMScheduler(io.ComfyNode):
    # Widget values are saved by position: new inputs go last (denoise), so workflows saved earlier keep loading.
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TDMScheduler",
            display_name="TDM Scheduler",
            category=categories.CUSTOM_SCHEDULERS,
            description="The exact timestep grid of a TDM recipe as SIGMAS of this MODEL (its own model_sampling, so "
                        "t ↔ σ matches the model). preset auto picks the recipe from the MODEL; a preset for "
                        "another kind of model is refused, naming both.",
            inputs=[
                io.Model.Input("model", tooltip="The model to sample (with its TDM LoRA); its parametrisation must "
                                                "match the preset."),
                io.Combo.Input("preset", options=preset_choices(), default=AUTO_PRESET, tooltip=_PRESET_TOOLTIP),
                io.Int.Input("steps", default=4, min=1, max=1000, tooltip=(
                    "Number of steps. The released TDM LoRAs are 4-step students; other counts follow the same grid "
                    "rule. Ignored when custom timesteps are given.")),
                io.Float.Input("shift", default=DEFAULT_SHIFT, min=0.0, max=20.0, step=0.05, tooltip=(
                    f"Flow shift of the SD3/SD3.5 presets ({DEFAULT_SHIFT:g}, the official recipe). Ignored by SD1.5, "
                    "CogVideoX and Flux (its shift follows the image size). 0, saved by older versions, means the "
                    "preset's.")),
                categories.advanced(io.Combo.Input("grid", options=GRID_CHOICES, default="preset", tooltip=(
                    "preset: the recipe's grid (the right choice for a TDM LoRA). The others reproduce particular "
                    "schedules (diffusers' flow or Flux sigmas, SD1.5 linspace, trailing, CogVideoX's trained steps, "
                    "the training demo's); the help page lists them."))),
                categories.advanced(io.String.Input("custom_timesteps", default="", tooltip=(
                    "Optional integer timesteps, descending, e.g. '999, 856, 665, 399'; overrides grid and steps."))),
                categories.advanced(io.Int.Input("demo_total_steps", default=schedules.TRAINING_DEMO_TOTAL_STEPS, min=1, max=1000,
                             tooltip="Only for grid training_demo: N of train_tdm_demo.py (total_steps: 800 by "
                                     "default, 900 in the README run).")),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip=_DENOISE_TOOLTIP),
            ],
            outputs=[io.Sigmas.Output(display_name="sigmas", tooltip="For SamplerCustom / SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, model, preset, steps, shift, grid, custom_timesteps, demo_total_steps,
                denoise=1.0) -> io.NodeOutput:
        inputs.check_inputs(cls, locals())
        recipe = resolve_preset(model, preset)
        trained = recorded_timesteps(model, preset, steps) if grid == "preset" and not custom_timesteps.strip() else ""
        sigmas = tdm_sigmas(model, recipe.name, steps, shift, grid, custom_timesteps or trained, demo_total_steps,
                            denoise)
        note = f"\ntimesteps {trained}, as the distilled LoRA records" if trained else ""
        return io.NodeOutput(sigmas, ui=ui.PreviewText(
            f"{_named(recipe, preset)}{note}\nsigmas {', '.join(f'{s:.4g}' for s in sigmas.tolist())}"))


class TDMKSampler(io.ComfyNode):
    # Widget values are saved by position: new inputs go last (denoise), so workflows saved earlier keep loading.
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TDMKSampler",
            display_name="TDM KSampler",
            category=categories.SAMPLING,
            description="All-in-one TDM sampling: the preset's grid and solver, CFG 1 (one model evaluation per step, "
                        "no negative prompt), seeded noise. preset auto picks the recipe from the MODEL.",
            inputs=[
                io.Model.Input("model", tooltip="The model with its TDM LoRA applied."),
                io.Conditioning.Input("positive", tooltip="The prompt. TDM samples without CFG, so there is no "
                                                          "negative prompt."),
                io.Latent.Input("latent_image", tooltip="The latent to start from (an empty latent for txt2img, an "
                                                        "encoded image with denoise < 1 for img2img)."),
                io.Combo.Input("preset", options=preset_choices(), default=AUTO_PRESET, tooltip=_PRESET_TOOLTIP),
                io.Int.Input("steps", default=4, min=1, max=1000, tooltip="Number of steps (the released TDM LoRAs "
                                                                          "are 4-step students)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the initial noise; the same seed gives the same latent."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip=_DENOISE_TOOLTIP),
            ],
            outputs=[io.Latent.Output(display_name="latent")],
        )

    @classmethod
    def execute(cls, model, positive, latent_image, preset, steps, seed, denoise=1.0) -> io.NodeOutput:
        inputs.check_inputs(cls, locals())
        recipe = resolve_preset(model, preset)
        latent_size = tuple(int(n) for n in latent_image["samples"].shape[-2:])
        trained = recorded_timesteps(model, preset, steps)  # a student of a grid of no preset: its own grid
        sigmas = tdm_sigmas(model, recipe.name, steps, custom_timesteps=trained, denoise=denoise,
                            latent_size=latent_size)
        # preset auto on a distilled student: the solver its LoRA records (a named preset is that preset's recipe)
        recorded = model.model_options.get(STUDENT_SOLVER_OPTION) if preset == AUTO_PRESET else None
        sampler = tdm_sampler(recorded or recipe.solver, 0.0, recipe.model_timesteps, recipe.initial_noise)
        latent = latent_image.copy()
        samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
        solver_note = (f"; solver {solvers.WIDGET_NAMES[recorded]}, as the distilled LoRA records"
                       if recorded and recorded != recipe.solver else "")
        if trained:
            solver_note += f"; timesteps {trained}, as the distilled LoRA records"
        report = ui.PreviewText(f"{_named(recipe, preset)}; {len(sigmas) - 1} of {steps} steps{solver_note}")
        if len(sigmas) <= 1:  # denoise so small that no step runs: the latent is returned as it came
            return io.NodeOutput(latent, ui=report)
        noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
        guider = _PositiveOnlyGuider(model)
        guider.set_conds(positive)
        callback = latent_preview.prepare_callback(model, len(sigmas) - 1)
        result = guider.sample(noise, samples, sampler, sigmas, denoise_mask=latent.get("noise_mask"),
                               callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        latent["samples"] = result.to(comfy.model_management.intermediate_device())
        return io.NodeOutput(latent, ui=report)


NODES: list = [TDMSampler, TDMScheduler, TDMKSampler]
