"""The TDM LoRA Loader node (tdm_core.lora does the reading, detection and conversion).

ComfyUI-specific work only: the MODEL's family, ComfyUI's own LoRA key map (`comfy.lora.model_lora_keys_unet`) and
weight shapes handed to `tdm_core.lora.match_modules`, and the patches built by ComfyUI's own LoRA adapter
(`comfy.lora.load_lora`), so a TDM LoRA is applied by exactly the code path every other LoRA uses.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from comfy_api.v0_0_2 import io, ui

from tdm_core import lora as tdm_lora

from . import categories, family_adapters, inputs
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


def _lora_path(lora_name: str) -> str:
    import folder_paths

    return folder_paths.get_full_path_or_raise("loras", lora_name)


def _lora_files() -> list[str]:
    import folder_paths

    return folder_paths.get_filename_list("loras")


class TDMLoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TDMLoraLoader",
            display_name="TDM LoRA Loader",
            category=categories.LOADERS,
            description=(
                "Loads a TDM (Trajectory Distribution Matching) 4-step LoRA onto a MODEL: SD3/SD3.5 (peft "
                "safetensors), Dreamshaper/SD1.5 (kohya .pt, read without running any code in the pickle), "
                "CogVideoX-2B (peft, onto newer ComfyUI's native CogVideoX), old diffusers and ComfyUI-native "
                "files. Checks the LoRA's model family, reports how many modules matched, and picks the release's "
                "strength (SD3/SD3.5: 0.125) in auto mode."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to patch (it may already carry other LoRAs)."),
                io.Combo.Input(
                    "lora_name", options=_lora_files(),
                    tooltip="A LoRA file from models/loras: .safetensors, or .pt/.pth/.ckpt (loaded weights-only).",
                ),
                io.Combo.Input(
                    "strength_mode", options=STRENGTH_MODES, default="auto",
                    tooltip=(
                        "auto: the strength recorded in a TDM-trained LoRA, else the release's preset for the LoRA's "
                        "family (SD3/SD3.5 0.125, Dreamshaper/SD1.5 and CogVideoX 1.0). manual: use 'strength'."
                    ),
                ),
                io.Float.Input(
                    "strength", default=1.0, min=-10.0, max=10.0, step=0.005,
                    tooltip="The LoRA strength used when strength_mode is manual. In auto mode this widget is greyed "
                            "out and ignored: the strength applied is shown on the node after the run.",
                ),
                io.Clip.Input(
                    "clip", optional=True,
                    tooltip="Optional: connect the CLIP if the LoRA file also carries text-encoder weights.",
                ),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the TDM LoRA applied."),
                io.Clip.Output(display_name="clip", tooltip="The CLIP with the LoRA's text-encoder weights applied (the input CLIP "
                                       "unchanged, or nothing, if the file has none or no CLIP is connected)."),
            ],
        )

    USER_FILES = {"lora_name": "models/loras"}

    @classmethod
    def validate_inputs(cls, lora_name):  # one declared input: see nodes/inputs.py
        return inputs.validate_one(cls, "lora_name", lora_name)

    @classmethod
    def fingerprint_inputs(cls, lora_name, **kwargs):
        # A file replaced under the same name must be reloaded, not served from ComfyUI's output cache. A name that
        # is not one of the listed files is never looked up on disk (execute refuses it).
        if not isinstance(lora_name, str) or lora_name not in _lora_files():
            return repr(lora_name)
        try:
            return file_key(_lora_path(lora_name))
        except (OSError, FileNotFoundError):
            return lora_name

    @classmethod
    def execute(cls, model, lora_name, strength_mode="auto", strength=1.0, clip=None) -> io.NodeOutput:
        inputs.check_inputs(cls, locals())
        lora = load_lora_cached(_lora_path(lora_name))
        application = apply_tdm_lora(model, clip, lora, None if strength_mode == "auto" else float(strength))
        return io.NodeOutput(application.model, application.clip, ui=ui.PreviewText(application.report()))


NODES: list = [TDMLoraLoader]
