"""A toy VIDEO teacher: short clips whose frames must agree, the prompt choosing the motion; an exact-ε teacher and
a learned one.

Two teachers of the same data. The EXACT one: the clip distribution is a Gaussian mixture in clip space, so the
posterior mean E[x0 | x_t, prompt] — hence ε — is exact (`mixture_spec.posterior_mean`), and what a few-step sampler
gets wrong is visible against the data itself; but its LoRAs can only sit on a frozen random residual. The LEARNED
one (`TorusVideoNet`, `LEARNED_VIDEO_TEACHER`): a small network trained on exact clips with the ε-MSE objective on
the same VP schedule, cached like the toy teachers (`load_or_train_video_teacher`); its LoRAs sit on its own learned
linears, as on a real checkpoint. It has learned the data only in part (its 50 steps keep 73 % of tracks, not
≈ 100 %), which is what "a teacher that has learned something" means here, and what the student is measured against.

The data (`VideoSpec`, default `TOY_VIDEO`): a clip is [frames, 1, side, side] (4 × 1 × 6 × 6 = 144 numbers), a
2×2 square (0.5) on a dark background (0) plus N(0, 0.1²) pixel noise. The square starts at any of the
side² positions of the torus (equal weights) and moves by the prompt's velocity each frame, wrapping around:
"0" stays, "1" moves right, "2" moves down, "3" moves diagonally (down-right). Every frame's marginal is the same
for every prompt (a square anywhere); what the prompt fixes is how consecutive frames relate. "" (the null class of
CFG) is the four prompts' mixture with equal weights.

The exact teacher (`VideoEpsNet`): the exact ε of the prompt's mixture plus a frozen residual `ToyEpsNet` on the
flattened clip whose output layer is zero, so the base network IS the analytic teacher and the student's and fake
score's LoRAs on the residual's linears start at it (peft's B = 0), exactly as `MixtureEpsNet` does. The residual is
an MLP on the flattened clip ("clip", the default) or a frame-token network whose frames share weights and meet in a
temporal mixing linear ("frames", the layout of a video model; 2–3× slower here and measured no better).

The learned teacher (`TorusVideoNet`): pixel tokens on the torus with the frames as channels, circular 3×3
convolutions written as linears, a global mixing linear per block (details on the class); 1500 AdamW steps of 256
clips at lr 5e-3. Time: ≈ 0.11 s a step on one otherwise idle core (≈ 160 s), 355 s measured while another job
shared the 2 cores. Cheaper runs learn the frames' agreement much less (50-step track_consistent at lr 2e-3: 0.45
after these 1500 steps, 0.47 after 2000 steps of 32 channels; lr 5e-3, 1000 steps: 0.56; AdaLN conditioning instead
of the added embedding: no better; 3000 steps of 64 channels: 0.87 but 4× the time); the toy MLP on the flattened
clip barely learns it (0.08 after 3000 steps).

What a few-step sampler does wrong on it is what a fast video sampler does: the first steps' x̂0 is a blend of many
positions, and a 4-step sampler stops with part of that blend left, so frames are blurred squares (per-frame
quality) and the position a tracker reads off each frame can jump against the prompt's motion (consistency).

The criterion (`video_scores`, pure functions of samples):
- per-frame quality: `frame_w2`, the sliced 2-Wasserstein distance of all frames (each a 36-vector) to exact data
  frames; `frame_on_mode`, the share of frames within the 99.9 % ball of the nearest clean square (a sharp frame);
- consistency across frames: `track_consistent`, the share of clips in which the position read off each frame (the
  nearest clean square) moves by exactly the prompt's velocity from every frame to the next; `motion_residual`,
  mean |frame_{f+1} − shift_v(frame_f)|² per pixel, 2·std² for data (a blend passes this one: a shifted blend is
  the next frame's blend, so it is reported, not the criterion);
- joint: `clip_w2`, the sliced W2 of whole clips per prompt to exact clips of that prompt, averaged over prompts.

Measured (`.venv/bin/python bench/video_toy.py --teacher learned|exact`, 1024 clips, toy recipe: lr 1e-3, batch
256, rank 64, cfg 1, 300 iterations):
- learned teacher: the TDM student beats the teacher's own 4 steps on all three figures. frame_w2 teacher-4 0.083
  -> student 0.024 (teacher-50 0.039), clip_w2 0.085 -> 0.031 (0.043), track_consistent 0.591 -> 0.614 (0.732).
  The consistency margin is largest early and shrinks as training sharpens frames: 0.672 at 100 iterations, 0.652
  at 200, 0.614 at 300 (±0.015 binomial standard error per figure; the samplers share their noise). With
  `--set cfg=1.25` it holds: 0.682 / 0.679 / 0.670 (frame_w2 0.020, clip_w2 0.028 at 300) — against the teachers'
  UNGUIDED samplers, which the bench does not guide.
- exact teacher: the student beats teacher-4 on per-frame quality and the joint distance but NOT on consistency
  (frame_w2 0.078 -> 0.068, clip_w2 0.080 -> 0.070, track_consistent 0.929 -> 0.898; teacher-50 ≈ 1). Its
  correction, confined to a frozen random residual, sharpens frames without committing a clip to one track.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..distill import DiscreteSchedule, DistillConfig, PeftBackend
from .backend import adapter_settings, class_prompts, prompt_to_label
from .cache_lock import cache_dir, training_lock
from .experiment import digits_distill_config
from .mixture import sliced_wasserstein
from .mixture_spec import chi2_quantile, posterior_mean
from .networks import LORA_TARGET_MODULES, ToyEpsNet, timestep_embedding
from .sampling import ddim_sample, uniform_grid, vp_alphas_cumprod
from .teacher import cached_network, fit_denoiser

#: The residual network's fixed initialisation seed (frozen; only LoRA adapters on it train).
RESIDUAL_SEED = 0


@dataclass(frozen=True)
class VideoSpec:
    """Clips of `frames` frames of side × side pixels (one channel): a square of `square` pixels moving by the
    prompt's velocity (rows, columns per frame) on the torus; each clip is a clean clip plus N(0, std²) noise."""

    name: str = "video4x6"
    frames: int = 4
    side: int = 6
    square: int = 2
    velocities: tuple[tuple[int, int], ...] = ((0, 0), (0, 1), (1, 0), (1, 1))
    std: float = 0.1
    low: float = 0.0
    high: float = 0.5

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.frames, 1, self.side, self.side)

    @property
    def dim(self) -> int:
        return self.frames * self.side * self.side

    @property
    def frame_dim(self) -> int:
        return self.side * self.side

    @property
    def classes(self) -> int:
        return len(self.velocities)

    @property
    def positions(self) -> int:
        return self.side * self.side

    def frame_templates(self) -> torch.Tensor:
        """The clean frame with the square's top-left corner at each position p = row · side + column (float64
        [positions, side, side])."""
        out = torch.full((self.positions, self.side, self.side), self.low, dtype=torch.float64)
        for p in range(self.positions):
            r, c = divmod(p, self.side)
            for dr in range(self.square):
                for dc in range(self.square):
                    out[p, (r + dr) % self.side, (c + dc) % self.side] = self.high
        return out

    def moved(self, position: torch.Tensor, velocity: tuple[int, int], frames: int) -> torch.Tensor:
        """The position after `frames` frames at `velocity` (int64, same shape as `position`)."""
        r, c = position // self.side, position % self.side
        return ((r + velocity[0] * frames) % self.side) * self.side + (c + velocity[1] * frames) % self.side

    def class_centres(self, label: int) -> torch.Tensor:
        """The clean clips of prompt `label`, one per start position (float64 [positions, dim])."""
        templates = self.frame_templates()
        start = torch.arange(self.positions)
        frames = [templates[self.moved(start, self.velocities[label], f)] for f in range(self.frames)]
        return torch.stack(frames, 1).reshape(self.positions, self.dim)

    def centres_and_log_weights(self, label: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A prompt's mixture (label in [0, classes)), or the null class's (label == classes: every prompt's
        clips, equal weights)."""
        labels = range(self.classes) if label == self.classes else [label]
        centres = torch.cat([self.class_centres(k) for k in labels])
        return centres, torch.full((len(centres),), -float(np.log(len(centres))), dtype=torch.float64)

    def sample(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Exact clips for `labels` [n] (float32 [n, frames, 1, side, side])."""
        start = torch.randint(self.positions, labels.shape, generator=generator)
        noise = torch.randn(len(labels), self.dim, generator=generator, dtype=torch.float64)
        clips = torch.empty(len(labels), self.dim, dtype=torch.float64)
        for k in range(self.classes):
            mask = labels == k
            clips[mask] = self.class_centres(k)[start[mask]]
        return (clips + self.std * noise).float().reshape(len(labels), *self.shape)


#: The toy video target of bench/video_toy.py and tests/test_toy_video.py.
TOY_VIDEO = VideoSpec()


# ---------------------------------------------------------------------------------------------------------------
# The teacher network and its backend

#: What the LoRAs patch on a frame-token residual: ToyEpsNet's linears plus the temporal mixing one.
FRAME_LORA_TARGETS = (*LORA_TARGET_MODULES, "tmix")


class FrameBlock(nn.Module):
    """One residual block over frame tokens [B, F, hidden]: ToyEpsNet's block (fc1, emb, fc2) plus `tmix`, a linear
    of the clip's mean token added to every frame, the one place frames see each other (as a video transformer's
    attention over all frames' tokens is)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.emb = nn.Linear(hidden, hidden)
        self.tmix = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        n = nn.functional.silu(self.norm(h))
        y = self.fc1(n) + self.emb(emb)[:, None] + self.tmix(n.mean(1, keepdim=True))
        return h + self.fc2(nn.functional.silu(y))


class FrameResidual(nn.Module):
    """A residual ε network whose tokens are frames, the layout of a video model rather than of an image MLP: each
    frame → `inp` (one weight for every frame) + a learned frame-index embedding, `FrameBlock`s, `out` per frame
    (one weight for every frame). Same interface as `ToyEpsNet` on the flattened clip."""

    def __init__(self, frames: int, frame_dim: int, num_classes: int, hidden: int = 256, depth: int = 2,
                 time_dim: int = 64):
        super().__init__()
        self.frames, self.frame_dim, self.num_classes, self.time_dim = frames, frame_dim, num_classes, time_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.class_embed = nn.Embedding(num_classes + 1, hidden)
        self.frame_embed = nn.Parameter(torch.randn(frames, hidden) * 0.02)
        self.inp = nn.Linear(frame_dim, hidden)
        self.blocks = nn.ModuleList(FrameBlock(hidden) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, frame_dim)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        emb = nn.functional.silu(self.time_mlp(timestep_embedding(t, self.time_dim)) + self.class_embed(labels))
        h = self.inp(x.reshape(x.shape[0], self.frames, self.frame_dim)) + self.frame_embed
        for block in self.blocks:
            h = block(h, emb)
        return self.out(nn.functional.silu(self.out_norm(h))).reshape(x.shape[0], -1)



class VideoEpsNet(nn.Module):
    """ε̂(x_t [B, F, 1, S, S], t, labels) = the prompt's exact mixture ε at integer timestep t (VP, ᾱ of
    `vp_alphas_cumprod(schedule)`) + a frozen residual `ToyEpsNet` on the flattened clip whose `out` layer is zero.
    Labels 0..classes−1 are the prompts, `classes` the null class (the mixture of all of them)."""

    def __init__(self, spec: VideoSpec = TOY_VIDEO, *, residual: str = "clip", schedule: str = "scaled_linear",
                 num_timesteps: int = 1000, hidden: int = 256, depth: int = 2, residual_seed: int = RESIDUAL_SEED):
        super().__init__()
        self.spec = spec
        self.num_timesteps = num_timesteps
        self.register_buffer("alphas_cumprod", vp_alphas_cumprod(schedule, num_timesteps))
        for label in range(spec.classes + 1):
            centres, log_weights = spec.centres_and_log_weights(label)
            self.register_buffer(f"centres_{label}", centres)
            self.register_buffer(f"log_weights_{label}", log_weights)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(residual_seed)
            if residual == "frames":
                self.residual = FrameResidual(spec.frames, spec.frame_dim, spec.classes, hidden=hidden, depth=depth)
            elif residual == "clip":
                self.residual = ToyEpsNet(spec.dim, spec.classes, hidden=hidden, depth=depth)
            else:
                raise ValueError(f"residual must be 'frames' or 'clip', got {residual!r}")
        with torch.no_grad():
            self.residual.out.weight.zero_()
            self.residual.out.bias.zero_()
        self.requires_grad_(False)

    @property
    def null_class(self) -> int:
        return self.spec.classes

    def analytic_eps(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The exact ε of each sample's prompt at timestep indices t [B] (float64 [B, dim])."""
        idx = t.detach().round().long().clamp(0, self.num_timesteps - 1).to(self.alphas_cumprod.device)
        abar = self.alphas_cumprod.double()[idx]
        alpha, sigma = abar.sqrt(), (1.0 - abar).sqrt()
        x64 = x.detach().reshape(x.shape[0], -1).to(torch.float64)
        x0 = torch.empty_like(x64)
        for label in labels.unique().tolist():
            mask = labels == label
            x0[mask] = posterior_mean(x64[mask], alpha[mask], sigma[mask], getattr(self, f"centres_{label}"),
                                      getattr(self, f"log_weights_{label}"), self.spec.std)
        return (x64 - alpha[:, None] * x0) / sigma[:, None]

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        flat = x.reshape(x.shape[0], -1)
        eps = self.analytic_eps(flat, t, labels.to(x.device)).to(x.dtype)
        return (eps + self.residual(flat, t, labels).to(x.dtype)).reshape(x.shape)


