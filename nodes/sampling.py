"""TDM sampler nodes: SAMPLER (TDM Sampler), SIGMAS (TDM Scheduler) and the all-in-one TDM KSampler.

Thin: the sampler function is nodes/sampler_function.py (with the conventions it follows where ComfyUI's differ
from the diffusers recipes), the preset and its sigmas for a MODEL nodes/sampling_grids.py, the maths tdm_core.
"""

from __future__ import annotations

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
from comfy_api.v0_0_2 import io, ui

from tdm_core import presets, schedules, solvers

from . import categories, inputs
from .sampler_function import SOLVER_CHOICES, tdm_sampler
from .sampling_grids import (
    AUTO_PRESET,
    DEFAULT_SHIFT,
    GRID_CHOICES,
    preset_choices,
    recorded_timesteps,
    resolve_preset,
    tdm_sigmas,
)
from .student_record import STUDENT_SOLVER_OPTION


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
