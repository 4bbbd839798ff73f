"""TDM's formulas (docs/tdm_method.md §2), as small pure functions on tensors.

Shapes: sample tensors are [B, ...]; per-sample coefficients (α, σ, SNR, weights) are [B] and broadcast over the
trailing dimensions. Names follow the document: x̂0 and ε̂ are the student's clean-sample and noise estimates, t_mid
the end of the student's step, τ the diffusion time of the score comparison, z fresh Gaussian noise.
"""

from __future__ import annotations

import math

import torch

PARAMETRISATIONS = ("eps", "v", "flow")


def _b(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] in the sample's dtype."""
    return coef.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def x0_and_eps(prediction: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, parametrisation: str):
    """(x̂0, ε̂) from a raw network output at x_t = α x0 + σ ε.

    eps: x̂0 = (x − σ ε̂)/α.  v (v = α ε − σ x0): x̂0 = α x − σ v, ε̂ = σ x + α v.
    flow (velocity v = ε − x0, α = 1 − σ): x̂0 = x − σ v, ε̂ = x + α v.
    """
    a, s = _b(alpha, x), _b(sigma, x)
    if parametrisation == "eps":
        return (x - s * prediction) / a, prediction
    if parametrisation == "v":
        return a * x - s * prediction, s * x + a * prediction
    if parametrisation == "flow":
        return x - s * prediction, x + a * prediction
    raise ValueError(f"unknown parametrisation {parametrisation!r}; expected one of {PARAMETRISATIONS}")


def x0_from_prediction(prediction, x, alpha, sigma, parametrisation):
    return x0_and_eps(prediction, x, alpha, sigma, parametrisation)[0]


def ddim_renoise(x0_hat: torch.Tensor, eps_hat: torch.Tensor, alpha_s: torch.Tensor, sigma_s: torch.Tensor):
    """Deterministic (η = 0) DDIM re-noise: x_s = α_s x̂0 + σ_s ε̂."""
    return _b(alpha_s, x0_hat) * x0_hat + _b(sigma_s, x0_hat) * eps_hat


def kernel_beta(alpha1, sigma1, alpha2, sigma2) -> torch.Tensor:
    """β = sqrt(σ2² − (α2 σ1/α1)²) of the forward kernel t1 → t2 (t2 > t1)."""
    return (sigma2**2 - (alpha2 * sigma1 / alpha1) ** 2).clamp_min(0).sqrt()


def forward_kernel(x1: torch.Tensor, z: torch.Tensor, alpha1, sigma1, alpha2, sigma2) -> torch.Tensor:
    """x_{t2} = (α2/α1) x_{t1} + β z."""
    return _b(alpha2 / alpha1, x1) * x1 + _b(kernel_beta(alpha1, sigma1, alpha2, sigma2), x1) * z


def mixed_noise(eps_hat: torch.Tensor, z: torch.Tensor, alpha1, sigma1, alpha2, sigma2) -> torch.Tensor:
    """m = ((α2/α1) σ1 ε̂ + β z)/σ2, so that x_{t2} = α2 x̂0 + σ2 m (with the October 2025 σ1 fix)."""
    beta = kernel_beta(alpha1, sigma1, alpha2, sigma2)
    return (_b(alpha2 / alpha1 * sigma1, eps_hat) * eps_hat + _b(beta, z) * z) / _b(sigma2, z)


def importance_weight(m: torch.Tensor, z: torch.Tensor, clip: float | None = None) -> torch.Tensor:
    """w_IS = exp(−½ mean_d(m²)) / exp(−½ mean_d(z²)), per sample, as in the official script; with `clip` = c,
    log w_IS is clamped to [−ln c, ln c] (Flow-Factory's density-ratio clip, c = 20)."""
    m2 = m.flatten(1).pow(2).mean(dim=1)
    z2 = z.flatten(1).pow(2).mean(dim=1)
    if clip is None:
        return torch.exp(-0.5 * m2) / torch.exp(-0.5 * z2)
    bound = math.log(clip)
    return torch.exp((-0.5 * (m2 - z2)).clamp(-bound, bound))


def fake_score_loss(fake_x0: torch.Tensor, x0_hat: torch.Tensor, snr: torch.Tensor, weight: torch.Tensor,
                    snr_clamp: float = 5.0) -> torch.Tensor:
    """L_fake = mean_b[ mean_d((x0(F) − x̂0)²) · min(SNR_τ, 5) · w_IS ] (x̂0 and the weights carry no gradient)."""
    dtype = torch.promote_types(fake_x0.dtype, torch.float32)
    per_sample = (fake_x0.to(dtype) - x0_hat.detach().to(dtype)).flatten(1).pow(2).mean(dim=1)
    clamp = snr.to(per_sample.dtype).clamp(max=snr_clamp)
    return (per_sample * clamp * weight.detach().to(per_sample.dtype)).mean()


def cfg_target(r_cond: torch.Tensor, r_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """r = r_u + s (r_c − r_u) (on x0 predictions)."""
    return r_uncond + scale * (r_cond - r_uncond)


def generator_loss(x0_hat: torch.Tensor, teacher_x0: torch.Tensor, fake_x0: torch.Tensor, kind: str = "pseudo_huber",
                   huber_c: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """The generator (student) loss; returns (loss, w).

    target = stopgrad(x̂0 + r − f), w = stopgrad(mean_{CHW} |x̂0 − r|) per sample, and
      pseudo_huber         mean((sqrt((x̂0 − target)² + c²) − c) / w), element-wise, c = 1e-3 (official script);
      pseudo_huber_vector  mean_b((sqrt(‖x̂0 − target‖² + c_d²) − c_d) / w), c_d = 0.00054·sqrt(d) (paper variant,
                           per-sample vector norm; unverified third-party summary, see tdm_method.md §2);
      mse                  mean((x̂0 − target)² / w).
    The gradient w.r.t. x̂0 is (x̂0 − target)/sqrt(·) / w = (f − r)/…: the DMD direction, per trajectory segment.
    """
    dtype = torch.promote_types(x0_hat.dtype, torch.float32)  # at least fp32, as the official script
    x0f, r = x0_hat.to(dtype), teacher_x0.to(dtype)
    with torch.no_grad():
        target = x0f + r - fake_x0.to(dtype)
        w = (x0f - r).abs().flatten(1).mean(dim=1)
    diff = x0f - target
    wb = _b(w, diff)
    if kind == "pseudo_huber":
        loss = ((diff.pow(2) + huber_c**2).sqrt() - huber_c) / wb
        return loss.mean(), w
    if kind == "pseudo_huber_vector":
        d = diff[0].numel()
        c = 0.00054 * math.sqrt(d)
        norm2 = diff.flatten(1).pow(2).sum(dim=1)
        return (((norm2 + c**2).sqrt() - c) / w).mean(), w
    if kind == "mse":
        return (diff.pow(2) / wb).mean(), w
    raise ValueError(f"unknown generator loss {kind!r}")
