"""TDM LoRAs: safe reading (safetensors, weights-only pickles), format and family detection, conversion to the keys
ComfyUI maps and to peft adapters for diffusers models, and writing LoRAs with TDM metadata.

    lora = load_lora("tdm_sd3.safetensors")       # LoraFile: modules, format, family, rank, alpha, metadata
    lora.summary()
    to_comfy_state_dict(lora)                      # {comfy_key.lora_up.weight, .lora_down.weight, .alpha}
    adapter = to_peft(lora, "transformer")         # peft state dict + LoraConfig arguments (CogVideoX path)
    auto_strength(lora, model_family)             # (0.125, "SD3-medium preset") for an SD3 MODEL
"""

from __future__ import annotations

from .files import LoraFileError, read_lora_file, write_safetensors
from .formats import (
    DIFFUSERS_METADATA_KEY,
    TDM_METADATA_FAMILY,
    TDM_METADATA_PRESET,
    TDM_METADATA_STRENGTH,
    LoraFile,
    LoraModule,
    PeftAdapter,
    cogvideox_diffusers_name,
    cogvideox_native_lora_key_map,
    detect_family,
    families_compatible,
    family_group,
    family_name,
    kohya_name_to_path,
    load_lora,
    parse_lora,
    tdm_metadata,
    to_comfy_state_dict,
    to_peft,
)
from .matching import (
    LoraMismatchError,
    MatchResult,
    auto_strength,
    match_modules,
)
from .writing import save_peft_lora

__all__ = [
    "DIFFUSERS_METADATA_KEY", "TDM_METADATA_FAMILY", "TDM_METADATA_PRESET", "TDM_METADATA_STRENGTH",
    "LoraFile", "LoraFileError", "LoraMismatchError", "LoraModule", "MatchResult", "PeftAdapter", "auto_strength",
    "cogvideox_diffusers_name", "cogvideox_native_lora_key_map",
    "detect_family", "families_compatible", "family_group", "family_name", "kohya_name_to_path", "load_lora",
    "match_modules", "parse_lora", "read_lora_file", "save_peft_lora", "tdm_metadata", "to_comfy_state_dict",
    "to_peft", "write_safetensors",
]
