"""Which TDM preset samples a MODEL, and its sigmas: TDM Scheduler's and TDM KSampler's grid.

A preset is checked against the MODEL it samples (a preset of another kind of model gives noise, not an image);
`auto` reads the MODEL's family, or the grid a distilled student's LoRA records. The grid is turned into sigmas of
the MODEL's own table, so t ↔ σ is exact (nodes/sampler_function.py says which conventions the sampler follows, and why).
"""

from __future__ import annotations

import comfy.model_sampling
import torch

from tdm_core import families, presets, schedules

from .family_adapters import (
    PARAMETRISATION_LABELS,
    WAN_OUT_OF_SCOPE,
    adapter,
    describe_model,
    model_family,
    model_parametrisation,
    wan_variant,
)
from .student_record import recorded_student_grid

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
    if family == families.OTHER_WAN and preset.family == families.WAN21.name:
        raise ValueError(
            f"TDM preset {preset.name!r} samples Wan 2.1 text-to-video students; this MODEL is "
            f"{wan_variant(model)[1]} ({describe_model(model)}). {WAN_OUT_OF_SCOPE}: sample this model with ComfyUI's "
            "own samplers."
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


def flow_multiplier(model_sampling) -> float:
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
        return schedules.flow_sigmas_float32(flow_grid.sigmas, flow_grid.timesteps, flow_multiplier(model_sampling))
    else:
        timesteps = schedules.grid_timesteps(grid_name, steps, shift=shift_value, total_steps=demo_total_steps)

    if flow:
        multiplier = flow_multiplier(model_sampling)
        return schedules.flow_sigmas_float32([t / multiplier for t in timesteps] + [0.0], timesteps, multiplier)
    table = adapter(preset.family).sampling_alphas_cumprod()
    if table is not None:
        # The preset family's own schedule (CogVideoX-2B's, not the native model's SNR-shift-1 table): see
        # nodes/sampler_function.py's docstring, "Native CogVideoX".
        return torch.tensor(schedules.ve_sigmas_for_timesteps(table, timesteps), dtype=torch.float32)
    index = torch.tensor(timesteps, dtype=torch.long)
    table = getattr(model_sampling, "sigmas", None)
    if isinstance(model_sampling, comfy.model_sampling.ModelSamplingDiscrete) and table is not None:
        # The model's own table: model_sampling.timestep(σ) gives back exactly t (SD1.5: 14.61465 at 999, ...).
        sigmas = table.detach().cpu().float()[index]
    else:
        sigmas = model_sampling.sigma(index.float()).detach().cpu().float()
    return torch.cat([sigmas, sigmas.new_zeros(1)])

