"""CogVideoX-2B as a TDM Distill teacher through the pack's own diffusers pipeline (TDM CogVideoX Loader).

ComfyUI 0.3.75 has no native CogVideoX, so on it the only CogVideoX in a graph is the loader's `CogVideoXPipeline`
(`TDM_COGVIDEOX`). TDM Distill takes it on its `cogvideox` input instead of a MODEL and CLIP; the job then trains
what a headless diffusers-folder run trains (tdm_core.distill.diffusers_folder: the same prompt encoding, latent
layout [frames, C, H/8, W/8], v-prediction on the folder's own SNR-shifted, zero-terminal schedule, peft
`transformer.*` LoRA), on the pipeline's own loaded weights:

- **Shared, not copied.** The job's network is a module tree of its own whose weights are the pipeline's tensors
  (`shared_weights_copy`): the adapters it trains never reach the pipeline, which goes on sampling unchanged.
- **The base model only.** A pipeline with a LoRA attached (the loader's `lora_name`) is refused: its transformer's
  layers are peft's, and a teacher with a student LoRA inside would distil the student. Sequential offload is
  refused (its weights live in offload hooks, not in the modules); model offload is fine: the job trains its own
  device copy and the pipeline's components go back to the CPU after the prompts are encoded.
- **Its folder**: `cogvideox_folders` / `resolve_folder` are the loader's rule for which models/diffusers folders it
  loads, which the headless export (nodes/headless_export.py) applies again to a job's recorded folder.
- **Previews** decode with a private, tiled copy of the pipeline's VAE on the training device: the job thread never
  touches the pipeline the prompt executor samples with (the CogVideoX VAE keeps a cache between its causal
  convolutions).
"""

from __future__ import annotations

import copy
import os

import folder_paths
import torch
from comfy_api.v0_0_2 import io

from tdm_core import cogvideox as video_core  # not `cogvideox`: TDM Distill's input of that name
from tdm_core import families, validation
from tdm_core.distill import ConfigError, DiscreteSchedule
from tdm_core.distill.backend import shared_weights_copy
from tdm_core.distill.diffusers_folder import (
    check_cogvideox_2b,
    cogvideox_backend,
    cogvideox_latent_shape,
    encode_cogvideox_prompts,
)
from tdm_core.distill.grids import choose_grid

from . import comfy_backend

#: The socket type of TDM CogVideoX Loader's pipeline (one definition for the loader, the sampler and TDM Distill).
COGVIDEOX_PIPE = io.Custom("TDM_COGVIDEOX")
FAMILY = families.COGVIDEOX.name
#: TDM Distill's input for the pipeline, named after the family it takes (saved in workflows: never rename it).
PIPE_INPUT = FAMILY
WHAT = "the CogVideoX pipeline on TDM Distill's cogvideox input"


def cogvideox_folders() -> list[str]:
    """Folders under models/diffusers (one or two levels down) that hold a CogVideoX diffusers model."""
    found = []
    for root in folder_paths.get_folder_paths("diffusers"):
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, _ in os.walk(root, followlinks=True):
            depth = os.path.relpath(dirpath, root).count(os.sep)
            if dirpath != root and video_core.is_cogvideox_folder(dirpath):
                found.append(os.path.relpath(dirpath, root))
                dirnames[:] = []
            elif depth >= 1:
                dirnames[:] = []
    return sorted(found)


def resolve_folder(name: str) -> str:
    """The listed CogVideoX folder `name`, under the models/diffusers root that holds it. Only a listed name is
    accepted (ComfyUI does not check V3 combo values): `../../input/x` would load and run a model a client
    uploaded. The list is what the user put in models/diffusers, links they placed included."""
    try:
        validation.lexical_relative(name, "TDM CogVideoX Loader: model_folder")
        validation.one_of(name, cogvideox_folders(), "TDM CogVideoX Loader: model_folder")
    except validation.ValidationError as error:
        raise video_core.CogVideoXError(f"{error}. Put CogVideoX diffusers folders in models/diffusers.") from None
    for root in folder_paths.get_folder_paths("diffusers"):
        candidate = os.path.normpath(os.path.join(root, name))
        inside = os.path.commonpath([os.path.normpath(root), candidate]) == os.path.normpath(root)
        if inside and os.path.isdir(candidate):
            return candidate
    raise video_core.CogVideoXError(f"no folder '{name}' under models/diffusers")


