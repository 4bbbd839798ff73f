"""From a state dict and its header to a `LoraFile`: keys grouped into modules through the key format units
(tdm_core/lora/keys/), factors and alphas checked, the family detected.

Everything here reads a file's content, so it is bounded: key length capped before any key is looked at, each key
handled by a fixed number of string operations, the diffusers header entry parsed with bounded depth, and its pattern
keys matched as module names, never run as the regular expressions peft would make of them.
"""

from __future__ import annotations

import collections
import math

import torch

from .. import families, validation
from . import keys
from . import metadata as tdm_header
from .files import LoraFileError
from .metadata import DIFFUSERS_METADATA_KEY, KOHYA_ALPHA_KEY
from .model import MODEL_COMPONENTS, LoraFile, LoraModule

MAX_ALPHA = 1e6  # far above any real LoRA's alpha (≤ a few thousand); a larger one only makes a broken image
MAX_KEY_LENGTH = 1024  # real module paths are under 200 characters


def parse_lora(tensors: dict[str, torch.Tensor], metadata: dict | None = None, name: str = "<state dict>") -> LoraFile:
    """Groups a LoRA state dict into modules. Raises LoraFileError if the file holds no LoRA weights at all."""
    metadata = dict(metadata or {})
    tdm_header.check_header(metadata, name)
    long_keys = [key for key in tensors if len(key) > MAX_KEY_LENGTH]
    if long_keys:
        raise LoraFileError(f"'{name}' has a tensor name of {len(long_keys[0])} characters (at most {MAX_KEY_LENGTH}: "
                            "real module paths are under 200); the file is damaged or crafted.")
    roots: dict[str, dict] = {}
    unrecognised = []
    for key, tensor in tensors.items():
        split = keys.split_key(key)
        if split is None:
            unrecognised.append(key)
            continue
        root, role, fmt = split
        entry = roots.setdefault(root, {"keys": []})
        entry["keys"].append(key)
        entry[role] = tensor
        if fmt is not None:
            entry["format"] = fmt
    modules: dict[str, LoraModule] = {}
    formats = collections.Counter()
    for root, entry in roots.items():
        if "down" not in entry or "up" not in entry:
            unrecognised.extend(entry["keys"])
            continue
        component, module_name, comfy_key, fmt = keys.locate(root, entry.get("format"))
        down, up = entry["down"], entry["up"]
        _check_factors(name, module_name, down, up)
        rank = int(down.shape[0])
        rslora = False
        if "alpha" in entry:
            if entry["alpha"].numel() != 1:
                raise LoraFileError(f"'{name}': module {module_name} has an alpha of shape "
                                    f"{tuple(entry['alpha'].shape)}, not a single number; the file is corrupt.")
            alpha = _finite_alpha(float(entry["alpha"].float().item()), name, f"the alpha of module {module_name}")
        else:
            alpha, rslora = _metadata_alpha(metadata, component, module_name, fmt, name)
        if alpha is None:
            scale = 1.0
        else:
            scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        module = LoraModule(component, module_name, down, up, alpha, scale, comfy_key, tuple(sorted(entry["keys"])))
        modules[module.id] = module
        formats[fmt] += 1
    if not modules:
        sample = ", ".join(repr(k) for k in list(tensors)[:3])
        kind = "an empty state dict" if not tensors else f"{len(tensors)} tensors such as {sample}"
        hint = ""
        if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in tensors):
            hint = " It looks like a full model checkpoint: load it with Load Checkpoint, not a LoRA loader."
        elif any(k.endswith(".weight") for k in tensors):
            hint = " It looks like model weights, not a LoRA (no lora_A/lora_B, lora_down/lora_up pairs)."
        raise LoraFileError(f"'{name}' contains no LoRA weights: found {kind}.{hint}")
    fmt = formats.most_common(1)[0][0] if len(formats) == 1 else "mixed: " + "+".join(sorted(formats))
    return LoraFile(name, fmt, detect_family(modules.values(), metadata), modules, metadata, sorted(unrecognised))


def load_lora(path) -> LoraFile:
    """Reads (safely) and parses a LoRA file; every failure is a LoraFileError naming the file."""
    from pathlib import Path

    from .files import read_lora_file

    tensors, metadata = read_lora_file(path)
    return parse_lora(tensors, metadata, name=Path(path).name)


def detect_family(modules, metadata: dict | None = None) -> str:
    """The model family a set of modules was made for, from the key layout (and a TDM header entry if present)."""
    return tdm_header.recorded_family(metadata or {}) or families.detect_lora(key_layout(modules))


def key_layout(modules) -> families.LoraKeyLayout:
    """The model modules' paths as family detection reads them (tdm_core.families.LoraKeyLayout)."""
    model_modules = [m for m in modules if m.component in MODEL_COMPONENTS]
    return families.LoraKeyLayout(
        comfy=tuple(m.name for m in model_modules if m.component == "diffusion_model"),
        diffusers=tuple(m.name for m in model_modules if m.component != "diffusion_model"),
        cross_attention_dims=frozenset(m.in_numel for m in model_modules
                                       if m.component != "diffusion_model" and m.name.endswith("attn2.to_k")))


# --------------------------------------------------------------------------------------------------------------
# Checks of the factors and alphas a file states


