"""What every key format unit provides, and the ComfyUI key a located module is known by.

A key format is two things: the suffixes that spell a key's role (`down`, `up`) and the prefixes that name the module
it patches. Each unit in this package says both for one format; `keys/__init__.py` registers them. Only string
methods (`endswith`, `startswith`, `split`) touch key text: keys come from files, so their handling stays linear in
the key's length, with no regular expression built from or run on them.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

ALPHA_SUFFIX = ".alpha"  # every format that stores alpha as a tensor spells it this way


class Location(NamedTuple):
    """Where a key root (a key without its suffix) lands: the module it patches and the format it reveals."""

    component: str  # "unet", "transformer", "diffusion_model", "text_encoder(_2)"
    name: str  # dotted module path inside the component
    comfy_key: str  # the LoRA key ComfyUI's key map knows the module by
    format: str  # the LoraFile.format label


class KeyFormat(Protocol):
    """One key format (a module in this package)."""

    NAME: str  # its LoraFile.format label
    SUFFIXES: tuple[tuple[str, str], ...]  # (suffix, "down" | "up"); () for a format spelt with another's suffixes

    def claims(self, root: str) -> bool:
        """Whether this format's prefixes name the module, whatever suffixes the key is spelt with."""

    def locate(self, root: str, spelled: str) -> Location:
        """The module `root` names; `spelled`: the NAME of the format whose suffixes the key used."""


def comfy_key(component: str, name: str) -> str:
    """The LoRA key ComfyUI's key map knows a module by. ComfyUI maps kohya `lora_unet_*` names but not plain
    diffusers UNet paths, so UNet modules always get their kohya name; SD3/CogVideoX `transformer.*` peft names and
    native `diffusion_model.*` names are mapped as they are."""
    if component == "unet":
        return "lora_unet_" + name.replace(".", "_")
    if component == "diffusion_model":
        return "diffusion_model." + name
    if component == "transformer":
        return "transformer." + name
    return f"{component}.{name}"
