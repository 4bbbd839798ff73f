"""The toy tasks' data: scikit-learn's bundled 8x8 digits and a 2-D class-conditional Gaussian mixture.

Both are offline (the digits ship inside scikit-learn) and small enough to train a teacher on 2 CPU cores in
minutes (digits) or seconds (mixture). A class label is the "prompt": the string "3" selects class 3, and the
empty string "" is the unconditional prompt that classifier-free guidance needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DIGITS_SIDE = 8
DIGITS_DIM = DIGITS_SIDE * DIGITS_SIDE
DIGITS_CLASSES = 10


def load_digits_tensor() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as (images [N, 64] in [-1, 1], labels [N] int64).

    scikit-learn stores 4-bit grey levels 0..16; x / 8 − 1 maps them to the [-1, 1] range diffusion models expect.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the toy digits task needs scikit-learn (pip install scikit-learn; it ships the 8x8 digits data)"
        ) from exc

    digits = load_digits()
    images = torch.as_tensor(digits.data, dtype=torch.float32) / 8.0 - 1.0
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    return images, labels


def digits_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[..., 64] samples in [-1, 1] to [..., 8, 8] uint8 grey images (0 = black background, 255 = ink)."""
    img = ((x.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return img.reshape(*x.shape[:-1], DIGITS_SIDE, DIGITS_SIDE)


@dataclass(frozen=True)
class GaussianMixture2D:
    """A class-conditional 2-D mixture: `modes` equal-weight Gaussians on a circle, `classes` classes.

    Mode m belongs to class m % classes, so with 8 modes and 4 classes each class is bimodal (two opposite
    modes). A bimodal conditional is what makes few-step DDIM fail visibly: its early x̂0 is the mean of the two
    modes, so 4-step samples smear towards the centre, and distribution matching has something to fix.
    """

    modes: int = 8
    classes: int = 4
    radius: float = 1.0
    std: float = 0.08

    def centres(self) -> torch.Tensor:
        angles = torch.arange(self.modes, dtype=torch.float64) * (2 * math.pi / self.modes)
        return (self.radius * torch.stack([angles.cos(), angles.sin()], dim=-1)).float()

    def sample(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One point per label (int64 class ids), each from a uniformly chosen mode of its class."""
        per_class = self.modes // self.classes
        pick = torch.randint(0, per_class, labels.shape, generator=generator)
        mode = labels + pick * self.classes
        noise = torch.randn(*labels.shape, 2, generator=generator)
        return self.centres()[mode] + self.std * noise

    def sample_balanced(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n) % self.classes
        return self.sample(labels, generator), labels
