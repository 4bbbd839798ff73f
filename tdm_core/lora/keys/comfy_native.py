"""ComfyUI-native keys: `diffusion_model.<ComfyUI module path>.lora_down/lora_up(.weight)/.alpha` (or lora_A/B),
and SGM/MMDiT paths of no prefix (`input_blocks.*`, `joint_blocks.*`).

They are ComfyUI's own names, so they are mapped as they are; the format has no suffixes of its own (it is spelt
with kohya's or peft's) and is recognised by its prefix, whatever the suffixes. TDM Distill's `comfyui` export and
ComfyUI's own LoRA saves write it. Fixture writer: tdm_devkit.lora_files.write_comfy_native.
"""

from __future__ import annotations

from .base import Location, comfy_key
from .dotted import component_and_path

NAME = "comfy"
SUFFIXES = ()


def claims(root: str) -> bool:
    return component_and_path(root)[0] == "diffusion_model"


def locate(root: str, spelled: str) -> Location:
    component, name = component_and_path(root)
    return Location(component, name, comfy_key(component, name), NAME)
