"""Pre-peft diffusers keys (2023): `<module>.lora.down.weight / .lora.up.weight` ("compatible" saves),
`...attn1.processor.to_q_lora.down.weight` (`save_attn_procs`) and `.lora_linear_layer.down/up.weight`.

These name attention projections by the processor that held them; the dotted paths are put back to module paths
(tdm_core/lora/keys/dotted.py), and `to_out` gets the `.0` of the Linear inside diffusers' `to_out` ModuleList. They
carry no alpha: scale 1. Fixture writer: tdm_devkit.lora_files.write_old_diffusers.
"""

from __future__ import annotations

from .base import Location, comfy_key
from .dotted import component_and_path

NAME = "diffusers_old"
SUFFIXES = (
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    ("_lora.down.weight", "down"),  # processor.to_q_lora: the projection's name runs into the suffix
    ("_lora.up.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
)


def claims(root: str) -> bool:
    return False  # dotted paths, told from peft's by their suffixes


def locate(root: str, spelled: str) -> Location:
    component, name = component_and_path(root)
    if name.endswith(".to_out"):
        name += ".0"
    return Location(component, name, comfy_key(component, name), NAME)