# ---------------------------------------------------------------------------------------------------------------
# The learned teacher

#: Bump when the learned teacher's network or training changes in a way its config does not capture (cache key).
VIDEO_TEACHER_FORMAT_VERSION = 1
#: What the LoRAs patch on a `TorusVideoNet`: ToyEpsNet's names plus the global mixing linear `gmix`.
TORUS_LORA_TARGETS = (*LORA_TARGET_MODULES, "gmix")


def torus_neighbourhood(h: torch.Tensor) -> torch.Tensor:
    """Every pixel's 3×3 neighbourhood on the torus, concatenated on the channel axis: [B, S, S, C] -> [B, S, S, 9C].
    A circular 3×3 convolution is then one nn.Linear, so peft's LoRA patches it as it patches a DiT's linears (its
    Conv2d LoRA would not copy the circular padding)."""
    return torch.cat([torch.roll(h, (dr, dc), (1, 2)) for dr in (-1, 0, 1) for dc in (-1, 0, 1)], -1)


class TorusBlock(nn.Module):
    """A residual block over pixel tokens [B, S, S, C]: `fc1` a circular 3×3 convolution, `emb` the (timestep,
    prompt) embedding added per channel, `gmix` a linear of the mean token (each block sees the whole frame: the
    square's position is a global fact), `fc2` per pixel."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.fc1 = nn.Linear(9 * channels, channels)
        self.emb = nn.Linear(hidden, channels)
        self.gmix = nn.Linear(channels, channels)
        self.fc2 = nn.Linear(channels, channels)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        n = nn.functional.silu(self.norm(h))
        y = self.fc1(torus_neighbourhood(n)) + self.emb(emb)[:, None, None] + self.gmix(n.mean((1, 2), keepdim=True))
        return h + self.fc2(nn.functional.silu(y))


class TorusVideoNet(nn.Module):
    """The learned teacher's ε network: x_t [B, F, 1, S, S] (or flattened), t [B], labels [B] (`classes` = null).

    The frames are the input channels of pixel tokens on the torus (early fusion: every layer sees every frame,
    which is what lets it learn that frames must agree), mixed by circular 3×3 convolutions written as linears.
    Why not the toy MLP on the flattened clip: it has no notion of "the same square one pixel further", and learns
    the data far more slowly (measured, ToyEpsNet 256 × 3 after 3000 steps: 50-step track_consistent 0.08)."""

    def __init__(self, spec: VideoSpec = TOY_VIDEO, channels: int = 48, hidden: int = 128, depth: int = 3,
                 time_dim: int = 64):
        super().__init__()
        self.spec, self.num_classes, self.time_dim = spec, spec.classes, time_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.class_embed = nn.Embedding(spec.classes + 1, hidden)
        self.inp = nn.Linear(9 * spec.frames, channels)
        self.blocks = nn.ModuleList(TorusBlock(channels, hidden) for _ in range(depth))
        self.out_norm = nn.LayerNorm(channels)
        self.out = nn.Linear(9 * channels, spec.frames)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        h = x.reshape(x.shape[0], spec.frames, spec.side, spec.side).permute(0, 2, 3, 1)  # frames -> channels
        emb = nn.functional.silu(self.time_mlp(timestep_embedding(t, self.time_dim)) + self.class_embed(labels))
        h = self.inp(torus_neighbourhood(h))
        for block in self.blocks:
            h = block(h, emb)
        out = self.out(torus_neighbourhood(nn.functional.silu(self.out_norm(h))))
        return out.permute(0, 3, 1, 2).reshape(x.shape)


@dataclass(frozen=True)
class VideoTeacherConfig:
    """Everything that determines the learned teacher's weights (the cache key hashes all of it). Training is
    teacher.py's recipe (ε-MSE on VP x_t, uniform t, label dropout for CFG, AdamW + warm-up + cosine, EMA) on fresh
    exact clips each step; the EMA decay is shorter because the run is ~1500 steps, not 8000."""

    spec: VideoSpec = TOY_VIDEO
    channels: int = 48
    hidden: int = 128
    depth: int = 3
    train_steps: int = 1500
    batch_size: int = 256
    lr: float = 5e-3
    ema_decay: float = 0.995
    label_dropout: float = 0.1
    schedule: str = "scaled_linear"
    num_timesteps: int = 1000
    seed: int = 0

    def key(self) -> str:
        payload = json.dumps({"format": VIDEO_TEACHER_FORMAT_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    def build(self) -> TorusVideoNet:
        return TorusVideoNet(self.spec, channels=self.channels, hidden=self.hidden, depth=self.depth)

    @property
    def num_classes(self) -> int:  # the null class's label (fit_denoiser's label dropout)
        return self.spec.classes


#: The learned teacher of bench/video_toy.py --teacher learned.
LEARNED_VIDEO_TEACHER = VideoTeacherConfig()


@dataclass
class LearnedVideoTeacher:
    """A trained, frozen `TorusVideoNet` with its schedule and where it came from."""

    net: TorusVideoNet
    config: VideoTeacherConfig
    alphas_cumprod: torch.Tensor  # [N] float64
    path: Path | None = None
    from_cache: bool = False
    train_seconds: float = 0.0


def train_video_teacher(config: VideoTeacherConfig = LEARNED_VIDEO_TEACHER, log=None) -> TorusVideoNet:
    """Trains the learned teacher from scratch with a fixed seed (the toy teachers' loop, `fit_denoiser`); returns
    the EMA weights."""
    spec = config.spec
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    net = config.build()

    def batch():
        labels = torch.randint(spec.classes, (config.batch_size,), generator=gen)
        return spec.sample(labels, gen), labels

    return fit_denoiser(net, batch, gen, config, warmup=min(200, config.train_steps // 10 + 1), log_every=500,
                        log=None if log is None else lambda step, loss: log(
                            f"toy video teacher step {step}/{config.train_steps} loss {loss:.4f}"))


def video_teacher_path(config: VideoTeacherConfig, directory: Path | None = None) -> Path:
    return (directory or cache_dir()) / f"toy_video_teacher_{config.spec.name}_{config.key()}.safetensors"


def load_or_train_video_teacher(config: VideoTeacherConfig = LEARNED_VIDEO_TEACHER,
                                directory: str | Path | None = None, log=None) -> LearnedVideoTeacher:
    """The cached learned teacher for `config` if present, else trains it and writes the cache atomically (under
    `training_lock`, so parallel test workers train it once), as `teacher.load_or_train_teacher` does."""
    path = video_teacher_path(config, Path(directory) if directory is not None else None)
    abar = vp_alphas_cumprod(config.schedule, config.num_timesteps)
    metadata = {"config": json.dumps(asdict(config)), "format": str(VIDEO_TEACHER_FORMAT_VERSION)}
    with training_lock(path):
        net, from_cache, seconds = cached_network(path, config.build, lambda: train_video_teacher(config, log=log),
                                                  metadata, "toy video teacher", log)
    return LearnedVideoTeacher(net, config, abar, path, from_cache=from_cache, train_seconds=seconds)


class VideoBackend(PeftBackend):
    """A `TeacherBackend` (ε-parametrised, VP scaled-linear, N = 1000) whose latent is the clip [frames, 1, side,
    side], over the exact teacher `VideoEpsNet` (student and fake score: peft LoRA adapters on its residual's
    linears) or, given `learned`, over a copy of the learned `TorusVideoNet` (the adapters on its own linears, as on
    a real checkpoint); "full" mode copies instead. The layout of the toy backends and of the real ones."""

    def __init__(self, spec: VideoSpec = TOY_VIDEO, *, residual: str = "clip", mode: str = "lora",
                 lora_rank: int = 16, lora_alpha: float | None = None, target_modules: list[str] | None = None,
                 adapter_seed: int = 0, learned: LearnedVideoTeacher | None = None):
        self.spec = spec
        self.num_classes = spec.classes
        self.learned = learned
        if learned is not None:
            if learned.config.spec != spec:
                raise ValueError(f"the learned teacher was trained on {learned.config.spec.name}, not {spec.name}")
            net, abar, default_targets = copy.deepcopy(learned.net), learned.alphas_cumprod, TORUS_LORA_TARGETS
        else:
            net = VideoEpsNet(spec, residual=residual)
            abar = net.alphas_cumprod
            default_targets = FRAME_LORA_TARGETS if residual == "frames" else LORA_TARGET_MODULES
        super().__init__(net, schedule=DiscreteSchedule.from_alphas_cumprod(abar),
                         parametrisation="eps", latent_shape=spec.shape, encode=self._labels,
                         family=f"toy_{spec.name}", mode=mode, lora_rank=lora_rank, lora_alpha=lora_alpha,
                         target_modules=list(target_modules or default_targets), export_format="peft",
                         export_prefix="toy.", adapter_seed=adapter_seed)

    def _labels(self, prompts: list[str]) -> torch.Tensor:
        return torch.tensor([prompt_to_label(p, self.num_classes) for p in prompts], dtype=torch.long)

    @property
    def class_prompts(self) -> list[str]:
        return class_prompts(self.num_classes)

    def preview_image(self, x0: torch.Tensor) -> np.ndarray:
        """The first (up to) 8 clips, one row each, frames side by side, every pixel ×8 (uint8 RGB)."""
        clips = x0.detach().cpu().float()[:8, :, 0]  # [n, F, S, S]
        n, f, s, _ = clips.shape
        grey = ((clips.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        rows = grey.permute(0, 2, 1, 3).reshape(n * s, f * s)
        big = rows.repeat_interleave(8, 0).repeat_interleave(8, 1).numpy()
        return np.stack([big] * 3, axis=-1)


#: The teachers `make_backend` and bench/video_toy.py offer.
VIDEO_TEACHERS = ("exact", "learned")


def make_backend(config=None, residual: str = "clip", lora_rank: int | None = None, mode: str | None = None,
                 teacher: str = "exact", cache_dir: str | None = None, **_ignored) -> VideoBackend:
    """The CLI factory (`teacher = {"factory": "tdm_core.toy.video:make_backend", "teacher": "learned"}`): the exact
    teacher (default) or the learned one (`LEARNED_VIDEO_TEACHER`, loaded from or trained into the cache); LoRA
    settings come from the DistillConfig (rank, alpha, target modules, adapter seed = config.seed)."""
    if _ignored:
        raise TypeError(f"make_backend got unexpected arguments {sorted(_ignored)}; it takes residual, lora_rank, "
                        "mode, teacher, cache_dir")
    if teacher not in VIDEO_TEACHERS:
        raise ValueError(f"teacher must be one of {VIDEO_TEACHERS}, got {teacher!r}")
    learned = load_or_train_video_teacher(LEARNED_VIDEO_TEACHER, cache_dir) if teacher == "learned" else None
    return VideoBackend(TOY_VIDEO, residual=residual, learned=learned, **adapter_settings(config, lora_rank, mode))


def video_distill_config(**overrides) -> DistillConfig:
    """The toy TDM recipe (`digits_distill_config`: lr 1e-3, batch 256, rank 64, N = 1000, K = 4, cfg 1, seed 0)
    with the video's four prompts and family; `overrides` win."""
    return digits_distill_config(**{"prompts": class_prompts(TOY_VIDEO.classes), "family": f"toy_{TOY_VIDEO.name}",
                                    **overrides})


# ---------------------------------------------------------------------------------------------------------------
# Teacher sampling


@torch.no_grad()
def teacher_samples(spec: VideoSpec, noise: torch.Tensor, labels: torch.Tensor, steps: int,
                    learned: LearnedVideoTeacher | None = None) -> torch.Tensor:
    """Deterministic DDIM (η = 0) from `noise` [n, F, 1, S, S] (labelled t = 999) on the uniform grid of `steps`
    (4 -> 999, 749, 499, 249: the student's grid), ending at x̂0, with the exact ε (float64 throughout) or, given
    `learned`, the learned network's ε (evaluated in float32 as the student is; the DDIM state in float64).
    float32 result shaped like `noise`."""
    if learned is not None:
        net, abar = learned.net, learned.alphas_cumprod.double()

        def eps(x, t):
            return net(x.float(), t, labels).double()
    else:
        exact = VideoEpsNet(spec).double()
        abar = exact.alphas_cumprod.double()

        def eps(x, t):
            return exact.analytic_eps(x, t, labels)
    flat = noise.reshape(noise.shape[0], -1).to(torch.float64)
    return ddim_sample(eps, flat, uniform_grid(steps, abar.shape[0]), abar).float().reshape(noise.shape)


# ---------------------------------------------------------------------------------------------------------------
# The criterion


def frame_positions(spec: VideoSpec, clips: torch.Tensor) -> torch.Tensor:
    """The nearest clean square's position per frame (int64 [n, frames]) and the squared distance to it."""
    frames = clips.detach().to(torch.float64).reshape(-1, spec.frame_dim)
    sq = torch.cdist(frames, spec.frame_templates().reshape(spec.positions, -1)) ** 2
    best, pos = sq.min(-1)
    return pos.reshape(-1, spec.frames), best.reshape(-1, spec.frames)


def video_scores(spec: VideoSpec, clips: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor,
                 reference_labels: torch.Tensor) -> dict[str, float]:
    """The toy video criterion of `clips` [n, F, 1, S, S] for prompts `labels` against exact `reference` clips
    (see the module docstring): frame_w2, frame_on_mode, track_consistent, motion_residual, clip_w2."""
    clips64 = clips.detach().to(torch.float64).reshape(len(clips), spec.frames, spec.side, spec.side)
    ref64 = reference.detach().to(torch.float64).reshape(len(reference), spec.frames, spec.side, spec.side)
    frame_w2 = sliced_wasserstein(clips64.reshape(-1, spec.frame_dim), ref64.reshape(-1, spec.frame_dim))
    pos, sq = frame_positions(spec, clips64)
    on_mode = float((sq <= spec.std**2 * chi2_quantile(spec.frame_dim)).double().mean())
    consistent = torch.ones(len(clips), dtype=torch.bool)
    residual = torch.zeros(len(clips), dtype=torch.float64)
    for k, (dr, dc) in enumerate(spec.velocities):
        mask = labels == k
        expected = spec.moved(pos[mask, :-1], (dr, dc), 1)
        consistent[mask] = (pos[mask, 1:] == expected).all(-1)
        shifted = torch.roll(clips64[mask, :-1], shifts=(dr, dc), dims=(-2, -1))
        residual[mask] = ((clips64[mask, 1:] - shifted) ** 2).mean((-3, -2, -1))
    clip_w2 = [sliced_wasserstein(clips64[labels == k].reshape(-1, spec.dim),
                                  ref64[reference_labels == k].reshape(-1, spec.dim))
               for k in range(spec.classes) if bool((labels == k).any())]
    return {"frame_w2": frame_w2, "frame_on_mode": on_mode, "track_consistent": float(consistent.double().mean()),
            "motion_residual": float(residual.mean()), "clip_w2": float(np.mean(clip_w2))}


def balanced_labels(spec: VideoSpec, n: int) -> torch.Tensor:
    """n labels, the prompts in turn (n/classes each when n is a multiple)."""
    return torch.arange(n) % spec.classes
