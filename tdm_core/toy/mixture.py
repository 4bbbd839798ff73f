"""Analytic multi-modal toy teachers: isotropic Gaussian mixtures whose exact score is known in closed form.

A trained toy teacher (`tdm_core.toy.teacher`) is itself an approximation, so a student that "beats" or "misses" it
measures two errors at once. Here the teacher IS the data distribution: for x_t = α x0 + σ ε with x0 drawn from a
mixture of isotropic Gaussians N(μ_i, s² I) with weights w_i, the posterior mean E[x0 | x_t] is exact, hence so is
the teacher's ε̂ = (x_t − α E[x0 | x_t]) / σ. What a few-step sampler gets wrong is then visible directly against the
data: samples stranded between the modes, and the small modes' weight going to the big ones.

- `MixtureSpec` (tdm_core.toy.mixture_spec): the mixture (unequal weights on purpose — the small modes are what a slow student loses), exact
  sampling, the exact posterior mean `x0_mean`, and `between_modes` (outside every mode's 99.9 % ball).
- `MIXTURES` (tdm_core.toy.mixture_spec): the named targets "mix2d" (2-D, 5 modes) and "mix16d" (16-D, 8 modes).
- `MixtureEpsNet`: the teacher network, analytic ε plus a frozen residual `ToyEpsNet` whose output layer is zero, so
  the base network is exactly the analytic teacher and LoRA adapters on the residual's linears give the student and
  the fake score trainable capacity that starts exactly at the teacher (peft's B = 0). With `features` (a network
  that learned the mixture, e.g. the pace benchmark's learned teacher) the adapters sit on that network's own linears
  instead, minus a frozen copy of it: still exactly the analytic teacher, but adapters on learned, non-zero weights.
- `MixtureBackend` / `make_backend`: the `tdm_core.distill` backend and its CLI factory
  (`teacher = {"factory": "tdm_core.toy.mixture:make_backend", "target": "mix16d"}`).
- `teacher_samples`: deterministic DDIM (η = 0) with the analytic ε (`exact_eps_fn`) on the toy's uniform grid
  (`tdm_core.toy.sampling`).
- Metrics (pure functions): `sliced_wasserstein`, `mode_shares` / `mode_weight_tv`, `between_share`.

Prompts: "0" is the mixture, "" (the null class) the same mixture; the task is unconditional and runs at cfg 1.
No ComfyUI, no scikit-learn, no scipy.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from ..distill import DistillConfig
from .backend import LabelledToyBackend, adapter_settings
from .experiment import digits_distill_config
from .mixture_spec import MixtureSpec, get_mixture, posterior_mean
from .networks import ToyEpsNet
from .sampling import ddim_sample, uniform_grid, vp_alphas_cumprod

#: The residual network's fixed initialisation seed (its weights are frozen; only LoRA adapters on it train).
RESIDUAL_SEED = 0


# ---------------------------------------------------------------------------------------------------------------
# The teacher network and its backend


class MixtureEpsNet(nn.Module):
    """ε̂(x_t, t, labels) = the mixture's exact ε at integer timestep t (VP, ᾱ of `vp_alphas_cumprod(schedule)`)
    + a residual `ToyEpsNet` (one class + the null class) whose `out` layer is zero.

    The residual's weights come from `residual_seed` and are frozen; with its output layer zero, the base network
    is exactly the analytic teacher, and LoRA adapters on the residual's linears (`LORA_TARGET_MODULES`) start at
    the teacher too. `t` may be integer or float (the backend feeds float32 schedule indices): it is rounded to the
    nearest index. The analytic part is computed in float64 from float64 buffers and ignores the labels."""

    def __init__(self, spec: MixtureSpec | str, *, schedule: str = "scaled_linear", num_timesteps: int = 1000,
                 hidden: int = 128, depth: int = 2, residual_seed: int = RESIDUAL_SEED,
                 features: nn.Module | None = None):
        super().__init__()
        self.spec = get_mixture(spec)
        self.num_timesteps = num_timesteps
        self.register_buffer("alphas_cumprod", vp_alphas_cumprod(schedule, num_timesteps))
        self.register_buffer("centres", self.spec.centre_tensor())
        self.register_buffer("log_weights", self.spec.weight_tensor().log())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(residual_seed)
            self.residual = ToyEpsNet(self.spec.dim, 1, hidden=hidden, depth=depth)
        with torch.no_grad():
            self.residual.out.weight.zero_()
            self.residual.out.bias.zero_()
        # `features`: a network that learned this mixture (its ε(x, t, labels)) carries the adapters instead, minus a
        # frozen copy of itself, so the base is still exactly the analytic teacher while the adapters act on learned
        # features with non-zero weights, as on a real checkpoint (a zero output layer passes no gradient back to the
        # layers before it until the adapters have grown). The copy is held outside the module tree: no adapter
        # reaches it.
        self._frozen_features: tuple[nn.Module, ...] = ()
        if features is not None:
            self.residual = copy.deepcopy(features)
            self._frozen_features = (copy.deepcopy(features).requires_grad_(False).eval(),)
        self.requires_grad_(False)

    @property
    def null_class(self) -> int:
        return self.residual.null_class

    def analytic_eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The mixture's exact ε at timestep indices t [B] (float64)."""
        idx = t.detach().round().long().clamp(0, self.num_timesteps - 1).to(self.alphas_cumprod.device)
        abar = self.alphas_cumprod.double()[idx]
        alpha, sigma = abar.sqrt(), (1.0 - abar).sqrt()
        x64 = x.detach().to(torch.float64)
        x0 = posterior_mean(x64, alpha, sigma, self.centres, self.log_weights, self.spec.std)
        return (x64 - alpha[:, None] * x0) / sigma[:, None]

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        eps = self.analytic_eps(x, t).to(x.dtype)
        residual = self.residual(x, t, labels).to(x.dtype)
        if self._frozen_features:
            with torch.no_grad():
                base = self._frozen_features[0](x, t, labels).to(x.dtype)
            residual = residual - base
        return eps + residual


