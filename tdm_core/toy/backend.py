"""The toy teachers as a `tdm_core.distill` backend: student and fake score as two peft LoRA adapters ("student",
"fake") on one frozen `ToyEpsNet`, exactly the layout of the real backends (`PeftBackend`), or separate copies in
"full" mode.

Prompts are class labels: "0".."9" for digits ("0".."3" for the mixture), "" the unconditional (null) class.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from ..distill import DiscreteSchedule, PeftBackend
from .data import DIGITS_SIDE, digits_to_uint8
from .networks import LORA_TARGET_MODULES
from .teacher import DIGITS_TEACHER, GMM_TEACHER, ToyTeacher, load_or_train_teacher


def prompt_to_label(prompt: str, num_classes: int) -> int:
    """"" -> the null class (num_classes); "k" -> k for k in [0, num_classes)."""
    text = prompt.strip()
    if text == "":
        return num_classes
    if text.isdigit() and int(text) < num_classes:
        return int(text)
    raise ValueError(f"toy prompt {prompt!r} is not a class label: use '0'..'{num_classes - 1}' or '' (unconditional)")


def class_prompts(num_classes: int) -> list[str]:
    return [str(c) for c in range(num_classes)]


class LabelledToyBackend(PeftBackend):
    """The toys' common layout: an ε-parametrised network on a VP schedule (N = 1000) whose prompts are class labels
    ("0", "1", …; "" the null class), student and fake score as peft LoRAs (or full copies) on its linears,
    exported in peft layout under "toy."."""

    def __init__(self, net: torch.nn.Module, alphas_cumprod: torch.Tensor, dim: int, family: str, num_classes: int, *,
                 mode: str = "lora", lora_rank: int = 16, lora_alpha: float | None = None,
                 target_modules: list[str] | None = None, adapter_seed: int = 0):
        self.num_classes = num_classes
        super().__init__(
            net,
            schedule=DiscreteSchedule.from_alphas_cumprod(alphas_cumprod),
            parametrisation="eps",
            latent_shape=(dim,),
            encode=self._labels,
            family=family,
            mode=mode,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            target_modules=list(target_modules or LORA_TARGET_MODULES),
            export_format="peft",
            export_prefix="toy.",
            adapter_seed=adapter_seed,
        )

    def _labels(self, prompts: list[str]) -> torch.Tensor:
        return torch.tensor([prompt_to_label(p, self.num_classes) for p in prompts], dtype=torch.long)


class ToyBackend(LabelledToyBackend):
    """A `TeacherBackend` over a trained toy teacher. The teacher's network is copied, so several backends can share
    one `ToyTeacher`."""

    def __init__(self, teacher: ToyTeacher, *, mode: str = "lora", lora_rank: int = 16, lora_alpha: float | None = None,
                 target_modules: list[str] | None = None, adapter_seed: int = 0):
        self.teacher = teacher
        self.task = teacher.config.task
        super().__init__(copy.deepcopy(teacher.net), teacher.alphas_cumprod, teacher.config.dim,
                         f"toy_{teacher.config.task}", teacher.config.num_classes, mode=mode, lora_rank=lora_rank,
                         lora_alpha=lora_alpha, target_modules=target_modules, adapter_seed=adapter_seed)

    @property
    def class_prompts(self) -> list[str]:
        return class_prompts(self.num_classes)

    def preview_image(self, x0: torch.Tensor) -> np.ndarray:
        """Digits: a row of 8x8 samples, each scaled ×4 (uint8 [32, 32·n, 3]); mixture: a 128×128 scatter plot."""
        x0 = x0.detach().cpu().float()
        if self.task == "digits":
            tiles = digits_to_uint8(x0)  # [n, 8, 8]
            row = tiles.permute(1, 0, 2).reshape(DIGITS_SIDE, -1)
            big = row.repeat_interleave(4, 0).repeat_interleave(4, 1)
            return np.stack([big.numpy()] * 3, axis=-1)
        canvas = np.zeros((128, 128, 3), dtype=np.uint8)
        pix = ((x0.clamp(-1.5, 1.5) + 1.5) / 3.0 * 127).round().long().numpy()
        canvas[127 - pix[:, 1], pix[:, 0]] = 255
        return canvas


def make_backend(config=None, task: str = "digits", cache_dir: str | None = None, lora_rank: int | None = None,
                 mode: str | None = None, **teacher_overrides) -> ToyBackend:
    """The CLI factory (`teacher = {"factory": "tdm_core.toy:make_backend", "task": "digits"}`): loads or trains the
    cached toy teacher of `task` ("digits" | "gmm") and wraps it; LoRA settings come from the DistillConfig."""
    from dataclasses import replace

    base = {"digits": DIGITS_TEACHER, "gmm": GMM_TEACHER}.get(task)
    if base is None:
        raise ValueError(f"unknown toy task {task!r}; use 'digits' or 'gmm'")
    teacher = load_or_train_teacher(replace(base, **teacher_overrides), cache_dir)
    return ToyBackend(teacher, **adapter_settings(config, lora_rank, mode))


def adapter_settings(config=None, lora_rank: int | None = None, mode: str | None = None) -> dict:
    """The LoRA keyword arguments of a toy CLI factory: the DistillConfig's (rank, alpha, target modules, mode,
    adapter seed = config.seed), a factory argument winning for rank and mode, else the defaults."""
    return dict(mode=mode or (config.mode if config is not None else "lora"),
                lora_rank=lora_rank or (config.lora_rank if config is not None else 16),
                lora_alpha=config.lora_alpha if config is not None else None,
                target_modules=config.lora_target_modules if config is not None else None,
                adapter_seed=config.seed if config is not None else 0)
