"""The distillation settings: one typed, documented dataclass, loaded from JSON/TOML or built in code.

Every impossible setting is a `ConfigError` raised by `validate()` before any model is touched; the checks that need
the teacher's schedule (does the grid fit?) run in `validate(num_timesteps=...)`, which `TDMTrainer` calls before its
first forward. Defaults are the official `train_tdm_demo.py` choices (docs/tdm_method.md §2).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Fixed margins of the official script (docs/tdm_method.md §2): τ ≥ 20, τ < t_g − 10 (separate) or N − 10 (shared),
# randmid jitter in [t_mid, t_g − 20).
TAU_MIN = 20
TAU_MARGIN = 10
RANDMID_MARGIN = 20

# τ's interval: "separate" [max(20, t_mid), t_g − 10) (official, the releases), "shared" [.., N − 10) with N the
# grid's top (official option), "reverse" [.., the teacher schedule's end) (Flow-Factory's `tdm_query_interval:
# reverse` at max σ 1, docs/recipes.md).
TAU_MODES = ("separate", "shared", "reverse")
# τ's density inside its interval: "uniform" over the integer timesteps (official), "logit_normal": a logit-normal
# over the flow-equivalent noise level σ/(α + σ), truncated to the interval (Flow-Factory's
# `conditional_logit_normal`).
TAU_DENSITIES = ("uniform", "logit_normal")
# "one": each sample trains one random step of its trajectory per update (official); "all": every sample trains all
# K steps in each update, their losses averaged (Flow-Factory: "all four stage losses are averaged"); "last": every
# sample trains its last step only (the fake score learns that step's samples alone); the earlier steps are the
# teacher's, moved only by what the shared adapter learns there (measured on the SD3-family toys, docs/recipes.md).
STAGES = ("one", "all", "last")
# What the fake score learns from: "step" (official): each fake update draws its rows as the generator's do
# (`stages`, `tau_mode`) and learns the drawn step's x̂0 at τ in that step's interval, so for every step but the last
# it learns the student's intermediate estimates; "output": every row is the sample's last step, its x̂0 the student's
# output, at τ anywhere from TAU_MIN to the schedule's end (`tau_density` as set): the fake score is then the denoiser
# of the distribution the student samples, at every noise level the generator queries it at. Measured on the Flux toy
# (docs/recipes.md, bench/fake_fit.py): with "step" a fake score fitted to a student that already samples the
# teacher's 50-step distribution describes one 4–7 % wider, so the student is pushed 5–8 % too narrow, and the better
# the fake score is fitted (more updates, a larger rank) the narrower; with "output" it describes the student's spread.
FAKE_SAMPLES = ("step", "output")
LR_DECAYS = ("constant", "cosine")
GENERATOR_LOSSES = ("pseudo_huber", "pseudo_huber_vector", "mse")
MODES = ("lora", "full")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# How a multi-process run (torchrun) splits the work: "ddp" (every process holds the whole teacher and both adapters,
# gradients are averaged by hand), "fsdp" (torch's `fully_shard`: the teacher, the adapters and their optimiser state
# are sharded across the processes; tdm_core/distill/sharding.py).
PARALLEL_MODES = ("ddp", "fsdp")


class ConfigError(ValueError):
    """A distillation setting that cannot work; the message names the setting and what to do."""


@dataclass
class DistillConfig:
    """TDM distillation settings.

    Grid: by default the official training-demo grid t_k = N−1−k·(N//K) with N = `total_steps` (N = 900, K = 4:
    899, 674, 449, 224). `timesteps` overrides it with an explicit descending list of K schedule indices (e.g.
    CogVideoX's 999, 856, 665, 399); step k then ends at the next grid point (t_mid = t_{k+1} + 1, the last step at
    t_mid = 0), which is the demo's t_mid = t_g − Δ + 1 on the uniform grid.
    """

    prompts: list[str] = field(default_factory=list)  # training prompts (data-free: prompts only)
    steps: int = 4  # K, the student's number of sampling steps
    total_steps: int = 800  # N of the demo grid (800 in the script's default, 900 in the README run)
    timesteps: list[int] | None = None  # explicit grid of K schedule indices, descending; overrides total_steps
    tau_mode: str = "separate"  # "separate": τ ∈ [max(20, t_mid), t_g − 10); "shared": τ ∈ [.., N − 10)
    randmid: bool = False  # jitter t_mid uniformly in [t_mid, t_g − 20) (regularises the generator)
    cfg: float = 2.0  # teacher guidance scale s of the generator target (4.5 in the README run)
    lr: float = 1e-4  # fake-score learning rate
    generator_lr_scale: float = 0.2  # the student's lr is lr · generator_lr_scale (the official lr / 5) ...
    student_lr: float | None = None  # ... unless given here
    adam_betas: tuple[float, float] = (0.0, 0.95)  # both networks' AdamW
    adam_eps: float = 1e-8
    weight_decay: float = 1e-2
    grad_clip: float | None = 1.0  # max grad norm of the generator (student); None: not clipped
    grad_clip_fake: float | None = None  # max grad norm of the fake score (None: not clipped, as officially)
    importance_clip: float | None = None  # w_IS clipped into [1/c, c] (None: unclipped, official; Flow-Factory 20)
    tau_density: str = "uniform"  # see TAU_DENSITIES
    tau_logit_mean: float = 0.0  # of the logit-normal τ density
    tau_logit_std: float = 1.0
    fake_updates: int = 1  # fake-score updates per student update (each with fresh draws on the same rollout)
    stages: str = "one"  # see STAGES
    fake_samples: str = "step"  # see FAKE_SAMPLES
    lr_warmup_steps: int = 0  # linear warm-up of the generator LR (the official script's schedule is constant)
    lr_decay: str = "constant"  # both LRs: "constant" (official) or "cosine" (half cosine to 0 over `iterations`)
    # Decay of an exponential moving average of the student's weights, which the saved LoRA, previews and samples use
    # (training continues from the weights themselves); 0: none, the official script's last weights. Until
    # 1 / (1 − decay) updates have been made it is their plain average (the first weights do not linger in a short run).
    student_ema: float = 0.0
    batch_size: int = 1  # global batch; split evenly across data-parallel processes
    # The most rows (a sample, or with "all" stages one sample's step) one network pass of an iteration takes; an update
    # over more rows accumulates its gradients pass by pass, so the update is the same (to round-off) and only the
    # activation memory and the time change. 0: every row of an update in one pass. Not part of what a run learns.
    micro_batch: int = 0
    generator_loss: str = "pseudo_huber"  # "pseudo_huber" (element-wise, official), "pseudo_huber_vector", "mse"
    huber_c: float = 1e-3  # c of the element-wise pseudo-Huber loss
    snr_clamp: float = 5.0  # fake-score loss weight min(SNR_τ, 5)
    seed: int = 0
    # The frozen teacher's compute dtype: "auto" keeps the backend's; "bfloat16"/"float16" cast the base and run it
    # under autocast (adapters and optimiser state stay float32; float16 uses loss scaling).
    dtype: str = "auto"
    mode: str = "lora"  # "lora": two adapters on one frozen teacher; "full": separate trainable copies
    lora_rank: int = 16
    lora_alpha: float | None = None  # None: alpha = rank (scale 1 in every loader)
    lora_target_modules: list[str] | None = None  # None: the backend's family default
    iterations: int = 500
    # Multi-process runs (torchrun): "ddp" or "fsdp" (see PARALLEL_MODES). A single process runs unsharded either way:
    # with nothing to shard across, "fsdp" trains exactly as "ddp" does (the same config serves a one-process check).
    # "fsdp" needs mode "lora" and a dtype other than float16 (whose loss scaler checks overflow per process).
    parallel: str = "ddp"
    # Headless runs (CLI): where and how often to write.
    output_dir: str = "tdm-distill-output"
    checkpoint_every: int = 100
    keep_last: int = 2  # resumable states kept (older ones are deleted after a successful save)
    preview_every: int = 50  # 0 disables previews
    preview_prompts: list[str] | None = None  # None: the first (up to 4) training prompts
    log_every: int = 1
    # Also write the student LoRA here at every checkpoint and at the end (e.g. ComfyUI's models/loras/<name>.safetensors,
    # where ComfyUI's LoRA lists show it); "": only output_dir/student_lora.safetensors. A file already there is
    # replaced only by a resumed run, and only when it is a TDM student LoRA (see cli.check_lora_file).
    lora_file: str = ""
    # Export metadata of the student LoRA.
    family: str = ""  # teacher family ("sd15", "sd3", "sd35", "cogvideox", "toy", ...)
    recommended_strength: float = 1.0
    sampler_preset: str = ""  # the preset/solver name the student should be sampled with
    recipe: str = ""  # the training recipe (tdm_core.recipes) the settings came from, for the record
    # How the CLI builds the teacher: {"factory": "package.module:function", ...kwargs}; the factory is called
    # with (config, **kwargs) and returns a TeacherBackend.
    teacher: dict[str, Any] = field(default_factory=dict)

    # ---- validation -------------------------------------------------------------------------------------------
    def validate(self, num_timesteps: int | None = None) -> DistillConfig:
        """Raises ConfigError for any impossible setting; with `num_timesteps`, also checks the grid against the
        teacher's schedule (every τ range non-empty)."""
        errors = []

        def need(cond: bool, message: str):
            if not cond:
                errors.append(message)

        need(isinstance(self.steps, int) and self.steps >= 1, f"steps (K) must be an integer ≥ 1, got {self.steps!r}")
        for name in ("lr", "adam_eps"):
            value = getattr(self, name)
            need(_finite(value) and value > 0, f"{name} must be > 0, got {value!r}")
        need(_finite(self.generator_lr_scale) and self.generator_lr_scale > 0,
             f"generator_lr_scale must be > 0, got {self.generator_lr_scale!r}")
        need(_finite(self.cfg) and self.cfg >= 1.0,
             f"cfg must be ≥ 1 (1 = no guidance; the official default is 2.0), got {self.cfg!r}")
        need(len(self.adam_betas) == 2 and all(_finite(b) and 0 <= b < 1 for b in self.adam_betas),
             f"adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}")
        need(_finite(self.weight_decay) and self.weight_decay >= 0, f"weight_decay must be ≥ 0, got {self.weight_decay!r}")
        need(self.grad_clip is None or (_finite(self.grad_clip) and self.grad_clip > 0),
             f"grad_clip must be > 0 or null (not clipped), got {self.grad_clip!r}")
        need(self.student_lr is None or (_finite(self.student_lr) and self.student_lr > 0),
             f"student_lr must be > 0 or null (lr · generator_lr_scale), got {self.student_lr!r}")
        need(self.grad_clip_fake is None or (_finite(self.grad_clip_fake) and self.grad_clip_fake > 0),
             f"grad_clip_fake must be > 0 or null (not clipped), got {self.grad_clip_fake!r}")
        need(self.importance_clip is None or (_finite(self.importance_clip) and self.importance_clip > 1),
             f"importance_clip must be > 1 or null (unclipped), got {self.importance_clip!r}")
        need(self.tau_density in TAU_DENSITIES, f"tau_density must be one of {TAU_DENSITIES}, got {self.tau_density!r}")
        need(_finite(self.tau_logit_mean), f"tau_logit_mean must be a finite number, got {self.tau_logit_mean!r}")
        need(_finite(self.tau_logit_std) and self.tau_logit_std > 0,
             f"tau_logit_std must be > 0, got {self.tau_logit_std!r}")
        need(isinstance(self.fake_updates, int) and not isinstance(self.fake_updates, bool) and 1 <= self.fake_updates <= 16,
             f"fake_updates must be an integer in [1, 16], got {self.fake_updates!r}")
        need(self.stages in STAGES, f"stages must be one of {STAGES}, got {self.stages!r}")
        need(self.fake_samples in FAKE_SAMPLES,
             f"fake_samples must be one of {FAKE_SAMPLES}, got {self.fake_samples!r}")
        need(self.lr_decay in LR_DECAYS, f"lr_decay must be one of {LR_DECAYS}, got {self.lr_decay!r}")
        need(_finite(self.student_ema) and 0.0 <= self.student_ema < 1.0,
             f"student_ema must be 0 (no average) or a decay in (0, 1), e.g. 0.99; got {self.student_ema!r}")
        need(isinstance(self.recipe, str), f"recipe must be a recipe name, got {self.recipe!r}")
        need(_finite(self.huber_c) and self.huber_c > 0, f"huber_c must be > 0, got {self.huber_c!r}")
        need(_finite(self.snr_clamp) and self.snr_clamp > 0, f"snr_clamp must be > 0, got {self.snr_clamp!r}")
        need(isinstance(self.batch_size, int) and self.batch_size >= 1, f"batch_size must be ≥ 1, got {self.batch_size!r}")
        need(isinstance(self.micro_batch, int) and not isinstance(self.micro_batch, bool) and self.micro_batch >= 0,
             f"micro_batch must be an integer ≥ 0 (0: all rows of an update in one pass), got {self.micro_batch!r}")
        need(isinstance(self.iterations, int) and self.iterations >= 0, f"iterations must be ≥ 0, got {self.iterations!r}")
        need(self.lr_warmup_steps >= 0, f"lr_warmup_steps must be ≥ 0, got {self.lr_warmup_steps!r}")
        need(self.tau_mode in TAU_MODES, f"tau_mode must be one of {TAU_MODES}, got {self.tau_mode!r}")
        need(self.generator_loss in GENERATOR_LOSSES,
             f"generator_loss must be one of {GENERATOR_LOSSES}, got {self.generator_loss!r}")
        need(self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}")
        need(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        need(self.mode == "lora" or self.dtype in ("auto", "float32"),
             f"dtype {self.dtype} needs mode 'lora' (float32 adapters over a half-precision teacher); "
             "mode 'full' trains float32 copies")
        need(isinstance(self.lora_file, str) and (not self.lora_file or self.lora_file.endswith(".safetensors")),
             f"lora_file must be a path ending in .safetensors (or empty), got {self.lora_file!r}")
        need(self.parallel in PARALLEL_MODES, f"parallel must be one of {PARALLEL_MODES}, got {self.parallel!r}")
        need(self.parallel != "fsdp" or self.mode == "lora",
             "parallel 'fsdp' shards the teacher and its two LoRA adapters: it needs mode 'lora' (mode 'full' keeps "
             "whole trainable copies; use parallel 'ddp' for it)")
        need(self.parallel != "fsdp" or self.dtype != "float16",
             "parallel 'fsdp' with dtype float16: float16's loss scaler would find overflows in each process's "
             "shard of the gradients alone and let the processes' scales drift apart; use dtype bfloat16 (or "
             "float32), or parallel 'ddp'")
        need(isinstance(self.lora_rank, int) and self.lora_rank >= 1, f"lora_rank must be ≥ 1, got {self.lora_rank!r}")
        need(self.lora_alpha is None or (_finite(self.lora_alpha) and self.lora_alpha > 0),
             f"lora_alpha must be > 0 or null, got {self.lora_alpha!r}")
        need(self.keep_last >= 1, f"keep_last must be ≥ 1, got {self.keep_last!r}")
        need(self.checkpoint_every >= 0 and self.preview_every >= 0 and self.log_every >= 1,
             "checkpoint_every and preview_every must be ≥ 0 (0 = off), log_every ≥ 1")
        if not isinstance(self.prompts, (list, tuple)) or not self.prompts:
            errors.append("prompts is empty: TDM is data-free but needs at least one training prompt")
        elif not all(isinstance(p, str) for p in self.prompts):
            errors.append("prompts must be a list of strings")
        if self.timesteps is not None:
            need(len(self.timesteps) == self.steps,
                 f"timesteps lists {len(self.timesteps)} grid points but steps (K) is {self.steps}; give K points")
            need(all(int(a) > int(b) for a, b in zip(self.timesteps, self.timesteps[1:], strict=False)),
                 f"timesteps must be strictly descending, got {list(self.timesteps)}")
        elif isinstance(self.steps, int) and self.steps >= 1:
            need(self.total_steps // self.steps >= 1,
                 f"total_steps ({self.total_steps}) must be ≥ steps ({self.steps}) for the demo grid")
        if not errors and num_timesteps is not None:
            errors.extend(self._grid_errors(num_timesteps))
        if errors:
            raise ConfigError("invalid TDM distillation config:\n  - " + "\n  - ".join(errors))
        return self

    def _grid_errors(self, num_timesteps: int) -> list[str]:
        errors = []
        grid, mids = self.grid(), self.mid_timesteps()
        if self.timesteps is None and self.total_steps > num_timesteps:
            errors.append(f"total_steps {self.total_steps} exceeds the teacher schedule's {num_timesteps} timesteps; "
                          f"use total_steps ≤ {num_timesteps}")
        if any(t < 0 or t >= num_timesteps for t in grid):
            errors.append(f"grid {grid} does not fit the teacher schedule (indices 0..{num_timesteps - 1})")
            return errors
        for k, (t_g, t_mid) in enumerate(zip(grid, mids, strict=True)):
            lo = max(TAU_MIN, t_mid)
            hi = self.tau_upper(t_g, num_timesteps)
            if lo >= hi:
                errors.append(f"grid step {k} (t = {t_g}, ends at {t_mid}): the τ range [{lo}, {hi}) is empty; "
                              f"steps must be more than {TAU_MIN + TAU_MARGIN - 1} apart and t ≥ {TAU_MIN + TAU_MARGIN + 1}")
            if self.randmid and t_mid >= t_g - RANDMID_MARGIN:
                errors.append(f"grid step {k} (t = {t_g}): randmid needs t_mid {t_mid} < t − {RANDMID_MARGIN}")
        return errors

    # ---- the grid -----------------------------------------------------------------------------------------------
    def grid(self) -> list[int]:
        """The K student timesteps t_0 > … > t_{K−1} (schedule indices)."""
        if self.timesteps is not None:
            return [int(t) for t in self.timesteps]
        from ..schedules import training_demo_timesteps

        return list(training_demo_timesteps(self.steps, self.total_steps))

    def mid_timesteps(self) -> list[int]:
        """t_mid of each step: where the student's step lands (t_g − Δ + 1 on the demo grid)."""
        grid = self.grid()
        if self.timesteps is None:
            delta = self.total_steps // self.steps
            return [t - delta + 1 for t in grid]
        return [nxt + 1 for nxt in grid[1:]] + [0]

    def grid_top(self) -> int:
        """N of the "shared" τ mode's upper bound N − 10."""
        return self.total_steps if self.timesteps is None else int(self.timesteps[0]) + 1

    def tau_upper(self, t_g, num_timesteps: int):
        """The exclusive upper end of τ's interval for the student step at t_g (see TAU_MODES); t_g may be a tensor
        of steps (the trainer's draws), and only "separate" depends on it."""
        if self.tau_mode == "separate":
            return t_g - TAU_MARGIN
        if self.tau_mode == "shared":
            return self.grid_top() - TAU_MARGIN
        return num_timesteps

    def student_learning_rate(self) -> float:
        return float(self.student_lr) if self.student_lr is not None else self.lr * self.generator_lr_scale

    def grid_name(self) -> str:
        if self.timesteps is not None:
            return "custom:" + ",".join(str(t) for t in self.grid())
        return f"tdm_demo(N={self.total_steps},K={self.steps})"

    # ---- (de)serialisation --------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["adam_betas"] = list(self.adam_betas)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> DistillConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        data = dict(data)
        recipe = data.get("recipe") or ""
        if recipe:  # a named recipe fills every knob the data does not set (tdm_core/recipes.py)
            from ..recipes import AUTO, family_recipe, follow, recipe_settings

            if not isinstance(recipe, str):
                raise ConfigError(f"recipe must be a recipe name, got {recipe!r}")
            family = str(data.get("family") or "")
            if recipe == AUTO:  # as TDM Distill's recipe auto: the teacher family's (tdm_core/families.py)
                recipe = data["recipe"] = family_recipe(family)
            try:
                filled = recipe_settings(recipe, family)
            except KeyError as error:
                raise ConfigError(str(error.args[0])) from None
            given, data = set(data), filled | data
            follow(data, filled, given)  # the student's lr and LoRA alpha keep the recipe's ratios, as on the node
        if "adam_betas" in data:
            data["adam_betas"] = tuple(data["adam_betas"])
        if data.get("prompts") is not None:
            data["prompts"] = list(data["prompts"])
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> DistillConfig:
        """Reads a .json or .toml file (a TOML file may put the settings under a [distill] table); a `recipe` key
        fills the knobs the file leaves out from that recipe (tdm_core/recipes.py)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix.lower() == ".toml":
                import tomllib

                data = tomllib.loads(text)
                data = data.get("distill", data)
            else:
                data = json.loads(text)
        except Exception as error:  # noqa: BLE001 - re-raised with the file name
            raise ConfigError(f"cannot parse {path}: {error}") from error
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2), encoding="utf-8")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
