"""The discrete training schedule the distillation works on: (α_t, σ_t) for integer t in [0, N).

TDM is written in VP notation (docs/tdm_method.md §2): `x_t = α_t x0 + σ_t ε`, α_t = sqrt(ᾱ_t), σ_t = sqrt(1 − ᾱ_t);
rectified-flow models use α_t = 1 − σ_t. Every formula of the trainer reads only these two tables, so one class
covers ε-, v- and flow-parametrised teachers. `model_timesteps[t]` is what the network is fed for index t (the index
itself for VP models; σ_t · N for SD3-style flow models, as diffusers' FlowMatchEulerDiscreteScheduler trains them).

The exact schedules of each family live in `tdm_core.schedules`; this class only holds the tables, built from its ᾱ,
from a flow shift, or from a diffusers scheduler object.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import schedules


@dataclass(frozen=True)
class DiscreteSchedule:
    alphas: torch.Tensor  # [N] float64, α_t
    sigmas: torch.Tensor  # [N] float64, σ_t
    model_timesteps: torch.Tensor  # [N] float64, the value the network is given for index t
    kind: str  # "vp" or "flow"

    @property
    def num_timesteps(self) -> int:
        return int(self.alphas.shape[0])

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """SNR_t = ᾱ/(1 − ᾱ) = α²/σ² (for flow: ((1 − σ)/σ)²)."""
        return (self.alphas[t] / self.sigmas[t]) ** 2

    # ---- constructors --------------------------------------------------------------------------------------
    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod) -> DiscreteSchedule:
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        return cls(ac.sqrt(), (1.0 - ac).clamp_min(0).sqrt(), torch.arange(ac.numel(), dtype=torch.float64), "vp")

    @classmethod
    def from_ve_sigmas(cls, ve_sigmas) -> DiscreteSchedule:
        """From a table of VE sigmas σ = sqrt((1 − ᾱ)/ᾱ) (how ComfyUI stores ε/v schedules): ᾱ = 1 / (1 + σ²)."""
        table = torch.as_tensor(ve_sigmas, dtype=torch.float64).flatten()
        return cls.from_alphas_cumprod(1.0 / (1.0 + table**2))

    @classmethod
    def from_flow_sigmas(cls, sigmas, multiplier: float = schedules.NUM_TRAIN_TIMESTEPS) -> DiscreteSchedule:
        """From a table of flow sigmas (ComfyUI's CONST model_sampling, shift already applied); the network is fed
        σ · multiplier."""
        table = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
        return cls(1.0 - table, table.clone(), table * multiplier, "flow")

    def with_pinned_grid(self, sigmas, model_timesteps) -> tuple[DiscreteSchedule, list[int]]:
        """Writes a flow grid's exact σ (and the integer timesteps the TDM sampler feeds) into the nearest table
        entries, so the student trains on exactly the levels it will be sampled at; returns the new schedule and the
        grid's indices. Refuses a σ that would break the table's order."""
        alphas, table, feed = self.alphas.clone(), self.sigmas.clone(), self.model_timesteps.clone()
        indices = []
        for sigma, timestep in zip(sigmas, model_timesteps, strict=True):
            index = int(torch.argmin((self.sigmas - float(sigma)).abs()))
            lower = float(self.sigmas[index - 1]) if index > 0 else -math.inf
            upper = float(self.sigmas[index + 1]) if index + 1 < len(table) else math.inf
            if not lower < float(sigma) < upper and float(self.sigmas[index]) != float(sigma):
                raise ValueError(f"grid σ {sigma} does not fit between the schedule's neighbours of index {index}")
            table[index] = float(sigma)
            alphas[index] = 1.0 - float(sigma)
            feed[index] = float(timestep)
            indices.append(index)
        if len(set(indices)) != len(indices):
            raise ValueError(f"grid sigmas {list(sigmas)} land on the same schedule index; use fewer steps")
        return DiscreteSchedule(alphas, table, feed, self.kind), indices

    @classmethod
    def flow(cls, shift: float = 1.0, num_timesteps: int = schedules.NUM_TRAIN_TIMESTEPS) -> DiscreteSchedule:
        """SD3-style rectified flow: u = (t+1)/N, σ = s·u / (1 + (s−1)·u), α = 1 − σ; the network sees σ·N.

        Matches diffusers' FlowMatchEulerDiscreteScheduler(shift=s) training tables (its `sigmas[::-1]`).
        """
        u = torch.arange(1, num_timesteps + 1, dtype=torch.float64) / num_timesteps
        sigmas = schedules.flow_shift(u, shift)
        return cls(1.0 - sigmas, sigmas, sigmas * num_timesteps, "flow")

    @classmethod
    def scaled_linear(cls, beta_start: float = schedules.SCALED_LINEAR_BETA_START,
                      beta_end: float = schedules.SCALED_LINEAR_BETA_END,
                      num_timesteps: int = schedules.NUM_TRAIN_TIMESTEPS):
        """The SD1.5 scaled-linear β schedule (`tdm_core.schedules.scaled_linear_alphas_cumprod`)."""
        return cls.from_alphas_cumprod(schedules.scaled_linear_alphas_cumprod(beta_start, beta_end, num_timesteps))

    @classmethod
    def cogvideox(cls) -> DiscreteSchedule:
        """CogVideoX-2b: scaled-linear, SNR shift 3, zero terminal SNR (`tdm_core.schedules.cogvideox_alphas_cumprod`)."""
        return cls.from_alphas_cumprod(schedules.cogvideox_alphas_cumprod())

    @classmethod
    def from_diffusers_scheduler(cls, scheduler) -> DiscreteSchedule:
        """Tables from a diffusers scheduler object: VP schedulers by `alphas_cumprod` (CogVideoX's SNR shift and
        zero-terminal-SNR rescale included), flow-matching schedulers by their configured shift."""
        if hasattr(scheduler, "alphas_cumprod"):
            return cls.from_alphas_cumprod(scheduler.alphas_cumprod)
        config = scheduler.config
        if "shift" in config:
            return cls.flow(float(config["shift"]), int(config["num_train_timesteps"]))
        raise TypeError(f"{type(scheduler).__name__} has neither alphas_cumprod nor a flow shift")
