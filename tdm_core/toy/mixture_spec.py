"""The analytic Gaussian mixtures themselves (tdm_core.toy.mixture builds teachers and backends on them): exact
sampling, the exact posterior mean, and which samples lie between the modes. Data only, so the trained toy teachers
(tdm_core.toy.teacher) can learn these targets without importing the backends built on those teachers.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

#: The mass of a component's own ball that `between_modes` treats as "on the mode".
BETWEEN_MODES_MASS = 0.999


# ---------------------------------------------------------------------------------------------------------------
# The mixture


@functools.cache
def chi2_quantile(dim: int, p: float = BETWEEN_MODES_MASS) -> float:
    """The p-quantile of the chi-square distribution with `dim` degrees of freedom: the q with
    P(|z|² ≤ q) = p for z ~ N(0, I_dim), i.e. regularised lower incomplete gamma P(dim/2, q/2) = p, solved by
    bisection in float64 (`torch.special.gammainc`; no scipy). dim = 2, p = 0.999: q = −2 ln(0.001) = 13.8155."""
    if dim < 1 or not 0.0 < p < 1.0:
        raise ValueError(f"chi2_quantile needs dim ≥ 1 and 0 < p < 1, got dim={dim}, p={p}")
    k = torch.tensor(dim / 2.0, dtype=torch.float64)

    def cdf(q: float) -> float:
        return float(torch.special.gammainc(k, torch.tensor(q / 2.0, dtype=torch.float64)))

    lo, hi = 0.0, float(dim)
    while cdf(hi) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if cdf(mid) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return 0.5 * (lo + hi)


def _coef(value, x: torch.Tensor) -> torch.Tensor:
    """A scalar or a per-sample [B] coefficient as float64 [B or 1, 1] on x's device."""
    c = torch.as_tensor(value, dtype=torch.float64, device=x.device)
    return c.reshape(-1, 1) if c.ndim else c.reshape(1, 1)


def posterior_mean(x_t: torch.Tensor, alpha, sigma, centres: torch.Tensor, log_weights: torch.Tensor,
                   std: float) -> torch.Tensor:
    """E[x0 | x_t] for x_t = α x0 + σ ε, x0 ~ Σ_i w_i N(μ_i, s² I); float64 [B, d].

    Component i's evidence is N(x_t; α μ_i, v I) with v = α² s² + σ² (the same v for every component, so the
    normaliser cancels); responsibilities r_i = softmax_i(log w_i − |x_t − α μ_i|² / 2v) (logsumexp in float64);
    E[x0 | x_t, i] = μ_i + (α s² / v)(x_t − α μ_i), hence E[x0 | x_t] = (α s² x_t + σ² Σ_i r_i μ_i) / v."""
    x = x_t.to(torch.float64)
    a, s = _coef(alpha, x), _coef(sigma, x)
    mu = centres.to(device=x.device, dtype=torch.float64)
    var = a * a * std * std + s * s  # [B, 1]
    sq = ((x[:, None, :] - a[:, :, None] * mu[None]) ** 2).sum(-1)  # [B, M]
    logits = log_weights.to(device=x.device, dtype=torch.float64)[None] - sq / (2.0 * var)
    resp = torch.softmax(logits, dim=-1)
    return (a * std * std * x + s * s * (resp @ mu)) / var


