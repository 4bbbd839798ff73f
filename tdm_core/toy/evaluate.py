"""Fixed-seed evaluation of toy teachers and TDM students (the numbers of the demo and of `bench/distill.py`).

Every model is scored on the same inputs: `samples_per_class` samples of each class (class-balanced, label i % C for
sample i), from one fixed noise tensor drawn with `noise_seed`. The teacher is sampled with deterministic DDIM (η = 0)
on the uniform grid t_k = N−1−k·(N//steps) with classifier-free guidance `cfg` (ε_u + s (ε_c − ε_u): on a fixed x_t
the same as guiding x̂0); the student with its own K-step sampler (`TDMTrainer.sample`, no CFG, K NFE).
Metric definitions: `tdm_core.toy.metrics`.
"""

from __future__ import annotations

import torch

from .metrics import DigitsMetric, GMMMetric
from .sampling import ddim_sample, uniform_grid
from .teacher import ToyTeacher


class ToyEvaluator:
    def __init__(self, teacher: ToyTeacher, samples_per_class: int = 200, noise_seed: int = 0,
                 metric: DigitsMetric | GMMMetric | None = None, cache_dir=None):
        self.teacher = teacher
        config = teacher.config
        if metric is None:
            metric = DigitsMetric(cache_dir) if config.task == "digits" else GMMMetric()
        self.metric = metric
        n = samples_per_class * config.num_classes
        self.labels = torch.arange(n) % config.num_classes
        self.prompts = [str(c) for c in self.labels.tolist()]
        self.noise = torch.randn(n, config.dim, generator=torch.Generator().manual_seed(noise_seed))

    @torch.no_grad()
    def teacher_samples(self, steps: int, cfg: float = 1.0) -> torch.Tensor:
        net, null = self.teacher.net, self.teacher.config.num_classes
        labels = self.labels
        both = torch.cat([labels, torch.full_like(labels, null)])

        def eps_fn(x, t):
            if cfg == 1.0:
                return net(x, t, labels)
            eps_c, eps_u = net(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
            return eps_u + cfg * (eps_c - eps_u)

        grid = uniform_grid(steps, self.teacher.config.num_timesteps)
        return ddim_sample(eps_fn, self.noise, grid, self.teacher.alphas_cumprod)

    @torch.no_grad()
    def student_samples(self, trainer, chunk: int = 1000) -> torch.Tensor:
        """The student's K-step samples (its training grid) from the same fixed noise."""
        parts = []
        for i in range(0, len(self.prompts), chunk):
            parts.append(trainer.sample(self.prompts[i : i + chunk], noise=self.noise[i : i + chunk]).cpu())
        return torch.cat(parts)

    def score(self, samples: torch.Tensor) -> dict[str, float]:
        scores = {"fd": self.metric.fd(samples), "acc": self.metric.accuracy(samples, self.labels)}
        if hasattr(self.metric, "fd_clf"):
            scores["fd_clf"] = self.metric.fd_clf(samples)
        return scores
