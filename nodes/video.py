"""CogVideoX video nodes: a diffusers-folder loader (with the TDM LoRA) and a 4-step TDM video sampler.

ComfyUI 0.3.75 has no native CogVideoX, so the model runs through diffusers (tdm_core.cogvideox); the output is a
plain IMAGE batch of frames (+ fps) that core save nodes (CreateVideo → SaveVideo, SaveAnimatedWEBP) accept.
"""

from __future__ import annotations

import comfy.model_management
import comfy.utils
import folder_paths
from comfy_api.v0_0_2 import io

from tdm_core import cogvideox as video_core  # not `cogvideox`: that is the sampler's input name
from tdm_core import schedules
from tdm_core.presets import get_preset

from . import categories, inputs
from .cogvideox_teacher import COGVIDEOX_PIPE as CogVideoXPipe
from .cogvideox_teacher import cogvideox_folders, resolve_folder

_COGVIDEOX = get_preset("cogvideox")
# V3 nodes hold no state: the last loaded pipeline is kept here so re-running a graph does not reload it.
_PIPELINE_CACHE: dict = {}
NO_LORA = "none"


class TDMCogVideoXLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TDMCogVideoXLoader",
            display_name="TDM CogVideoX Loader",
            category=categories.LOADERS,
            description="Loads a CogVideoX diffusers folder (e.g. THUDM/CogVideoX-2b in models/diffusers/) with an "
                        "optional TDM LoRA for 4-step sampling. Runs through diffusers: ComfyUI 0.3.75 has no "
                        "native CogVideoX.",
            inputs=[
                io.Combo.Input("model_folder", options=cogvideox_folders(),
                               tooltip="A CogVideoX folder in models/diffusers with model_index.json, transformer/, "
                                       "vae/, text_encoder/, tokenizer/ and scheduler/."),
                io.Combo.Input("dtype", options=list(video_core.DTYPES), default="bf16",
                               tooltip="Weights dtype. bf16 is what CogVideoX-2b was trained in; fp32 on CPU."),
                io.Combo.Input("lora_name", options=[NO_LORA] + folder_paths.get_filename_list("loras"),
                               default=NO_LORA,
                               tooltip="The TDM CogVideoX LoRA from models/loras (Luo-Yihong/TDM_CogVideoX-2B_LoRA)."),
                io.Float.Input("lora_strength", default=_COGVIDEOX.lora_strength, min=-4.0, max=4.0, step=0.01,
                               tooltip="LoRA strength; the TDM CogVideoX release is used at "
                                       f"{_COGVIDEOX.lora_strength}."),
                io.Boolean.Input("vae_tiling", default=True,
                                 tooltip="Decode in tiles: much less VRAM for 720×480, slightly slower."),
                io.Boolean.Input("vae_slicing", default=True, tooltip="Decode one video of a batch at a time."),
                io.Combo.Input("offload", options=["none", "model", "sequential"], default="none",
                               tooltip="CPU offload (needs accelerate): 'model' keeps one component on the GPU at a "
                                       "time; 'sequential' fits in the least VRAM but is slowest."),
            ],
            outputs=[CogVideoXPipe.Output(display_name="cogvideox")],
        )

    USER_FILES = {"model_folder": "models/diffusers", "lora_name": "models/loras"}

    @classmethod
    def validate_inputs(cls, model_folder):  # one declared input (see nodes/inputs.py); lora_name at execute
        return inputs.validate_one(cls, "model_folder", model_folder)

    @classmethod
    def execute(cls, model_folder, dtype, lora_name, lora_strength, vae_tiling, vae_slicing, offload) -> io.NodeOutput:
        inputs.check_inputs(cls, locals())
        path = resolve_folder(model_folder)
        lora_path = None if lora_name == NO_LORA else folder_paths.get_full_path_or_raise("loras", lora_name)
        options = video_core.LoadOptions(dtype=dtype, lora_path=lora_path, lora_strength=lora_strength,
                                        vae_slicing=vae_slicing, vae_tiling=vae_tiling, offload=offload)
        key = (path, options)
        if key not in _PIPELINE_CACHE:
            _PIPELINE_CACHE.clear()  # one pipeline at a time: they are several GB
            _PIPELINE_CACHE[key] = video_core.load_pipeline(path, options, comfy.model_management.get_torch_device())
        return io.NodeOutput(_PIPELINE_CACHE[key])


class TDMCogVideoXSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TDMCogVideoXSampler",
            display_name="TDM CogVideoX Sampler",
            category=categories.SAMPLING,
            description="Samples a CogVideoX video in 4 steps with v-prediction DDIM at the TDM LoRA's trained "
                        "timesteps (999, 856, 665, 399), CFG off. Output: the frames as an IMAGE batch + fps.",
            inputs=[
                CogVideoXPipe.Input("cogvideox", tooltip="From TDM CogVideoX Loader."),
                io.String.Input("prompt", multiline=True, default="", tooltip="What the video shows."),
                io.String.Input("negative_prompt", multiline=True, default="",
                                tooltip="Only used when cfg > 1 (TDM samples at cfg 1)."),
                io.Int.Input("frames", default=49, min=1, max=1025, step=4,
                             tooltip="Frame count, 4k+1 (49 = 6 s at 8 fps, what CogVideoX-2b was trained on)."),
                io.Int.Input("width", default=720, min=16, max=2048, step=16, tooltip="Width in pixels (720)."),
                io.Int.Input("height", default=480, min=16, max=2048, step=16, tooltip="Height in pixels (480)."),
                io.Combo.Input("grid", options=["trained", "trailing", "custom"], default="trained",
                               tooltip="trained: 999/856/665/399, what the TDM LoRA was trained on (recommended). "
                                       "trailing: uniform spacing as diffusers' CogVideoX scheduler. custom: the "
                                       "timesteps below."),
                io.Int.Input("steps", default=_COGVIDEOX.steps, min=1, max=100,
                             tooltip="Steps for the trailing grid (the trained grid is 4 steps)."),
                io.String.Input("custom_timesteps", default=", ".join(map(str, schedules.COGVIDEOX_TRAINED_TIMESTEPS)),
                                tooltip="Descending integer timesteps in [0, 999], used with grid = custom."),
                io.Float.Input("cfg", default=_COGVIDEOX.cfg, min=1.0, max=20.0, step=0.1,
                               tooltip="1 = no guidance (TDM). The base model's own recipe is 50 steps at cfg 6."),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1, control_after_generate=True,
                             tooltip="Seed of the initial noise (same noise as diffusers' pipeline for a seed)."),
            ],
            outputs=[io.Image.Output(display_name="frames"),
                     io.Float.Output(display_name="fps", tooltip="CogVideoX-2b's frame rate (8).")],
        )

    @classmethod
    def validate_inputs(cls, frames):
        # One declared input (nodes/inputs.py): ComfyUI checks the others' ranges itself, execute checks them again.
        checked = inputs.validate_one(cls, "frames", frames)
        if checked is not True:
            return checked
        try:
            video_core.check_frame_count(frames)
        except video_core.CogVideoXError as error:
            return str(error)
        return True

    @classmethod
    def execute(cls, cogvideox, prompt, negative_prompt, frames, width, height, grid, steps, custom_timesteps,
                cfg, seed) -> io.NodeOutput:
        inputs.check_inputs(cls, locals())
        pipe = cogvideox
        timesteps = video_core.sampling_timesteps(grid, steps, custom_timesteps)
        progress = comfy.utils.ProgressBar(len(timesteps))

        def on_step(state):
            comfy.model_management.throw_exception_if_processing_interrupted()
            progress.update(1)

        latents = video_core.sample_latents(pipe, prompt, negative_prompt, frames, height, width, timesteps, cfg, seed, on_step)
        comfy.model_management.throw_exception_if_processing_interrupted()
        return io.NodeOutput(video_core.decode_frames(pipe, latents), float(video_core.DEFAULT_FPS))


NODES = [TDMCogVideoXLoader, TDMCogVideoXSampler]
