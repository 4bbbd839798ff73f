"""Applying a TDM LoRA to a MODEL (and CLIP) the way ComfyUI applies every LoRA, for TDM LoRA Loader and TDM LoRA
from Distill Job: tdm_core.lora reads, detects and converts the file; this matches it against ComfyUI's own key map
(`comfy.lora.model_lora_keys_unet`) and weight shapes, builds the patches with ComfyUI's own LoRA adapter
(`comfy.lora.load_lora`), and carries a distilled student's record to the samplers.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from tdm_core import lora as tdm_lora

from . import family_adapters
from .family_adapters import model_family
from .student_record import STUDENT_GRID_OPTION, STUDENT_SOLVER_OPTION

LOG = logging.getLogger("comfyui-tdm")

STRENGTH_MODES = ["auto", "manual"]

# V3 nodes hold no state: the last file read is cached here, keyed by its path, size and modification time.
_last_lora: dict = {"key": None, "lora": None}


def file_key(path: str) -> tuple:
    stat = os.stat(path)
    return (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)


def load_lora_cached(path: str) -> tdm_lora.LoraFile:
    key = file_key(path) if os.path.isfile(path) else None
    if key is not None and _last_lora["key"] == key:
        return _last_lora["lora"]
    lora = tdm_lora.load_lora(path)
    _last_lora.update(key=key, lora=lora)
    return lora


def _shape_lookup(state_dict):
    def weight_shape(target):
        key, piece = (target, None) if isinstance(target, str) else (target[0], target[1])
        tensor = state_dict.get(key)
        if tensor is None:
            return None
        shape = list(tensor.shape)
        if piece is not None:
            dim, _start, length = piece
            shape[dim] = length
        return tuple(shape)

    return weight_shape


@dataclass
class LoraApplication:
    model: object
    clip: object
    match: tdm_lora.MatchResult
    strength: float
    strength_source: str

    def report(self) -> str:
        auto = "" if self.strength_source == "manual" else "; strength_mode auto, the strength widget is not used"
        lines = [f"applied strength {self.strength:g} ({self.strength_source}){auto}", self.match.status_line(),
                 self.match.lora.summary()]
        warning = self.match.warning()
        if warning:
            lines.append("WARNING: " + warning)
        return "\n".join(lines)


def _patches(modules_and_targets):
    import comfy.lora

    modules = [module for module, _ in modules_and_targets]
    to_load = {module.comfy_key: target for module, target in modules_and_targets}
    return comfy.lora.load_lora(tdm_lora.to_comfy_state_dict(modules), to_load, log_missing=False)


def apply_tdm_lora(model, clip, lora: tdm_lora.LoraFile, strength: float | None = None) -> LoraApplication:
    """Patches clones of MODEL (and CLIP) with the LoRA; strength None means "auto". Raises LoraMismatchError
    before anything is cloned or patched when the LoRA does not fit."""
    import comfy.lora

    family = model_family(model)
    targets = comfy.lora.model_lora_keys_unet(model.model, {})
    if family in family_adapters.ADAPTERS:
        targets.update(family_adapters.adapter(family).lora_key_aliases(model))
    te_targets = te_shape = None
    if clip is not None and lora.text_encoder_modules:
        te_targets = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
        te_shape = _shape_lookup(clip.cond_stage_model.state_dict())
    match = tdm_lora.match_modules(lora, targets, _shape_lookup(model.model_state_dict()), family,
                                   te_targets, te_shape)
    if strength is None:
        strength, source = tdm_lora.auto_strength(lora, family)
    else:
        source = "manual"
    model_patches = _patches(match.matched.values())
    new_model = model.clone()
    if lora.recorded_solver:  # a TDM-distilled student: `auto` in the TDM samplers follows what the file records
        new_model.model_options[STUDENT_SOLVER_OPTION] = lora.recorded_solver
    recorded_grid = lora.recorded_grid
    if recorded_grid is not None:
        new_model.model_options[STUDENT_GRID_OPTION] = recorded_grid
    applied = new_model.add_patches(model_patches, strength)
    if len(applied) != len(model_patches):  # cannot happen after shape matching; never fail silently if it does
        raise RuntimeError(f"TDM LoRA '{lora.name}': ComfyUI applied {len(applied)} of {len(model_patches)} patches")
    new_clip = clip
    if clip is not None and match.text_encoder_matched:
        new_clip = clip.clone()
        new_clip.add_patches(_patches(match.text_encoder_matched.values()), strength)
    warning = match.warning()
    if warning:
        LOG.warning(warning)
    return LoraApplication(new_model, new_clip, match, strength, source)
