"""TDM LoRAs: safe reading (safetensors, weights-only pickles), format and family detection, conversion to the keys
ComfyUI maps and to peft adapters for diffusers models, and writing LoRAs with TDM metadata.

    lora = load_lora("tdm_sd3.safetensors")       # LoraFile: modules, format, family, rank, alpha, metadata
    lora.summary()
    to_comfy_state_dict(lora)                      # {comfy_key.lora_up.weight, .lora_down.weight, .alpha}
    adapter = to_peft(lora, "transformer")         # peft state dict + LoraConfig arguments (CogVideoX path)
    auto_strength(lora, model_family)             # (0.125, "SD3-medium preset") for an SD3 MODEL

One module per concern, so a change to one does not reach into the others:

    model.py     LoraModule / LoraFile, the one representation every format is read into
    metadata.py  the TDM header schema: every `tdm.*` key, its writers and its (validating) readers
    keys/        one unit per key format (peft, kohya, diffusers_old, comfy_native) and the registry of them
    parse.py     state dict + header -> LoraFile: grouping keys, checking factors, alpha from headers, family
    convert.py   LoraFile -> ComfyUI keys, a peft adapter, the native CogVideoX and Wan 2.1 key maps
    files.py     reading files safely; writing.py: saving peft LoRAs diffusers reads the same way
    matching.py  LoRA modules against a model's weights; the strength `auto` resolves to
"""

from __future__ import annotations

from .. import families
from ..cogvideox_names import cogvideox_diffusers_name
from .convert import PeftAdapter, cogvideox_native_lora_key_map, to_comfy_state_dict, to_peft, wan_native_lora_key_map
from .files import LoraFileError, read_lora_file, write_safetensors
from .keys.kohya import kohya_name_to_path
from .matching import (
    LoraMismatchError,
    MatchResult,
    auto_strength,
    match_modules,
)
from .metadata import DIFFUSERS_METADATA_KEY, tdm_metadata
from .metadata import FAMILY as TDM_METADATA_FAMILY
from .metadata import PRESET as TDM_METADATA_PRESET
from .metadata import STRENGTH as TDM_METADATA_STRENGTH
from .model import LoraFile, LoraModule
from .parse import detect_family, load_lora, parse_lora
from .writing import save_peft_lora

# The family (or kind) a LoRA was made for, and which models it fits: tdm_core.families' names, under the names
# this package has always exported them by.
family_name = families.architecture
family_group = families.lora_group
families_compatible = families.lora_fits

__all__ = [
    "DIFFUSERS_METADATA_KEY", "TDM_METADATA_FAMILY", "TDM_METADATA_PRESET", "TDM_METADATA_STRENGTH",
    "LoraFile", "LoraFileError", "LoraMismatchError", "LoraModule", "MatchResult", "PeftAdapter", "auto_strength",
    "cogvideox_diffusers_name", "cogvideox_native_lora_key_map",
    "detect_family", "families_compatible", "family_group", "family_name", "kohya_name_to_path", "load_lora",
    "match_modules", "parse_lora", "read_lora_file", "save_peft_lora", "tdm_metadata", "to_comfy_state_dict",
    "to_peft", "wan_native_lora_key_map", "write_safetensors",
]
