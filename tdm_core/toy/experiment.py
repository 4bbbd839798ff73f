"""The toy distillation experiment shared by the demo (`python -m tdm_core.demo`) and `bench/distill.py`.

Trains (or reuses) the digits teacher, scores the teacher's own 50-step and 4-step DDIM samples, distills a 4-step
TDM student (LoRA adapters on the frozen teacher, `tdm_core.distill.TDMTrainer`) and scores it every `eval_every`
iterations on the same fixed noise. All numbers come from `ToyEvaluator` (fixed counts and seeds).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..distill import DistillConfig, TDMTrainer, nfe_per_iteration
from .backend import ToyBackend, class_prompts
from .evaluate import ToyEvaluator
from .teacher import DIGITS_TEACHER, ToyTeacherConfig, load_or_train_teacher

TEACHER_STEPS = 50


def digits_distill_config(**overrides) -> DistillConfig:
    """The toy's TDM recipe. Against the official demo (docs/tdm_method.md §2) only the sizes differ: the grid is
    N = 1000, K = 4 (999, 749, 499, 249; the teacher's 4-step baseline uses the same grid), and lr / batch / rank
    are scaled for a 0.5 M-parameter MLP and 500 iterations. Everything else (AdamW betas (0, 0.95), generator
    LR = LR/5, clip 1.0, "separate" τ, element-wise pseudo-Huber c = 1e-3, min(SNR, 5)) is the official choice.

    cfg = 1 (no guidance), so student and 50-step teacher aim at the same distribution. Measured on 2 CPU cores
    (pixel FD, 500 iterations): cfg 1.0 -> student 0.347 vs teacher-50 0.334 (1.04x); cfg 1.25 -> 0.294 vs the
    guided teacher's 0.255 (1.15x); cfg 1.5 -> about 0.30 vs 0.25 (1.2x)."""
    base = dict(prompts=class_prompts(10), steps=4, total_steps=1000, cfg=1.0, lr=1e-3, batch_size=256,
                lora_rank=64, iterations=500, seed=0, family="toy_digits")
    base.update(overrides)
    return DistillConfig(**base)


@dataclass
class ToyRunResult:
    teacher_config: ToyTeacherConfig
    distill_config: DistillConfig
    teacher_from_cache: bool
    teacher_train_seconds: float
    teacher_50: dict
    teacher_4: dict
    student: dict
    history: list[dict] = field(default_factory=list)  # {"iteration", "fd", "acc", "seconds"}
    distill_seconds: float = 0.0
    eval_seconds: float = 0.0
    nfe_per_iteration: int = 0
    student_steps_per_iteration: float = 0.0  # rollout evaluations actually run (≤ K: max(j_fake + 1, j_gen))
    samples: dict[str, torch.Tensor] = field(default_factory=dict)
    labels: torch.Tensor | None = None
    trainer: TDMTrainer | None = None

    def bench_line(self) -> dict:
        """The `bench/distill.py` JSON object."""
        return {
            "bench": "distill",
            "fd_teacher_50": round(self.teacher_50["fd"], 4),
            "fd_teacher_4": round(self.teacher_4["fd"], 4),
            "fd_tdm_4": round(self.student["fd"], 4),
            "acc_teacher_50": round(self.teacher_50["acc"], 4),
            "acc_tdm_4": round(self.student["acc"], 4),
            "iterations": self.distill_config.iterations,
            "seconds": round(self.distill_seconds, 1),
            "nfe_per_iteration": self.nfe_per_iteration,
            "student_steps_per_iteration": round(self.student_steps_per_iteration, 3),
            "student_steps_full_rollout": self.distill_config.steps,
            "acc_teacher_4": round(self.teacher_4["acc"], 4),
            "fd_clf_teacher_50": round(self.teacher_50.get("fd_clf", float("nan")), 4),
            "fd_clf_teacher_4": round(self.teacher_4.get("fd_clf", float("nan")), 4),
            "fd_clf_tdm_4": round(self.student.get("fd_clf", float("nan")), 4),
            "cfg": self.distill_config.cfg,
            "teacher_cached": self.teacher_from_cache,
        }


def run_toy_distillation(iterations: int = 500, eval_every: int = 50, teacher_config: ToyTeacherConfig = DIGITS_TEACHER,
                         cache_dir=None, samples_per_class: int = 200, log=print, **distill_overrides) -> ToyRunResult:
    teacher = load_or_train_teacher(teacher_config, cache_dir, log=log)
    config = digits_distill_config(iterations=iterations, **distill_overrides)
    start = time.perf_counter()
    evaluator = ToyEvaluator(teacher, samples_per_class=samples_per_class, cache_dir=cache_dir)
    samples = {
        "teacher_50": evaluator.teacher_samples(TEACHER_STEPS, cfg=config.cfg),
        "teacher_4": evaluator.teacher_samples(config.steps, cfg=config.cfg),
    }
    teacher_50, teacher_4 = evaluator.score(samples["teacher_50"]), evaluator.score(samples["teacher_4"])
    eval_seconds = time.perf_counter() - start
    log(f"teacher {TEACHER_STEPS}-step (cfg {config.cfg}): FD {teacher_50['fd']:.3f} acc {teacher_50['acc']:.3f}; "
        f"{config.steps}-step: FD {teacher_4['fd']:.3f} acc {teacher_4['acc']:.3f}")

    backend = ToyBackend(teacher, lora_rank=config.lora_rank, adapter_seed=config.seed)
    trainer = TDMTrainer(backend, config)
    history: list[dict] = []
    distill_seconds = 0.0

    def record():
        nonlocal eval_seconds
        t = time.perf_counter()
        score = evaluator.score(evaluator.student_samples(trainer))
        eval_seconds += time.perf_counter() - t
        history.append({"iteration": trainer.step_count, **score, "seconds": round(distill_seconds, 2)})
        log(f"TDM iteration {trainer.step_count}/{config.iterations}: FD {score['fd']:.3f} acc {score['acc']:.3f} "
            f"({distill_seconds:.0f}s training)")
        return score

    student_steps = []

    def callback(tr, metrics):
        nonlocal distill_seconds
        distill_seconds += metrics["seconds"]
        student_steps.append(metrics["student_steps"])
        if eval_every and tr.step_count % eval_every == 0 and tr.step_count < config.iterations:
            record()

    record()  # iteration 0: the student is the teacher's own 4-step sampler
    trainer.train(config.iterations, callback)
    student = record() if history[-1]["iteration"] != trainer.step_count else history[-1]
    samples["tdm_4"] = evaluator.student_samples(trainer)
    return ToyRunResult(teacher.config, config, teacher.from_cache, teacher.train_seconds, teacher_50, teacher_4,
                        student, history, distill_seconds, eval_seconds, nfe_per_iteration(config),
                        sum(student_steps) / max(1, len(student_steps)), samples, evaluator.labels, trainer)

