"""The one representation every LoRA key format is read into: a `LoraFile` of `LoraModule`s.

Kept apart from the formats so that matching, conversion and writing depend on this shape alone, and a new key format
(tdm_core/lora/keys/) only has to say how its keys name a module.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field

import torch

from .. import families
from . import metadata as tdm_header

MODEL_COMPONENTS = ("unet", "transformer", "diffusion_model")
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")


@dataclass
class LoraModule:
    """One low-rank update `ΔW = scale · up @ down` (reshaped to the weight for convolutions)."""

    component: str  # "unet", "transformer", "diffusion_model" (ComfyUI-native names), "text_encoder(_2)"
    name: str  # dotted module path inside the component (diffusers names; ComfyUI names for "diffusion_model")
    down: torch.Tensor  # [r, in] or [r, in, kh, kw]
    up: torch.Tensor  # [out, r] or [out, r, 1, 1]
    alpha: float | None  # as stated by the file (key or metadata); None: scale 1 (the peft default alpha = r)
    scale: float  # alpha / r (alpha / sqrt(r) for rsLoRA), 1.0 without alpha
    comfy_key: str  # the LoRA key ComfyUI's key map knows this module by
    source_keys: tuple = ()

    @property
    def id(self) -> str:
        return f"{self.component}.{self.name}"

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])

    @property
    def in_numel(self) -> int:
        return int(math.prod(self.down.shape[1:]))

    def delta(self, strength: float = 1.0, weight_shape: tuple | None = None) -> torch.Tensor:
        """strength · scale · up @ down, in float32, reshaped to `weight_shape` when given."""
        diff = self.up.flatten(1).float() @ self.down.flatten(1).float()
        diff = diff * (strength * self.scale)
        return diff.reshape(weight_shape) if weight_shape is not None else diff

    def fits(self, weight_shape: tuple) -> bool:
        return (
            len(weight_shape) >= 2
            and weight_shape[0] == self.out_features
            and math.prod(weight_shape[1:]) == self.in_numel
        )


@dataclass
class LoraFile:
    """A parsed LoRA: its modules, the format and family they reveal, the header metadata (read through
    tdm_core.lora.metadata, whose readers check the untrusted values)."""

    name: str
    format: str  # a tdm_core.lora.keys format name ("peft", "kohya", "diffusers_old", "comfy"); "mixed: a+b"
    family: str  # a tdm_core.families name (or kind: families.ANY_UNET, UNKNOWN, ...)
    modules: dict[str, LoraModule]  # by LoraModule.id
    metadata: dict[str, str] = field(default_factory=dict)
    unrecognised_keys: list[str] = field(default_factory=list)

    @property
    def model_modules(self) -> list[LoraModule]:
        return [m for m in self.modules.values() if m.component in MODEL_COMPONENTS]

    @property
    def text_encoder_modules(self) -> list[LoraModule]:
        return [m for m in self.modules.values() if m.component in TEXT_COMPONENTS]

    @property
    def ranks(self) -> collections.Counter:
        return collections.Counter(m.rank for m in self.modules.values())

    @property
    def rank(self) -> int:
        """The most common rank."""
        return self.ranks.most_common(1)[0][0]

    @property
    def alphas(self) -> collections.Counter:
        return collections.Counter(m.alpha for m in self.modules.values())

    @property
    def alpha(self) -> float | None:
        """The most common stated alpha (None: the file states none, scale 1)."""
        return self.alphas.most_common(1)[0][0]

    @property
    def target_modules(self) -> list[str]:
        """The distinct module kinds patched (last path parts, e.g. `attn.to_q`, `ff.net.0.proj`)."""
        return sorted({module_kind(m.name) for m in self.modules.values()})

    @property
    def recorded_strength(self) -> float | None:
        return tdm_header.recorded_strength(self.metadata)

    @property
    def recorded_preset(self) -> str | None:
        return tdm_header.recorded_preset(self.metadata)

    @property
    def trained_here(self) -> bool:
        return tdm_header.trained_here(self.metadata)

    @property
    def recorded_solver(self) -> str | None:
        return tdm_header.recorded_solver(self.metadata)

    @property
    def recorded_grid(self) -> tuple[str, str | tuple[int, ...]] | None:
        return tdm_header.recorded_grid(self.metadata)

    def trained_recipe(self) -> str | None:
        return tdm_header.trained_recipe(self.metadata)

    def summary(self) -> str:
        alpha = "none (scale 1)" if self.alpha is None else f"{self.alpha:g}"
        ranks = "/".join(str(r) for r in sorted(self.ranks))
        te = f", {len(self.text_encoder_modules)} text-encoder" if self.text_encoder_modules else ""
        recipe = self.trained_recipe()
        return (
            f"{self.name}: {self.format} LoRA for {families.architecture(self.family)}, {len(self.model_modules)} "
            f"model modules{te}, rank {ranks}, alpha {alpha}" + (f"; {recipe}" if recipe else "")
        )


_BLOCK_WORDS = ("blocks", "block", "layers", "attentions", "resnets", "samplers")


def module_kind(name: str) -> str:
    """The module path after its last `<...blocks|layers|...>.<index>.` (`transformer_blocks.3.attn.to_q` ->
    `attn.to_q`). A split and one backwards pass: linear in the name (a `^.*(...)\\.\\d+\\.` regex backtracks
    quadratically on a long crafted name from a file)."""
    parts = name.split(".")
    for index in range(len(parts) - 2, 0, -1):
        if parts[index].isdigit() and parts[index].isascii() and parts[index - 1].endswith(_BLOCK_WORDS):
            return ".".join(parts[index + 1:])
    return name
