"""The training grid of a sampling preset on a teacher's schedule: the K timesteps a student is trained at, so that it
is trained at exactly the noise levels and model timesteps the TDM sampler later evaluates it at.

ComfyUI-free (a diffusers-folder teacher and a ComfyUI MODEL ask the same question); `nodes/comfy_backend.py` builds
the ComfyUI side's schedule from the MODEL and asks it too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import families, presets, schedules
from .schedule import DiscreteSchedule


@dataclass
class TrainingGrid:
    schedule: DiscreteSchedule  # the teacher's tables, the preset's exact grid pinned into them where it is a flow one
    timesteps: list[int] | None  # None: the training-demo grid from total_steps
    preset: str  # the TDM sampler preset the student is made for ("" for the demo grid)
    description: str


def preset_grid(schedule: DiscreteSchedule, name: str, steps: int, *, latent_shape: tuple[int, ...] | None = None,
                multiplier: float = schedules.NUM_TRAIN_TIMESTEPS) -> TrainingGrid:
    """Preset `name`'s K-step grid on `schedule`. Flow presets pin their exact σ into the table, with the timestep the
    network is fed (σ·`multiplier`; Flux's network takes σ itself, its grid's μ depends on the latent's size)."""
    preset = presets.get_preset(name)
    if preset.grid == "flux_shift":
        flux = schedules.flux_shift_grid(steps, schedules.flux_mu(int(latent_shape[-2]), int(latent_shape[-1])))
        sigmas = flux.sigmas[:-1]
        pinned, indices = schedule.with_pinned_grid(sigmas, sigmas)
        return TrainingGrid(pinned, indices, name, f"{name}: σ {', '.join(f'{s:.4f}' for s in sigmas)}")
    if preset.grid == "flow_shift":
        flow = schedules.flow_shift_grid(steps, preset.shift)
        feed = [t * multiplier / schedules.NUM_TRAIN_TIMESTEPS for t in flow.timesteps]
        pinned, indices = schedule.with_pinned_grid(flow.sigmas[:-1], feed)
        return TrainingGrid(pinned, indices, name, f"{name}: σ {', '.join(f'{s:.4f}' for s in flow.sigmas[:-1])}")
    timesteps = list(schedules.grid_timesteps(preset.grid, steps, shift=preset.shift))
    return TrainingGrid(schedule, timesteps, name, f"{name}: t {', '.join(map(str, timesteps))}")


def choose_grid(schedule: DiscreteSchedule, family: str, parametrisation: str, grid: str, steps: int,
                total_steps: int = schedules.TRAINING_DEMO_TOTAL_STEPS, *, latent_shape: tuple[int, ...] | None = None,
                multiplier: float = schedules.NUM_TRAIN_TIMESTEPS, teacher: str = "teacher") -> TrainingGrid:
    """The training grid of a grid choice (TDM Distill's `grid`): "auto" (the family's preset), a preset name, or
    "training_demo" (t_k = N−1−k·N/K, sampled with the TDM Scheduler's training_demo grid). A preset of another
    parametrisation or family is refused, naming `teacher` (what the user connected)."""
    if grid == "training_demo":
        return TrainingGrid(schedule, None, "", f"training_demo N={total_steps} K={steps}")
    name = families.FAMILIES[family].default_preset if grid == "auto" and family in families.FAMILIES else grid
    if name == "auto":
        raise ValueError(f"no TDM sampling preset for a {family} model; choose grid 'training_demo'")
    preset = presets.get_preset(name)
    if preset.parametrisation != parametrisation:
        raise ValueError(f"grid preset {name!r} is for {preset.parametrisation} models; this {teacher} is "
                         f"{parametrisation} ({family}); use grid 'auto'")
    if not families.presets_fit(preset.family, family):
        raise ValueError(f"grid preset {name!r} is for {preset.family} models; this {teacher} is {family}; use grid "
                         "'auto'")
    return preset_grid(schedule, name, steps, latent_shape=latent_shape, multiplier=multiplier)


def flux_schedule(latent_shape: tuple[int, ...]) -> DiscreteSchedule:
    """Flux's flow table at the training size: σ_t = flux_time_shift(μ, (t + 1)/1000) with μ from the latent's size,
    α = 1 − σ, and the network is given σ itself (ComfyUI's Flux model sampling: timestep(σ) = σ; diffusers'
    pipeline: timestep / 1000), not the single shift a checkpoint stores."""
    mu = schedules.flux_mu(int(latent_shape[-2]), int(latent_shape[-1]))
    u = torch.arange(1, schedules.NUM_TRAIN_TIMESTEPS + 1, dtype=torch.float64) / schedules.NUM_TRAIN_TIMESTEPS
    sigmas = torch.as_tensor(schedules.flux_time_shift(mu, u.numpy()), dtype=torch.float64)
    return DiscreteSchedule.from_flow_sigmas(sigmas, multiplier=1.0)
