"""The model families TDM Distill trains, under the names the pack uses for them, with the labels users know.

ComfyUI-free, so that nodes, scripts (the workflow notes) and docs tests read one list; `nodes/comfy_families.py`
adds what needs a ComfyUI MODEL (LoRA targets by ComfyUI module name, extra conditioning inputs).
"""

from __future__ import annotations

DISTILLABLE_FAMILY_LABELS = {"sd15": "SD1.5 family", "sdxl": "SDXL", "sd3": "SD3-medium", "sd35": "SD3.5-medium",
                             "flux": "Flux-dev"}


def distillable_families_text() -> str:
    """'sd15 (SD1.5 family), sdxl (SDXL), …', for refusals."""
    return ", ".join(f"{name} ({label})" for name, label in DISTILLABLE_FAMILY_LABELS.items())


def distillable_labels_text() -> str:
    """'SD1.5 family, SDXL, SD3-medium, SD3.5-medium or Flux-dev', for prose."""
    labels = list(DISTILLABLE_FAMILY_LABELS.values())
    return ", ".join(labels[:-1]) + " or " + labels[-1]
