"""What a job runs: a training session (`TDMSession` adapts `tdm_core.distill.TDMTrainer`), the runtime that builds
one on the worker thread, and the words a failed job is described with."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from .errors import NonFiniteLoss, NonFiniteWeights, NotOwned


class TrainingSession(Protocol):
    """One live training run (created on the worker thread)."""

    step_count: int

    def step(self) -> dict: ...  # one iteration; returns metrics with "loss_fake" and "loss_gen"

    def state_dict(self) -> dict: ...  # resumable state (torch.save-able with weights_only loading)

    def lora(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]: ...  # the student LoRA file's content

    def preview(self) -> Any: ...  # uint8 H×W×3 array/tensor, or None


class JobRuntime(Protocol):
    """What a job needs to (re)start: builds its session on the worker thread, from a checkpoint state (resume)
    or from scratch (None), for the job's `iterations` (a resume may have raised them: a learning-rate schedule over
    the run stretches to the new count; None: the run's own). May define `offload()` to free accelerator memory while
    the job waits."""

    def build(self, state: dict | None, iterations: int | None = None) -> TrainingSession: ...


class TDMSession:
    """A `tdm_core.distill.TDMTrainer` as a job's session; `preview_decode(x0) -> uint8 H×W×3` renders samples."""

    def __init__(self, trainer, preview_prompts: list[str] | None = None,
                 preview_decode: Callable | None = None, extra_metadata: dict | None = None):
        self.trainer = trainer
        self.preview_prompts = list(preview_prompts or trainer.config.prompts[:4])
        self.preview_decode = preview_decode
        self.extra_metadata = dict(extra_metadata or {})

    @classmethod
    def create(cls, backend, config, state: dict | None = None, iterations: int | None = None, **kwargs):
        """A new trainer, or one continuing `state` (its stored config; `iterations` may be raised)."""
        from ..distill import DistillConfig, TDMTrainer
        from ..distill.checkpoint import check_trainer_state

        if state is not None:
            # read from a file anyone with access to models/loras can replace: a trainer's fields, checked before use
            check_trainer_state(state, "the job's checkpoint")
            config = DistillConfig.from_dict(state["config"])
        if iterations is not None:
            config.iterations = int(iterations)
        trainer = TDMTrainer(backend, config)
        if state is not None:
            # The trainer's state holds only its own generator: the process-wide RNG belongs to whatever else runs in
            # this process (ComfyUI's samplers) and is neither read nor rewound.
            trainer.load_state_dict(state)
        return cls(trainer, **kwargs)

    @property
    def step_count(self) -> int:
        return self.trainer.step_count

    def step(self) -> dict:
        return self.trainer.step()

    def state_dict(self) -> dict:
        return self.trainer.state_dict()

    def lora(self):
        from ..distill.checkpoint import student_lora

        tensors, metadata = student_lora(self.trainer)
        return tensors, {**metadata, **self.extra_metadata}

    def preview(self):
        if self.preview_decode is None or not self.preview_prompts:
            return None
        x0 = self.trainer.sample(self.preview_prompts, seed=0)
        return self.preview_decode(x0)


def describe_failure(error: BaseException, step: int, checkpoint_step: int) -> str:
    """The reason a job failed, in words a user can act on."""
    resume = (f"resume continues from the checkpoint at step {checkpoint_step}" if checkpoint_step
              else "no checkpoint was written yet; resuming starts over")
    text = str(error).strip().splitlines()[0][:400] if str(error).strip() else type(error).__name__
    if isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower():
        return (f"out of memory at step {step}: {text}. Lower batch_size or the resolution, enable "
                f"gradient_checkpointing, use dtype bfloat16, or free VRAM (offload: unload_comfy_models); {resume}.")
    if isinstance(error, NonFiniteWeights):
        return (f"{text}. Lower the learning rate, check the teacher, or use dtype float32/bfloat16; {resume}.")
    if isinstance(error, NotOwned):
        return f"{text}; {resume}."
    if isinstance(error, NonFiniteLoss):
        return (f"{text}. Lower the learning rate, check the teacher (a broken merge or LoRA gives NaN), or use "
                f"dtype float32/bfloat16 instead of float16; {resume}.")
    if isinstance(error, FileNotFoundError):
        return f"a file is missing: {text}; {resume}."
    return f"{type(error).__name__} at step {step}: {text}; {resume}."