class MixtureBackend(LabelledToyBackend):
    """A `TeacherBackend` (ε-parametrised, VP scaled-linear, N = 1000) over `MixtureEpsNet`: student and fake score
    are peft LoRA adapters on the residual's linears (or full copies in "full" mode), as `ToyBackend` does."""

    def __init__(self, spec: MixtureSpec | str = "mix2d", *, mode: str = "lora", lora_rank: int = 16,
                 lora_alpha: float | None = None, target_modules: list[str] | None = None, adapter_seed: int = 0,
                 features: nn.Module | None = None):
        self.spec = get_mixture(spec)
        net = MixtureEpsNet(self.spec, features=features)
        super().__init__(net, net.alphas_cumprod, self.spec.dim, f"toy_{self.spec.name}", 1, mode=mode,
                         lora_rank=lora_rank, lora_alpha=lora_alpha, target_modules=target_modules,
                         adapter_seed=adapter_seed)

    @property
    def class_prompts(self) -> list[str]:
        return ["0"]

    def preview_image(self, x0: torch.Tensor) -> np.ndarray:
        """A 128×128 scatter plot of the first two coordinates (white dots; the centres in red)."""
        x0 = x0.detach().cpu().double()[:, :2]
        centres = self.spec.centre_tensor()[:, :2]
        extent = float(centres.abs().max()) + 4 * self.spec.std
        canvas = np.zeros((128, 128, 3), dtype=np.uint8)

        def pix(p: torch.Tensor) -> np.ndarray:
            return ((p.clamp(-extent, extent) + extent) / (2 * extent) * 127).round().long().numpy()

        pts = pix(x0)
        canvas[127 - pts[:, 1], pts[:, 0]] = 255
        ctr = pix(centres)
        canvas[127 - ctr[:, 1], ctr[:, 0]] = (255, 0, 0)
        return canvas


def make_backend(config=None, target: str = "mix2d", lora_rank: int | None = None, mode: str | None = None,
                 **_ignored) -> MixtureBackend:
    """The CLI factory (`teacher = {"factory": "tdm_core.toy.mixture:make_backend", "target": "mix16d"}`); LoRA
    settings come from the DistillConfig (rank, alpha, target modules, adapter seed = config.seed)."""
    if _ignored:
        raise TypeError(f"make_backend got unexpected arguments {sorted(_ignored)}; it takes target, lora_rank, mode")
    return MixtureBackend(target, **adapter_settings(config, lora_rank, mode))


def mixture_distill_config(target: str | MixtureSpec, **overrides) -> DistillConfig:
    """The toy TDM recipe (`tdm_core.toy.experiment.digits_distill_config`: lr 1e-3, batch 256, rank 64, N = 1000,
    K = 4, cfg 1, seed 0) with the mixture's one prompt "0" and family "toy_<name>"; `overrides` win."""
    spec = get_mixture(target)
    return digits_distill_config(**{"prompts": ["0"], "family": f"toy_{spec.name}", **overrides})


