"""Writing LoRAs that diffusers, peft and this loader all read the same way (for the TDM trainer)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .files import write_safetensors
from .metadata import DIFFUSERS_METADATA_KEY, tdm_metadata


def save_peft_lora(
    path: str | os.PathLike,
    peft_state_dict: dict[str, torch.Tensor],
    *,
    component: str = "transformer",
    lora_alpha: float | None = None,
    preset: str | None = None,
    family: str | None = None,
    strength: float | None = None,
    extra_metadata: dict | None = None,
) -> Path:
    """Saves a peft state dict (`<module>.lora_A.weight` / `.lora_B.weight`, as `get_peft_model_state_dict`
    returns it, with or without the component prefix) as `<component>.<module>.lora_A.weight` safetensors.

    The header carries diffusers' `lora_adapter_metadata` (r, lora_alpha, target_modules), so diffusers'
    `load_lora_weights` applies the same scale this loader does, and the TDM entries (preset, family, strength) that
    make strength "auto" right for this LoRA.
    """
    prefix = component + "."
    tensors = {}
    ranks = set()
    for key, tensor in peft_state_dict.items():
        key = key.replace(".lora_A.default.weight", ".lora_A.weight").replace(".lora_B.default.weight", ".lora_B.weight")
        full = key if key.startswith(prefix) else prefix + key
        tensors[full] = tensor
        if ".lora_A." in key:
            ranks.add(int(tensor.shape[0]))
    if len(ranks) != 1:
        raise ValueError(f"save_peft_lora needs one rank for all modules, got {sorted(ranks)}")
    rank = ranks.pop()
    targets = sorted({k[len(prefix):].split(".lora_")[0] for k in tensors})
    config = {
        f"{component}.r": rank,
        f"{component}.lora_alpha": float(lora_alpha) if lora_alpha is not None else rank,
        f"{component}.target_modules": targets,
    }
    metadata = {DIFFUSERS_METADATA_KEY: json.dumps(config)}
    metadata.update(tdm_metadata(preset=preset, family=family, strength=strength))
    metadata.update(extra_metadata or {})
    return write_safetensors(path, tensors, metadata)
