"""LoRA key formats, one unit per format, and the registry `parse_lora` goes through.

Each unit (a module here) gives its NAME, its SUFFIXES (how a key spells `down`/`up`) and how its keys name a module
(`claims`, `locate`); see base.KeyFormat. Adding a format is one unit added to FORMATS, plus a writer for it in
tdm_devkit/lora_files.py, so the tests read a file laid out as the real ones are rather than one this package wrote.

Suffixes are matched longest first and no suffix ends with another (tests/test_lora_reading.py checks it), so the
order of FORMATS only decides which format's prefixes claim a key root first.
"""

from __future__ import annotations

from . import comfy_native, diffusers_old, kohya, peft
from .base import ALPHA_SUFFIX, KeyFormat, Location, comfy_key

# Prefix claims are tried in this order (kohya's `lora_*` names before dotted ComfyUI-native paths); a root no unit
# claims is a dotted diffusers path, located by the format its suffixes spell.
FORMATS: tuple[KeyFormat, ...] = (kohya, comfy_native, diffusers_old, peft)
BY_NAME = {unit.NAME: unit for unit in FORMATS}

# (suffix, role, format name or None), longest first; alpha tensors are shared by every format that has them
SUFFIXES = tuple(sorted(((suffix, role, unit.NAME) for unit in FORMATS for suffix, role in unit.SUFFIXES),
                        key=lambda entry: -len(entry[0]))) + ((ALPHA_SUFFIX, "alpha", None),)


def split_key(key: str) -> tuple[str, str, str | None] | None:
    """(root, role, format name) of a key, None for a key of no LoRA format (a bounded number of `endswith`s)."""
    for suffix, role, name in SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role, name
    return None


def locate(root: str, spelled: str | None) -> Location:
    """The module a key root names. `spelled`: the format whose suffixes its down/up keys used."""
    for unit in FORMATS:
        if unit.claims(root):
            return unit.locate(root, spelled or unit.NAME)
    # diffusers_old fixes up processor-era names; any other suffixes on a dotted path are located as peft's are
    unit = diffusers_old if spelled == diffusers_old.NAME else peft
    return unit.locate(root, spelled or peft.NAME)


__all__ = ["ALPHA_SUFFIX", "BY_NAME", "FORMATS", "SUFFIXES", "KeyFormat", "Location", "comfy_key", "locate",
           "split_key"]
