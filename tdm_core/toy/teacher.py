"""Toy teachers: train (once) and cache a small class-conditional ε-prediction diffusion model.

Tasks:
- ``"digits"``: scikit-learn's 8x8 digits, 10 classes, a residual MLP trained for a few thousand steps
  (about a minute on 2 CPU cores), the task of the demo and of `bench/distill.py`;
- ``"gmm"``: a 2-D class-conditional Gaussian mixture (`data.GaussianMixture2D`), a tiny MLP trained in seconds,
  for fast tests;
- ``"mix2d"`` / ``"mix16d"``: the unequal-weight mixtures of `tdm_core.toy.mixture` (one class), learned from their
  samples like any diffusion model: the "learned" targets of `bench/pace.py`, whose LoRAs sit on features the
  teacher has learned (the exact-ε targets put them on a frozen random residual).

Both use a VP schedule with N = 1000 integer timesteps (`x_t = α_t x0 + σ_t ε`, α_t = sqrt(ᾱ_t),
σ_t = sqrt(1 − ᾱ_t)) and the standard ε-MSE loss with label dropout (the null class is the empty prompt of CFG).
A trained teacher is cached as safetensors under `cache_dir()` keyed by a hash of its full config, so a second run
(and the benchmark after the demo) reuses it instead of retraining.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .cache_lock import cache_dir, training_lock
from .data import DIGITS_CLASSES, DIGITS_DIM, GaussianMixture2D, load_digits_tensor
from .mixture_spec import get_mixture
from .networks import ToyEpsNet
from .sampling import vp_alphas_cumprod

#: Bump when the training procedure changes in a way the config does not capture: it invalidates the cache.
TEACHER_FORMAT_VERSION = 1
#: The tdm_core.toy.mixture targets a teacher can also learn from samples.
MIXTURE_TASKS = ("mix2d", "mix16d")


@dataclass(frozen=True)
class ToyTeacherConfig:
    """Everything that determines a toy teacher's weights (the cache key is a hash of all of it)."""

    task: str = "digits"  # "digits" | "gmm"
    schedule: str = "scaled_linear"
    num_timesteps: int = 1000
    hidden: int = 256
    depth: int = 2
    train_steps: int = 8000
    batch_size: int = 128
    lr: float = 1e-3
    ema_decay: float = 0.999
    label_dropout: float = 0.1  # probability of replacing the class by the null class (CFG training)
    seed: int = 0

    def key(self) -> str:
        payload = json.dumps({"format": TEACHER_FORMAT_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    @property
    def dim(self) -> int:
        if self.task in MIXTURE_TASKS:
            return get_mixture(self.task).dim
        return DIGITS_DIM if self.task == "digits" else 2

    @property
    def num_classes(self) -> int:
        if self.task in MIXTURE_TASKS:
            return 1
        return DIGITS_CLASSES if self.task == "digits" else GaussianMixture2D().classes


#: The digits teacher of the demo and the benchmark.
DIGITS_TEACHER = ToyTeacherConfig()
#: The 2-D mixture teacher of the fast tests (trains in a few seconds).
GMM_TEACHER = ToyTeacherConfig(task="gmm", hidden=128, depth=2, train_steps=2000, batch_size=256, lr=2e-3)
#: bench/pace.py's learned mixture teachers (about a minute each on 2 CPU cores, then cached).
LEARNED_MIXTURE_TEACHERS = {task: ToyTeacherConfig(task=task, hidden=256, depth=3, train_steps=6000, batch_size=512,
                                                   lr=2e-3, label_dropout=0.0)
                            for task in MIXTURE_TASKS}


@dataclass
class ToyTeacher:
    """A trained, frozen toy teacher: the network, its schedule and where it came from."""

    net: ToyEpsNet
    config: ToyTeacherConfig
    alphas_cumprod: torch.Tensor  # [N] float64
    path: Path | None = None
    from_cache: bool = False
    train_seconds: float = 0.0

    @property
    def class_names(self) -> list[str]:
        return [str(i) for i in range(self.config.num_classes)]


def _build_net(config: ToyTeacherConfig) -> ToyEpsNet:
    return ToyEpsNet(config.dim, config.num_classes, hidden=config.hidden, depth=config.depth)


def _training_data(config: ToyTeacherConfig, generator: torch.Generator):
    """A callable batch sampler: returns (x0 [B, dim], labels [B])."""
    if config.task == "digits":
        images, labels = load_digits_tensor()

        def batch():
            idx = torch.randint(0, images.shape[0], (config.batch_size,), generator=generator)
            return images[idx], labels[idx]

        return batch
    if config.task in MIXTURE_TASKS:
        spec = get_mixture(config.task)

        def batch():
            return spec.sample(config.batch_size, generator).float(), torch.zeros(config.batch_size, dtype=torch.long)

        return batch
    if config.task == "gmm":
        gmm = GaussianMixture2D()

        def batch():
            lab = torch.randint(0, gmm.classes, (config.batch_size,), generator=generator)
            return gmm.sample(lab, generator), lab

        return batch
    raise ValueError(f"unknown toy task {config.task!r}; use 'digits', 'gmm' or one of {MIXTURE_TASKS}")


def train_teacher(config: ToyTeacherConfig, log=None) -> ToyEpsNet:
    """Trains a teacher from scratch with a fixed seed (ε-MSE, label dropout, AdamW + cosine LR, EMA weights)."""
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    net = _build_net(config)
    return fit_denoiser(net, _training_data(config, gen), gen, config, warmup=200, log_every=1000,
                        log=None if log is None else lambda step, loss: log(
                            f"toy teacher [{config.task}] step {step}/{config.train_steps} loss {loss:.4f}"))


def fit_denoiser(net: torch.nn.Module, batch, gen: torch.Generator, config, *, warmup: int, log_every: int,
                 log=None) -> torch.nn.Module:
    """The toy teachers' training loop (the image/mixture teachers here, the video teacher of tdm_core.toy.video):
    ε-MSE on x_t = √ᾱ x0 + √(1−ᾱ) ε at uniform t, labels dropped to the null class (`config.num_classes`) with
    probability `config.label_dropout`, AdamW with linear warm-up then cosine decay, and an EMA of the weights, which
    it returns. `batch()` gives (x0, labels); every draw comes from `gen`. `log(step, loss)` every `log_every` steps."""
    ema = copy.deepcopy(net).requires_grad_(False)
    abar = vp_alphas_cumprod(config.schedule, config.num_timesteps).float()
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * i / config.train_steps))
    )
    for step in range(config.train_steps):
        x0, labels = batch()
        drop = torch.rand(labels.shape, generator=gen) < config.label_dropout
        labels = torch.where(drop, torch.full_like(labels, config.num_classes), labels)
        t = torch.randint(0, config.num_timesteps, labels.shape, generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = abar[t].reshape(-1, *[1] * (x0.ndim - 1))
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = torch.nn.functional.mse_loss(net(x_t, t, labels), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters(), strict=True):
                pe.lerp_(p, 1.0 - config.ema_decay)
        if log is not None and (step % log_every == 0 or step == config.train_steps - 1):
            log(step + 1, loss.item())
    return ema


def teacher_path(config: ToyTeacherConfig, directory: Path | None = None) -> Path:
    return (directory or cache_dir()) / f"toy_teacher_{config.task}_{config.key()}.safetensors"


def load_or_train_teacher(
    config: ToyTeacherConfig = DIGITS_TEACHER, directory: str | Path | None = None, log=None
) -> ToyTeacher:
    """The cached teacher for `config` if present, else trains it and writes the cache atomically."""
    path = teacher_path(config, Path(directory) if directory is not None else None)
    with training_lock(path):
        return _load_or_train(config, path, log)


def _load_or_train(config: ToyTeacherConfig, path: Path, log) -> ToyTeacher:
    abar = vp_alphas_cumprod(config.schedule, config.num_timesteps)
    metadata = {"config": json.dumps(asdict(config)), "format": str(TEACHER_FORMAT_VERSION)}
    net, from_cache, seconds = cached_network(path, lambda: _build_net(config), lambda: train_teacher(config, log=log),
                                              metadata, f"toy teacher [{config.task}]", log)
    return ToyTeacher(net, config, abar, path, from_cache=from_cache, train_seconds=seconds)


def cached_network(path: Path, build, train, metadata: dict[str, str], what: str, log=None):
    """(network, from the cache, training seconds) for the toy teachers' cache: `build()` with the weights at `path`
    when the file exists, else `train()`'s network written there atomically (a temporary file, then a rename) with
    `metadata`; frozen and in eval mode either way. Call it under `training_lock(path)`."""
    if path.is_file():
        net = build()
        net.load_state_dict(load_file(str(path)))
        if log is not None:
            log(f"{what}: reusing {path}")
        return net.eval().requires_grad_(False), True, 0.0
    start = time.perf_counter()
    trained = train()
    seconds = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    if log is not None:
        log(f"{what}: trained in {seconds:.1f}s, cached at {path}")
    return trained.eval().requires_grad_(False), False, seconds


def with_overrides(config: ToyTeacherConfig, **overrides) -> ToyTeacherConfig:
    return replace(config, **overrides)