@dataclass(frozen=True, eq=False)
class MixtureSpec:
    """An isotropic Gaussian mixture Σ_i w_i N(μ_i, std² I) in `dim` dimensions (weights normalised to sum 1)."""

    name: str
    dim: int
    weights: tuple[float, ...]
    centres: tuple[tuple[float, ...], ...]
    std: float

    def __post_init__(self):
        if len(self.weights) != len(self.centres) or not self.weights:
            raise ValueError(f"mixture {self.name!r}: {len(self.weights)} weights for {len(self.centres)} centres")
        if any(len(c) != self.dim for c in self.centres):
            raise ValueError(f"mixture {self.name!r}: every centre needs {self.dim} coordinates")
        if any(w <= 0 for w in self.weights) or abs(sum(self.weights) - 1.0) > 1e-9:
            raise ValueError(f"mixture {self.name!r}: weights must be positive and sum to 1, got {self.weights}")
        if not self.std > 0:
            raise ValueError(f"mixture {self.name!r}: std must be > 0, got {self.std}")

    @property
    def modes(self) -> int:
        return len(self.weights)

    def weight_tensor(self) -> torch.Tensor:
        return torch.tensor(self.weights, dtype=torch.float64)

    def centre_tensor(self) -> torch.Tensor:
        return torch.tensor(self.centres, dtype=torch.float64)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n exact samples (float32 [n, dim]): a component by its weight, then its Gaussian."""
        comp = torch.multinomial(self.weight_tensor(), n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.centre_tensor()[comp] + self.std * noise).float()

    def x0_mean(self, x_t: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """The exact posterior mean E[x0 | x_t] (float64 [B, dim]); α, σ scalars or per-sample [B]."""
        return posterior_mean(x_t, alpha, sigma, self.centre_tensor(), self.weight_tensor().log(), self.std)

    def eps(self, x_t: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """The exact ε-prediction E[ε | x_t] = (x_t − α E[x0 | x_t]) / σ (float64 [B, dim])."""
        x = x_t.to(torch.float64)
        return (x - _coef(alpha, x) * self.x0_mean(x, alpha, sigma)) / _coef(sigma, x)

    def nearest_mode(self, x: torch.Tensor) -> torch.Tensor:
        """The index of the nearest centre per sample (int64 [B])."""
        return torch.cdist(x.to(torch.float64), self.centre_tensor()).argmin(-1)

    @property
    def between_threshold(self) -> float:
        """std² · q, q the chi-square(dim) 0.999 quantile: the squared radius holding 99.9 % of one component."""
        return self.std**2 * chi2_quantile(self.dim)

    def between_modes(self, x: torch.Tensor) -> torch.Tensor:
        """True where a sample's squared distance to EVERY centre exceeds std² · q (bool [B]): outside each mode's
        99.9 % ball. An exact sample is flagged with probability ≈ 0.001 (its own component's tail)."""
        sq = torch.cdist(x.to(torch.float64), self.centre_tensor()) ** 2
        return (sq > self.between_threshold).all(-1)


def _mix2d() -> MixtureSpec:
    """2-D: 5 modes on the unit circle (72° apart: neighbours 1.18 apart, 11.8 std), std 0.1, weights
    0.5 / 0.25 / 0.15 / 0.07 / 0.03 counter-clockwise from (1, 0)."""
    angles = [2 * math.pi * k / 5 for k in range(5)]
    centres = tuple((round(math.cos(a), 12), round(math.sin(a), 12)) for a in angles)
    return MixtureSpec("mix2d", 2, (0.5, 0.25, 0.15, 0.07, 0.03), centres, 0.1)


def _mix16d() -> MixtureSpec:
    """16-D: 8 modes with geometric weights 0.6^i / Σ 0.6^j (0.407 … 0.011), std 0.2; centres = 2 × a random
    orthonormal 8-frame (QR of a 16×8 N(0, 1) matrix drawn once with torch.Generator seed 16), so every centre has
    norm 2 and every pair is 2√2 = 2.83 (14 std) apart: the 99.9 % balls (radius 0.2·√39.25 = 1.25) are disjoint
    and the midpoint of any two modes (1.41 from both) counts as between modes."""
    gen = torch.Generator().manual_seed(16)
    q, r = torch.linalg.qr(torch.randn(16, 8, generator=gen, dtype=torch.float64))
    centres = 2.0 * (q * torch.sign(torch.diagonal(r))).T  # sign-fixed Q: a deterministic frame
    ratios = [0.6**i for i in range(8)]
    total = sum(ratios)
    weights = tuple(r / total for r in ratios)
    return MixtureSpec("mix16d", 16, weights, tuple(tuple(float(v) for v in row) for row in centres), 0.2)


#: The named analytic targets.
MIXTURES: dict[str, MixtureSpec] = {"mix2d": _mix2d(), "mix16d": _mix16d()}


def get_mixture(target: str | MixtureSpec) -> MixtureSpec:
    if isinstance(target, MixtureSpec):
        return target
    spec = MIXTURES.get(target)
    if spec is None:
        raise ValueError(f"unknown mixture target {target!r}; use one of {sorted(MIXTURES)}")
    return spec