# ---------------------------------------------------------------------------------------------------------------
# Teacher sampling


@torch.no_grad()
def teacher_samples(spec: MixtureSpec | str, noise: torch.Tensor, steps: int,
                    alphas_cumprod: torch.Tensor | None = None) -> torch.Tensor:
    """Deterministic DDIM (η = 0) with the exact ε from `noise` (labelled t = 999) on the uniform grid of `steps`
    (`uniform_grid`: 50 -> 999, 979, …, 19; 4 -> 999, 749, 499, 249, the student's grid
    `DistillConfig(total_steps=1000, steps=4).grid()`), ending at x̂0; float64 throughout, float32 result."""
    spec = get_mixture(spec)
    abar = (vp_alphas_cumprod("scaled_linear") if alphas_cumprod is None else alphas_cumprod).to(torch.float64)
    return ddim_sample(exact_eps_fn(spec, abar), noise.to(torch.float64), uniform_grid(steps, abar.shape[0]),
                       abar).float()


def exact_eps_fn(spec: MixtureSpec | str, alphas_cumprod: torch.Tensor):
    """The mixture's exact ε as `ddim_sample`'s eps_fn(x, t[B]) on the schedule ᾱ = `alphas_cumprod` (float64)."""
    spec = get_mixture(spec)
    abar = alphas_cumprod.to(torch.float64)

    def eps_fn(x, t):
        a = abar[t]
        return spec.eps(x, a.sqrt(), (1.0 - a).sqrt())

    return eps_fn


# ---------------------------------------------------------------------------------------------------------------
# Metrics


def _quantiles(sorted_proj: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of each column's empirical quantile function (sorted [n, P]) at `levels` in [0, 1],
    with the k-th order statistic at level (k + ½)/n (levels outside the end points take the end values)."""
    n = sorted_proj.shape[0]
    pos = (levels * n - 0.5).clamp(0, n - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=n - 1)
    frac = (pos - lo.to(pos.dtype))[:, None]
    return sorted_proj[lo] * (1 - frac) + sorted_proj[hi] * frac


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance: sqrt(mean over `projections` fixed random unit directions u of W2²(u·a, u·b)).

    The directions are N(0, I) draws from torch.Generator(seed), normalised (the same for every call with the same
    dim and seed). Per direction, W2² between the two 1-D empirical distributions = ∫ (F_a⁻¹(p) − F_b⁻¹(p))² dp,
    evaluated at p = (k + ½)/m, k < m = max(n_a, n_b): with equal sizes this is exactly the matching of sorted
    projections; with unequal sizes the smaller set's quantile function is interpolated linearly. float64."""
    a64 = a.detach().to(torch.float64).reshape(a.shape[0], -1)
    b64 = b.detach().to(torch.float64).reshape(b.shape[0], -1)
    if a64.shape[1] != b64.shape[1]:
        raise ValueError(f"sliced_wasserstein: dimensions differ ({a64.shape[1]} vs {b64.shape[1]})")
    dirs = torch.randn(a64.shape[1], projections, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, pb = (a64 @ dirs).sort(0).values, (b64 @ dirs).sort(0).values
    m = max(pa.shape[0], pb.shape[0])
    levels = (torch.arange(m, dtype=torch.float64) + 0.5) / m
    qa = pa if pa.shape[0] == m else _quantiles(pa, levels)
    qb = pb if pb.shape[0] == m else _quantiles(pb, levels)
    return float(((qa - qb) ** 2).mean().sqrt())


def mode_shares(spec: MixtureSpec | str, x: torch.Tensor) -> torch.Tensor:
    """The share of samples whose nearest centre is mode i (float64 [modes]; between-mode samples count too)."""
    spec = get_mixture(spec)
    return torch.bincount(spec.nearest_mode(x), minlength=spec.modes).double() / x.shape[0]


def mode_weight_tv(spec: MixtureSpec | str, x: torch.Tensor) -> float:
    """Total variation ½ Σ_i |share_i − w_i| between the nearest-centre shares and the true weights (0 … 1)."""
    spec = get_mixture(spec)
    return float(0.5 * (mode_shares(spec, x) - spec.weight_tensor()).abs().sum())


def between_share(spec: MixtureSpec | str, x: torch.Tensor) -> float:
    """The fraction of samples outside every mode's 99.9 % ball (`MixtureSpec.between_modes`); ≈ 0.001 for data."""
    return float(get_mixture(spec).between_modes(x).double().mean())