def check_teacher_inputs(model, clip, vae, pipe) -> None:
    """TDM Distill has one teacher: the MODEL and CLIP of ComfyUI's loaders, or this pipeline; raises ValueError."""
    if pipe is not None:
        connected = [name for name, value in (("model", model), ("clip", clip), ("vae", vae)) if value is not None]
        if connected:
            raise ValueError(
                f"TDM Distill has a teacher on cogvideox and on {', '.join(connected)}: connect either model and clip "
                "(and optionally vae) or cogvideox (its pipeline encodes the prompts and decodes the previews)")
        return
    missing = [name for name, value in (("model", model), ("clip", clip)) if value is None]
    if missing:
        raise ValueError(
            f"TDM Distill has no teacher: connect {' and '.join(missing)} (the teacher's MODEL and CLIP from ComfyUI's "
            "loaders), or a TDM CogVideoX Loader to cogvideox")


def check_teacher(pipe) -> None:
    """Refuses what cannot be a teacher, with what to do instead; raises ValueError."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is None or not type(pipe).__name__.startswith("CogVideoX"):
        raise ValueError(f"TDM Distill's cogvideox input takes TDM CogVideoX Loader's output, got "
                         f"{type(pipe).__name__}")
    try:
        check_cogvideox_2b(transformer, WHAT)
    except ConfigError as error:
        raise ValueError(str(error)) from None
    problem = video_core.sharing_problem(pipe)
    if problem:
        raise ValueError(f"the CogVideoX pipeline on TDM Distill's cogvideox input {problem}: a teacher is the base "
                         "model, shared as loaded. Feed TDM Distill from a TDM CogVideoX Loader with lora_name 'none' "
                         "and offload 'none' or 'model'.")


def training_grid(pipe, options: dict, steps: int):
    """(latent shape [latent frames, C, h, w], training grid) for TDM Distill's width, height, frames and grid."""
    width, height = int(options["width"]), int(options["height"])
    frames = options.get("frames")
    try:
        video_core.check_size(pipe, height, width)  # the sampler's rule: the VAE's 8 px times the 2-token patch
        latent_shape = cogvideox_latent_shape(pipe, int(frames) if frames is not None else None, height, width)
    except ValueError as error:
        raise ValueError(f"TDM Distill: {error}") from None
    schedule = DiscreteSchedule.from_diffusers_scheduler(pipe.scheduler)
    grid = choose_grid(schedule, FAMILY, "v", options["grid"], steps, latent_shape=latent_shape,
                       teacher="CogVideoX pipeline")
    return latent_shape, grid


def teacher_fingerprint(pipe) -> dict:
    return comfy_backend.teacher_fingerprint(pipe.transformer, FAMILY, "v", pipe.transformer.config.in_channels)


def build_backend(pipe, config, options: dict, device: torch.device, latent_shape: tuple[int, ...], grid):
    """The job's network on the pipeline's weights (`training_grid`'s latent and grid), both adapters in it, the
    prompts encoded."""
    encoded = encode_cogvideox_prompts(pipe, config.prompts)
    if hasattr(pipe, "maybe_free_model_hooks"):
        pipe.maybe_free_model_hooks()  # model offload: the T5 goes back to the CPU now, not at the next sampling
    dtype = comfy_backend.DTYPES[options["dtype"]]
    network = shared_weights_copy(pipe.transformer, device, dtype)
    video_core.drop_offload_hooks(network)
    if options["gradient_checkpointing"]:
        network.enable_gradient_checkpointing()
    # Nodes run under torch.inference_mode(); adapters created there could never be trained.
    with torch.inference_mode(False):
        backend = cogvideox_backend(config, network, grid.schedule, encoded, latent_shape)
    backend.to(device)
    return backend


def preview_decoder(pipe, device: torch.device):
    """x0 [B, latent frames, C, h, w] → uint8 preview grid (comfy_backend.preview_grid): each clip decoded whole by a
    private tiled copy of the pipeline's VAE, PREVIEW_FRAMES of its frames shown first to last."""
    device = torch.device(device)
    dtype = torch.float32 if device.type == "cpu" else pipe.vae.dtype
    vae = copy.deepcopy(pipe.vae).to(device=device).eval()
    if vae.dtype != dtype:  # float32 on the CPU, which has no fast half-precision convolutions
        vae.to(dtype=dtype)
    video_core.drop_offload_hooks(vae)
    vae.enable_tiling()
    scaling = float(vae.config.scaling_factor)

    def decode(x0: torch.Tensor):
        samples = []
        with torch.no_grad():
            for latent in x0.detach():  # [F', C, h, w] → the VAE's [1, C, F', h, w]
                latents = (latent[None].permute(0, 2, 1, 3, 4) / scaling).to(device, dtype)
                frames = vae.decode(latents).sample.float()[0]  # [3, frames, H, W] in [-1, 1]
                frames = frames[:, comfy_backend.preview_frame_indices(frames.shape[1])]
                samples.append(((frames + 1.0) / 2.0).movedim(0, -1).cpu())  # [F, H, W, 3]
        return comfy_backend.preview_grid(torch.stack(samples))

    return decode