def _check_factors(file_name: str, module_name: str, down: torch.Tensor, up: torch.Tensor) -> None:
    if down.ndim < 2 or up.ndim < 2 or up.shape[1] != down.shape[0]:
        raise LoraFileError(
            f"'{file_name}': module {module_name} has inconsistent LoRA factors (down {tuple(down.shape)}, "
            f"up {tuple(up.shape)}); the file is corrupt."
        )
    if down.numel() == 0 or up.numel() == 0:
        raise LoraFileError(f"'{file_name}': module {module_name} has empty LoRA factors (down {tuple(down.shape)}, "
                            f"up {tuple(up.shape)}: rank or size 0); the file is corrupt: re-download it.")
    if not (down.is_floating_point() and up.is_floating_point()):
        raise LoraFileError(f"'{file_name}': module {module_name} has {down.dtype}/{up.dtype} factors, not floating "
                            "point; the file is not a LoRA.")
    bad = [role for role, tensor in (("down", down), ("up", up)) if not bool(torch.isfinite(tensor).all())]
    if bad:
        raise LoraFileError(f"'{file_name}': module {module_name} has NaN or infinite values in its {' and '.join(bad)} "
                            "factor; it would turn every image into NaN. The LoRA is broken (a diverged training "
                            "run): use an earlier snapshot or re-download it.")


def _finite_alpha(value, file_name: str, what: str) -> float:
    try:
        if isinstance(value, str):
            return validation.number_text(value, what, lo=-MAX_ALPHA, hi=MAX_ALPHA)
        return validation.number(value, what, lo=-MAX_ALPHA, hi=MAX_ALPHA)
    except validation.ValidationError as error:
        raise LoraFileError(f"'{file_name}': {error}; the file is damaged: re-download it.") from None


# --------------------------------------------------------------------------------------------------------------
# Alpha from the header, for files without alpha tensors: diffusers' LoraConfig entry, or kohya's network alpha


def _metadata_alpha(metadata: dict, component: str, name: str, fmt: str, file_name: str):
    config = _diffusers_lora_config(metadata, component, file_name)
    if config:
        for entry in ("rank_pattern", "alpha_pattern"):
            _pattern_value(config.get(entry), "", file_name, entry)  # every key checked, matched or not
        value = _pattern_value(config.get("alpha_pattern"), name, file_name)
        if value is None:
            value = config.get("lora_alpha")
        if value is not None:
            return _finite_alpha(value, file_name, f"{DIFFUSERS_METADATA_KEY} alpha of {name}"), bool(
                config.get("use_rslora", False))
    if fmt == keys.kohya.NAME and metadata.get(KOHYA_ALPHA_KEY):
        return _finite_alpha(metadata[KOHYA_ALPHA_KEY], file_name, f"header entry {KOHYA_ALPHA_KEY}"), False
    return None, False


def _diffusers_lora_config(metadata: dict, component: str, file_name: str) -> dict:
    """The LoraConfig arguments diffusers stored in the header for this component (empty if none). The entry comes
    from the file: parsed with bounded depth, and refused (naming the file) when it is not a JSON object."""
    raw = metadata.get(DIFFUSERS_METADATA_KEY)
    if not raw:
        return {}
    try:
        config = validation.json_object(validation.loads_json(raw, f"its {DIFFUSERS_METADATA_KEY} header entry"),
                                        f"its {DIFFUSERS_METADATA_KEY} header entry")
    except validation.ValidationError as error:
        raise LoraFileError(f"'{file_name}' is corrupt: {error}. Re-download the file, or remove that header "
                            "entry.") from None
    prefixed = {k[len(component) + 1 :]: v for k, v in config.items() if k.startswith(component + ".")}
    if prefixed:
        return prefixed
    if any("." in k for k in config):
        return {}
    return config


# Characters that make a pattern key a regular expression rather than a module name. peft matches pattern keys as
# regexes (`re.match(rf"(.*\.)?({key})$", module)`); a regex from a file, run against names from the same file, can
# take exponential time (`(x+)+y`). TDM never runs a file's regex: keys are module names, matched by the linear rule
# below, and a key that still holds one of these characters is an error (not ignored: ignoring it would apply the
# wrong alpha silently and give a wrong image).
_REGEX_CHARACTERS = frozenset("\\^$*+?{}[]|()")


def _pattern_name(key: str, file_name: str, entry: str) -> tuple[str, bool]:
    """(module name, exact-only) of a pattern key. The spellings writers use for a literal name are accepted: a
    leading `^` (peft then only matches the whole name), a trailing `$`, and `\\.` for a dot (`re.escape` output)."""
    exact = key.startswith("^")
    name = key[1:] if exact else key
    if name.endswith("$") and not name.endswith("\\$"):
        name = name[:-1]
    name = name.replace("\\.", ".").replace("\\_", "_").replace("\\-", "-")
    if not name or any(char in _REGEX_CHARACTERS for char in name):
        raise LoraFileError(
            f"'{file_name}': its {DIFFUSERS_METADATA_KEY} {entry} key {key[:120]!r} is a regular expression. TDM "
            "reads pattern keys as module names only (a regular expression from a file can take hours to match); "
            "re-save the LoRA with module names as keys (peft does when it saves).")
    return name, exact


def _pattern_value(patterns, name: str, file_name: str = "<state dict>", entry: str = "alpha_pattern"):
    """peft's rule (`peft.utils.other.get_pattern_key`, 0.21) for literal keys, in linear time: the first key that
    equals the module path, or that the path ends with after a '.', wins (a `^`-anchored key: the whole path only).
    For every key that is a module name this is exactly what peft's regex match gives."""
    if not patterns:
        return None
    if not isinstance(patterns, dict):
        raise LoraFileError(f"'{file_name}': its {DIFFUSERS_METADATA_KEY} {entry} must be a JSON object of module "
                            "names to numbers; re-save the LoRA.")
    for key, value in patterns.items():
        module, exact = _pattern_name(key, file_name, entry)
        if name == module or (not exact and name.endswith("." + module)):
            return value
    return None
