"""The TDM LoRA Loader node: a LoRA file from models/loras applied by nodes/lora_patching.py, which uses exactly
the code path every other LoRA in ComfyUI takes (tdm_core.lora does the reading, detection and conversion)."""

from __future__ import annotations

from comfy_api.v0_0_2 import io, ui

from . import categories, inputs
from .lora_patching import STRENGTH_MODES, apply_tdm_lora, file_key, load_lora_cached


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
