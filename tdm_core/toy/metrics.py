"""The toy benchmark's metrics: Fréchet distance on a fixed feature map, and a fixed classifier's accuracy.

Definitions (all fixed: no metric depends on the model being measured or on the run):

- **Features.** Digits: the 64 pixels themselves, clamped to [-1, 1] (the image that is shown) — the identity is
  the fixed feature map; 8x8 digits are low-dimensional enough for FD to be computed on them directly, and pixel FD
  separates the teacher's 4-step from its 50-step samples more clearly than learned features do (blur and speckle
  change the pixel covariance). A secondary FD (`fd_clf`) uses the 64-d penultimate activations (after ReLU) of
  `DigitsClassifier`, a 64→128→64→10 MLP trained once on all 1797 digits with seed 0 (full-batch Adam, 400
  epochs) and cached next to the toy teachers; it is noisier from one student checkpoint to the next.
  Mixture (2-D): 64 random Fourier features cos(W x + b) with W ~ N(0, 2²), b ~ U[0, 2π), drawn with seed 0 — a
  map that sees the mixture's modes, which the raw coordinates' mean and covariance cannot.
- **Fréchet distance** FD = |μ_a − μ_b|² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½) between Gaussians fitted (float64,
  unbiased covariance) to the two feature sets — the FID formula on the toy's feature map. The reference set is
  the real data: all 1797 digits, or 4000 mixture points drawn with seed 1234.
- **Accuracy**: the fraction of samples generated for class c that `DigitsClassifier` labels c, averaged over the
  classes (the generated set is class-balanced). For the mixture: the fraction of samples whose nearest mode
  belongs to the requested class.
- **Sample counts and seeds** live in the benchmark (`bench/distill.py`): a fixed number of samples per class
  from fixed noise seeds, identical for every model compared.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .cache_lock import cache_dir
from .data import DIGITS_CLASSES, DIGITS_DIM, GaussianMixture2D, load_digits_tensor

CLASSIFIER_SEED = 0
CLASSIFIER_EPOCHS = 400
GMM_REFERENCE_SIZE = 4000
GMM_REFERENCE_SEED = 1234


def frechet_distance(feats_a: torch.Tensor | np.ndarray, feats_b: torch.Tensor | np.ndarray) -> float:
    """FD between Gaussians fitted to two feature sets [n, d] (float64; eigen-decomposition square root)."""
    a = np.asarray(feats_a, dtype=np.float64)
    b = np.asarray(feats_b, dtype=np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr((Σa Σb)^½) = Σ sqrt(eig(Σa^½ Σb Σa^½)), computed on symmetric PSD matrices for stability.
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = sqrt_a @ cov_b @ sqrt_a
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    fd = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_covmean)
    return max(fd, 0.0)


class DigitsClassifier(nn.Module):
    """The fixed metric network: 64 → 128 → 64 (features) → 10 logits."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(DIGITS_DIM, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.head = nn.Linear(64, DIGITS_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.clamp(-1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _classifier_path(directory: Path) -> Path:
    spec = json.dumps({"seed": CLASSIFIER_SEED, "epochs": CLASSIFIER_EPOCHS, "arch": "64-128-64-10", "v": 1})
    return directory / f"toy_digits_classifier_{hashlib.sha256(spec.encode()).hexdigest()[:12]}.safetensors"


def load_digits_classifier(directory: str | Path | None = None) -> DigitsClassifier:
    """The fixed digits classifier, trained once (seed 0) and cached; about 2 s to train on 2 CPU cores."""
    path = _classifier_path(Path(directory) if directory is not None else cache_dir())
    clf = DigitsClassifier()
    if path.is_file():
        clf.load_state_dict(load_file(str(path)))
        return clf.eval().requires_grad_(False)
    images, labels = load_digits_tensor()
    with torch.random.fork_rng():
        torch.manual_seed(CLASSIFIER_SEED)
        clf = DigitsClassifier()
        opt = torch.optim.Adam(clf.parameters(), lr=3e-3, weight_decay=1e-4)
        for _ in range(CLASSIFIER_EPOCHS):
            loss = nn.functional.cross_entropy(clf(images), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
    return clf.eval().requires_grad_(False)


class DigitsMetric:
    """FD (pixels; `fd_clf`: classifier features) and per-class accuracy against all 1797 real digits."""

    def __init__(self, directory: str | Path | None = None):
        self.classifier = load_digits_classifier(directory)
        images, _ = load_digits_tensor()
        self.reference = images.double()
        with torch.no_grad():
            self.reference_clf = self.classifier.features(images).double()

    def fd(self, samples: torch.Tensor) -> float:
        return frechet_distance(samples.double().clamp(-1, 1), self.reference)

    @torch.no_grad()
    def fd_clf(self, samples: torch.Tensor) -> float:
        return frechet_distance(self.classifier.features(samples.float()), self.reference_clf)

    @torch.no_grad()
    def accuracy(self, samples: torch.Tensor, labels: torch.Tensor) -> float:
        pred = self.classifier(samples.float()).argmax(-1)
        per_class = [(pred[labels == c] == c).float().mean().item() for c in labels.unique().tolist()]
        return float(sum(per_class) / len(per_class))


class GMMMetric:
    """FD on 64 fixed random Fourier features and nearest-mode class accuracy, against 4000 true mixture points."""

    def __init__(self, gmm: GaussianMixture2D | None = None, num_features: int = 64, bandwidth: float = 2.0):
        self.gmm = gmm or GaussianMixture2D()
        gen = torch.Generator().manual_seed(0)
        self.w = torch.randn(2, num_features, generator=gen, dtype=torch.float64) * bandwidth
        self.b = torch.rand(num_features, generator=gen, dtype=torch.float64) * 2 * math.pi
        ref_gen = torch.Generator().manual_seed(GMM_REFERENCE_SEED)
        ref, _ = self.gmm.sample_balanced(GMM_REFERENCE_SIZE, ref_gen)
        self.reference = self.features(ref)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cos(x.double() @ self.w + self.b)

    def fd(self, samples: torch.Tensor) -> float:
        return frechet_distance(self.features(samples), self.reference)

    def accuracy(self, samples: torch.Tensor, labels: torch.Tensor) -> float:
        d = torch.cdist(samples.float(), self.gmm.centres())
        pred = d.argmin(-1) % self.gmm.classes
        per_class = [(pred[labels == c] == c).float().mean().item() for c in labels.unique().tolist()]
        return float(sum(per_class) / len(per_class))
