"""Matching a parsed LoRA against a model's modules, the messages users see, and the strength "auto" resolves to.

The model side is given as plain data (the LoRA keys the model knows and a function giving a target's weight shape),
so this stays independent of ComfyUI; `nodes/lora_patching.py` builds both from ComfyUI's own key map.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import families
from ..families import architecture as family_name
from ..families import lora_fits as families_compatible
from ..presets import PRESETS, presets_for_family
from .model import LoraFile, LoraModule

MAX_LISTED_GROUPS = 12


class LoraMismatchError(ValueError):
    """The LoRA does not fit the model: another family, or no module matched."""


@dataclass
class MatchResult:
    lora: LoraFile
    model_family: str
    matched: dict[str, tuple[LoraModule, Any]] = field(default_factory=dict)  # module id -> (module, model target)
    unmatched: dict[str, str] = field(default_factory=dict)  # module id -> reason
    text_encoder_matched: dict[str, tuple[LoraModule, Any]] = field(default_factory=dict)
    text_encoder_unmatched: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return len(self.matched) + len(self.unmatched)

    def status_line(self) -> str:
        line = f"matched {len(self.matched)}/{self.total} modules"
        te_total = len(self.text_encoder_matched) + len(self.text_encoder_unmatched)
        if te_total:
            line += f", text encoder {len(self.text_encoder_matched)}/{te_total}"
        return line

    def warning(self) -> str | None:
        """One message for every module that is skipped, grouped by module kind (never one line per key)."""
        parts = []
        if self.unmatched:
            parts.append(
                f"{len(self.unmatched)} of {self.total} modules have no counterpart in this MODEL "
                f"({family_name(self.model_family)}) and are skipped: {group_module_names(self.unmatched)}"
            )
        if self.text_encoder_unmatched:
            parts.append(
                f"{len(self.text_encoder_unmatched)} text-encoder modules are skipped: "
                f"{group_module_names(self.text_encoder_unmatched)}"
            )
        if not parts:
            return None
        return f"TDM LoRA '{self.lora.name}': " + "; ".join(parts)


def group_module_names(reasons: Mapping[str, str]) -> str:
    """`transformer.transformer_blocks.{0,1}.attn2.to_q (2, no such module)` style groups, at most a dozen."""
    groups: dict[tuple[str, str], list[str]] = {}
    for module_id, reason in sorted(reasons.items()):
        indices = re.findall(r"\.(\d+)\.", module_id)
        pattern = re.sub(r"\.\d+\.", ".*.", module_id)
        groups.setdefault((pattern, reason), []).append(",".join(indices))
    listed = []
    for (pattern, reason), members in list(groups.items())[:MAX_LISTED_GROUPS]:
        count = f"×{len(members)}, " if len(members) > 1 else ""
        listed.append(f"{pattern} ({count}{reason})")
    more = len(groups) - MAX_LISTED_GROUPS
    return "; ".join(listed) + (f"; and {more} more groups" if more > 0 else "")


def _match(modules, targets, weight_shape, matched, unmatched):
    for module in modules:
        if module.comfy_key not in targets:
            unmatched[module.id] = "no such module"
            continue
        target = targets[module.comfy_key]
        shape = weight_shape(target)
        if shape is None:
            unmatched[module.id] = "no such weight"
        elif not module.fits(tuple(shape)):
            unmatched[module.id] = (
                f"shape {module.out_features}x{module.in_numel} vs weight {'x'.join(str(s) for s in shape)}"
            )
        else:
            matched[module.id] = (module, target)


def match_modules(
    lora: LoraFile,
    targets: Mapping[str, Any],
    weight_shape: Callable[[Any], tuple | None],
    model_family: str = families.UNKNOWN,
    text_encoder_targets: Mapping[str, Any] | None = None,
    text_encoder_weight_shape: Callable[[Any], tuple | None] | None = None,
) -> MatchResult:
    """Which LoRA modules land on which model weights (by `LoraModule.comfy_key`), checking shapes.

    Raises LoraMismatchError, naming the file, the LoRA's family and the model's, when the families differ or no
    model module matches. Text-encoder modules are matched only when `text_encoder_targets` is given (a CLIP is
    connected); otherwise they are reported as skipped.
    """
    if not families_compatible(lora.family, model_family):
        raise LoraMismatchError(
            f"'{lora.name}' is a LoRA for {family_name(lora.family)} ({len(lora.model_modules)} modules, "
            f"{lora.format} format), but this MODEL is {family_name(model_family)}. {_advice(lora.family)}"
        )
    result = MatchResult(lora, model_family)
    _match(lora.model_modules, targets, weight_shape, result.matched, result.unmatched)
    if text_encoder_targets is not None:
        _match(lora.text_encoder_modules, text_encoder_targets, text_encoder_weight_shape or weight_shape,
               result.text_encoder_matched, result.text_encoder_unmatched)
    else:
        for module in lora.text_encoder_modules:
            result.text_encoder_unmatched[module.id] = "connect a CLIP to apply"
    if not result.matched:
        first = next(iter(result.unmatched.items()), None)
        example = f" (e.g. {first[0]}: {first[1]})" if first else ""
        raise LoraMismatchError(
            f"'{lora.name}' matched 0 of {result.total} modules of this MODEL ({family_name(model_family)}){example}. "
            f"The LoRA looks like {lora.format} format for {family_name(lora.family)}. {_advice(lora.family)}"
        )
    return result


def _advice(lora_family: str) -> str:
    presets = presets_for_family(lora_family)
    if presets:
        names = ", ".join(p.display_name for p in presets)
        return f"Load a matching base model ({names}) or pick the TDM LoRA made for your model."
    return "Load the base model this LoRA was trained for, or pick a LoRA made for your model."


def auto_strength(lora: LoraFile, model_family: str | None = None) -> tuple[float, str]:
    """(strength, where it comes from): the file's TDM metadata, else the family preset, else 1.0."""
    recorded = lora.recorded_strength
    if recorded is not None:
        return recorded, "recorded in the LoRA file"
    preset_name = lora.recorded_preset
    if preset_name in PRESETS:
        preset = PRESETS[preset_name]
        return preset.lora_strength, f"{preset.display_name} preset (recorded in the LoRA file)"
    # a LoRA recognised only as a kind that fits several families (any SD UNet) or none: the model decides
    family = lora.family if lora.family not in (families.ANY_UNET, families.UNKNOWN) else (model_family or lora.family)
    presets = presets_for_family(family)
    if presets:
        return presets[0].lora_strength, f"{presets[0].display_name} preset"
    return 1.0, f"default (no TDM preset for {family_name(family)})"
