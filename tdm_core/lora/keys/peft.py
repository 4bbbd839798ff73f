"""peft / diffusers keys: `<prefix>.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r].

The prefix is `unet.`, `transformer.`, `text_encoder(_2).`, `base_model.model.` or none (tdm_core/lora/keys/dotted.py);
alpha comes from `.alpha` keys or diffusers' header entry (tdm_core/lora/parse.py), otherwise scale 1. The released
SD3/SD3.5/CogVideoX TDM LoRAs and TDM Distill's default export use it. Fixture writer: tdm_devkit.lora_files.write_peft.
"""

from __future__ import annotations

from .base import Location, comfy_key
from .dotted import component_and_path

NAME = "peft"
SUFFIXES = (
    (".lora_A.default.weight", "down"),  # a PeftModel's state dict, adapter name "default" left in
    (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
)


def claims(root: str) -> bool:
    return False  # a dotted path of no prefix of its own: a key is peft by its suffixes


def locate(root: str, spelled: str) -> Location:
    """Also any dotted path spelt with another format's suffixes (`transformer.x.lora_down.weight`): labelled by
    those suffixes, as it always has been."""
    component, name = component_and_path(root)
    return Location(component, name, comfy_key(component, name), spelled)
