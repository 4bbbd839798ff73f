"""A headless teacher from a diffusers model folder: `teacher = {"factory": "tdm_core.distill.diffusers_folder:
make_backend", "folder": "models/diffusers/CogVideoX-2b"}` in a run.toml.

The folder is loaded with diffusers as its own pipeline loads it (`model_index.json` names the pipeline class), the
prompts are encoded once with the folder's own text encoder (the pipeline's `encode_prompt`: what sampling it later
feeds the network), the text encoder is then dropped, and the denoiser becomes a `PeftBackend`
(`tdm_core.distill.backend.diffusers_backend`) on the folder's own noise schedule (`scheduler/`). The student LoRA
is written in the format the pack's loaders and diffusers read (peft `transformer.*` keys for CogVideoX).

Supported today: CogVideoX-2B text-to-video (`CogVideoXPipeline`, v-prediction, its scheduler's SNR-shifted,
zero-terminal ᾱ). Other pipelines are refused with the list; image families distil from ComfyUI files with TDM
Distill. Errors name the config field and come before anything heavy is loaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import families, validation
from .backend import COMPUTE_DTYPES, diffusers_backend
from .config import ConfigError
from .schedule import DiscreteSchedule

# model_index.json's `_class_name` → the family it distils
PIPELINES = {"CogVideoXPipeline": families.COGVIDEOX.name}


def pipeline_family(folder: Path) -> str:
    """The family of a diffusers folder, from its model_index.json (untrusted: read bounded, checked)."""
    index = folder / "model_index.json"
    if not index.is_file():
        raise ConfigError(f"teacher.folder {str(folder)!r} is not a diffusers model folder (no model_index.json)")
    try:
        data = validation.json_object(validation.loads_json(index.read_bytes(), "model_index.json",
                                                            max_bytes=1 << 20), "model_index.json")
    except (OSError, validation.ValidationError) as error:
        raise ConfigError(f"teacher.folder: {error}") from None
    name = data.get("_class_name")
    if name not in PIPELINES:
        raise ConfigError(f"teacher.folder holds a {str(name)[:80]!r} pipeline; a diffusers-folder teacher can be "
                          f"{', '.join(PIPELINES)} (image families: distil from ComfyUI files with TDM Distill)")
    return PIPELINES[name]


def make_backend(config=None, folder: str = "", dtype: str = "float32", device: str | None = None,
                 frames: int | None = None, height: int | None = None, width: int | None = None):
    """The teacher of the folder as a PeftBackend; `frames`/`height`/`width` set the training video's size (pixels
    and frames as the pipeline counts them; default: the transformer's own sample size)."""
    if not folder:
        raise ConfigError('teacher.folder must name a diffusers model folder, e.g. "models/diffusers/CogVideoX-2b"')
    if dtype not in COMPUTE_DTYPES:  # the names DistillConfig.dtype uses
        raise ConfigError(f"teacher.dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {dtype!r}")
    path = Path(folder).expanduser()
    family = pipeline_family(path)
    target = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if family == families.COGVIDEOX.name:
        return _cogvideox(config, path, COMPUTE_DTYPES[dtype], target, frames, height, width)
    raise ConfigError(f"no diffusers-folder teacher for {family}")  # PIPELINES and this dispatch go together


def _cogvideox(config, path: Path, dtype: torch.dtype, device: torch.device, frames, height, width):
    from diffusers import CogVideoXPipeline

    from ..cogvideox import check_frame_count

    pipe = CogVideoXPipeline.from_pretrained(path, torch_dtype=dtype)
    transformer = pipe.transformer
    if getattr(transformer.config, "patch_size_t", None) or transformer.config.use_rotary_positional_embeddings:
        raise ConfigError("teacher.folder is a CogVideoX 1.5 / 5B (rotary positions or temporal patches); the "
                          "diffusers-folder teacher takes CogVideoX-2B")
    if pipe.transformer.config.in_channels != 16:
        raise ConfigError("teacher.folder is an image-to-video CogVideoX; the teacher takes text-to-video CogVideoX-2B")
    spatial = pipe.vae_scale_factor_spatial
    latent_frames = (check_frame_count(frames) if frames else
                     (transformer.config.sample_frames - 1) // transformer.config.temporal_compression_ratio + 1)
    latent_h = height // spatial if height else transformer.config.sample_height
    latent_w = width // spatial if width else transformer.config.sample_width
    prompts = list(dict.fromkeys([*(config.prompts if config is not None else []), ""]))
    encoded = {}
    with torch.no_grad():
        for prompt in prompts:  # once each, on the folder's own text encoder; the job never needs it again
            embedding, _ = pipe.encode_prompt(prompt=prompt, do_classifier_free_guidance=False,
                                              num_videos_per_prompt=1, device=torch.device("cpu"), dtype=dtype)
            encoded[prompt] = embedding[0]
    schedule = DiscreteSchedule.from_diffusers_scheduler(pipe.scheduler)
    del pipe  # the text encoder and VAE go; the transformer stays as the teacher
    transformer.to(device)

    def encode(batch: list[str]) -> dict:
        missing = [p for p in batch if p not in encoded]
        if missing:
            raise KeyError(f"prompt {missing[0]!r} was not encoded when the teacher was built")
        return {"encoder_hidden_states": torch.stack([encoded[p] for p in batch]).to(device)}

    settings = {} if config is None else {"lora_rank": config.lora_rank, "lora_alpha": config.lora_alpha,
                                          "mode": config.mode, "adapter_seed": config.seed}
    if config is not None and config.lora_target_modules:
        settings["target_modules"] = list(config.lora_target_modules)
    return diffusers_backend(transformer, schedule=schedule, encode=encode, parametrisation="v",
                             latent_shape=(latent_frames, transformer.config.in_channels, latent_h, latent_w),
                             **settings)
