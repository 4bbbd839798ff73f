"""A headless teacher from a diffusers model folder: `teacher = {"factory": "tdm_core.distill.diffusers_folder:
make_backend", "folder": "models/diffusers/CogVideoX-2b"}` in a run.toml.

The folder is loaded with diffusers as its own pipeline loads it (`model_index.json` names the pipeline class), the
prompts are encoded once with the folder's own text encoder (the pipeline's `encode_prompt`: what sampling it later
feeds the network), the text encoder is then dropped, and the denoiser becomes a `PeftBackend`
(`tdm_core.distill.backend.diffusers_backend`) on the folder's own noise schedule (`scheduler/`). The student LoRA
is written in the format the pack's loaders and diffusers read (peft `transformer.*` keys for CogVideoX).

Supported: CogVideoX-2B text-to-video (`CogVideoXPipeline`, v-prediction, its scheduler's SNR-shifted, zero-terminal
ᾱ), SD1.5 (`StableDiffusionPipeline`, ε), SDXL (`StableDiffusionXLPipeline`, ε; the UNet's size and crop conditioning
as the pipeline builds it), SD3/SD3.5-medium (`StableDiffusion3Pipeline`, flow; the T5 encoder optional, as in the
pipeline), Flux-dev (`FluxPipeline`: packed 2×2 latent tokens, guidance 3.5 as an input, its size-dependent σ) and
Wan 2.1 text-to-video (`WanPipeline`, on the wan21 preset's shift-8 table, as TDM Distill trains a Wan MODEL). Image families train on their sampling preset's grid (tdm_core/distill/grids.py), which fills the run's
`timesteps` and `sampler_preset`; the run's `family` must name the folder's (it chose `recipe = "auto"`'s recipe
before anything loaded). Other pipelines are refused with the list. Errors name the config field and come before
anything heavy is loaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import families, schedules, validation
from .backend import COMPUTE_DTYPES, diffusers_backend
from .config import ConfigError
from .schedule import DiscreteSchedule

# model_index.json's `_class_name` → the family it distils (SD3 and SD3.5 share a pipeline: the transformer decides)
PIPELINES = {"CogVideoXPipeline": families.COGVIDEOX.name, "StableDiffusionPipeline": families.SD15.name,
             "StableDiffusionXLPipeline": families.SDXL.name, "StableDiffusion3Pipeline": families.SD3.name,
             "WanPipeline": families.WAN21.name, "FluxPipeline": families.FLUX.name}


def pipeline_index(folder: Path) -> dict:
    """A diffusers folder's model_index.json (untrusted: read bounded, checked as a JSON object)."""
    index = folder / "model_index.json"
    if not index.is_file():
        raise ConfigError(f"teacher.folder {str(folder)!r} is not a diffusers model folder (no model_index.json)")
    try:
        return validation.json_object(validation.loads_json(index.read_bytes(), "model_index.json",
                                                            max_bytes=1 << 20), "model_index.json")
    except (OSError, validation.ValidationError) as error:
        raise ConfigError(f"teacher.folder: {error}") from None


def pipeline_family(folder: Path) -> str:
    """The family of a diffusers folder, from its model_index.json's pipeline class."""
    data = pipeline_index(folder)
    name = data.get("_class_name")
    if name not in PIPELINES:
        raise ConfigError(f"teacher.folder holds a {str(name)[:80]!r} pipeline; a diffusers-folder teacher can be "
                          f"{', '.join(PIPELINES)} (other families: distil from ComfyUI files, tdm_comfy.teacher)")
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
    if config is None:
        raise ConfigError("an image-family diffusers-folder teacher needs the run's config")
    for field, value in (("teacher.height", height), ("teacher.width", width)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 16 or value % 16):
            raise ConfigError(f"{field} must be a multiple of 16 pixels, got {value!r}")
    if family == families.WAN21.name:
        return _wan(config, path, COMPUTE_DTYPES[dtype], target, frames, height, width)
    if family == families.FLUX.name:
        return _flux(config, path, COMPUTE_DTYPES[dtype], target, height, width)
    return _image(config, path, family, COMPUTE_DTYPES[dtype], target, height, width)


def _cogvideox(config, path: Path, dtype: torch.dtype, device: torch.device, frames, height, width):
    from diffusers import CogVideoXPipeline

    pipe = CogVideoXPipeline.from_pretrained(path, torch_dtype=dtype)
    check_cogvideox_2b(pipe.transformer, "teacher.folder")
    latent = cogvideox_latent_shape(pipe, frames, height, width)
    encoded = encode_cogvideox_prompts(pipe, config.prompts if config is not None else [])
    schedule = DiscreteSchedule.from_diffusers_scheduler(pipe.scheduler)
    transformer = pipe.transformer
    del pipe  # the text encoder and VAE go; the transformer stays as the teacher
    transformer.to(device)
    return cogvideox_backend(config, transformer, schedule, encoded, latent, device)


def check_cogvideox_2b(transformer, what: str) -> None:
    """Refuses a CogVideoX that is not the 2B text-to-video model (the one the TDM recipe and its grid are for);
    `what` names where it came from in the error."""
    if getattr(transformer.config, "patch_size_t", None) or transformer.config.use_rotary_positional_embeddings:
        raise ConfigError(f"{what} is a CogVideoX 1.5 / 5B (rotary positions or temporal patches); the teacher takes "
                          "CogVideoX-2B")
    if transformer.config.in_channels != 16:
        raise ConfigError(f"{what} is an image-to-video CogVideoX; the teacher takes text-to-video CogVideoX-2B")


def cogvideox_latent_shape(pipe, frames: int | None, height: int | None, width: int | None) -> tuple[int, ...]:
    """The training latent of a CogVideoX pipeline, [latent frames, C, H/8, W/8] as its transformer reads it (default:
    the transformer's own sample size)."""
    from ..cogvideox import check_frame_count

    config = pipe.transformer.config
    spatial = pipe.vae_scale_factor_spatial
    latent_frames = (check_frame_count(frames) if frames else
                     (config.sample_frames - 1) // config.temporal_compression_ratio + 1)
    return (latent_frames, config.in_channels, height // spatial if height else config.sample_height,
            width // spatial if width else config.sample_width)


def encode_cogvideox_prompts(pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Each prompt and the empty one, encoded once by the pipeline's own T5 as its sampling feeds the transformer
    ({prompt: [tokens, width]} on the CPU, in the transformer's dtype); the job never needs the encoder again."""
    encoded = {}
    with torch.no_grad():
        for prompt in dict.fromkeys([*prompts, ""]):
            embedding, _ = pipe.encode_prompt(prompt=prompt, do_classifier_free_guidance=False,
                                              num_videos_per_prompt=1, device=pipe._execution_device,
                                              dtype=pipe.transformer.dtype)
            encoded[prompt] = embedding[0].cpu()
    return encoded


def cogvideox_backend(config, transformer, schedule: DiscreteSchedule, encoded: dict[str, torch.Tensor],
                      latent_shape: tuple[int, ...], device: torch.device | None = None):
    """A CogVideoX transformer as the run's teacher (v-prediction on `schedule`), prompts from `encoded`: on `device`,
    or left on the CPU for `PeftBackend.to` to place with the network."""
    def encode(batch: list[str]) -> dict:
        missing = [p for p in batch if p not in encoded]
        if missing:
            raise KeyError(f"prompt {missing[0]!r} was not encoded when the teacher was built")
        states = torch.stack([encoded[p] for p in batch])
        return {"encoder_hidden_states": states if device is None else states.to(device)}

    settings = {} if config is None else {"lora_rank": config.lora_rank, "lora_alpha": config.lora_alpha,
                                          "mode": config.mode, "adapter_seed": config.seed}
    if config is not None and config.lora_target_modules:
        settings["target_modules"] = list(config.lora_target_modules)
    return diffusers_backend(transformer, schedule=schedule, encode=encode, parametrisation="v",
                             latent_shape=latent_shape, **settings)


# ---------------------------------------------------------------------------------------------------------------
# What every family's folder teacher shares


def _load(pipeline_class, path: Path, dtype: torch.dtype, index: dict | None = None):
    """The folder's pipeline. Components it leaves out (model_index.json: [null, null]; SD3's T5, a safety checker,
    Wan 2.1's second expert) are passed as None, which the pipelines accept and from_pretrained would refuse."""
    index = pipeline_index(path) if index is None else index
    absent = {k: None for k, v in index.items() if isinstance(v, list) and v == [None, None]}
    return pipeline_class.from_pretrained(path, torch_dtype=dtype, **absent)


def _check_family(config, family: str) -> None:
    if config.family != family:
        raise ConfigError(f"family = {config.family!r}, but teacher.folder holds a {family} pipeline: set family = "
                          f"\"{family}\" (recipe \"auto\" and the LoRA's header are the family's)")


def _encode_prompts(config, pipe, encode_one) -> dict[str, dict]:
    """Each training prompt and the empty one, encoded once by the folder's own text encoders (`encode_one(pipe,
    prompt)`; the job never needs them again): {prompt: {network input: tensor without the batch axis}}."""
    with torch.no_grad():
        return {prompt: encode_one(pipe, prompt) for prompt in dict.fromkeys([*config.prompts, ""])}


def _teacher(config, network, grid, encoded: dict[str, dict], device: torch.device, latent: tuple[int, ...],
             **backend_settings):
    """The denoiser as the run's teacher on `grid` (the run's timesteps and sampler preset filled in from it, or
    refused when they differ); call once the pipeline's other components are dropped."""
    if config.timesteps is None:
        config.timesteps = list(grid.timesteps)
    elif list(config.timesteps) != list(grid.timesteps):
        raise ConfigError(f"timesteps {list(config.timesteps)} are not the {grid.preset} preset's training grid "
                          f"({list(grid.timesteps)}); leave timesteps out")
    config.sampler_preset = config.sampler_preset or grid.preset
    network.to(device)

    def encode(batch: list[str]) -> dict:
        missing = [p for p in batch if p not in encoded]
        if missing:
            raise KeyError(f"prompt {missing[0]!r} was not encoded when the teacher was built")
        return {key: torch.stack([encoded[p][key] for p in batch]).to(device) for key in encoded[batch[0]]}

    settings = {"lora_rank": config.lora_rank, "lora_alpha": config.lora_alpha, "mode": config.mode,
                "adapter_seed": config.seed, **backend_settings}
    if config.lora_target_modules:
        settings["target_modules"] = list(config.lora_target_modules)
    return diffusers_backend(network, schedule=grid.schedule, encode=encode, latent_shape=latent, **settings)


# ---------------------------------------------------------------------------------------------------------------
# SD1.5, SDXL, SD3/SD3.5


def _call_sdxl(model, x, t, cond):
    return model(x, t, encoder_hidden_states=cond["encoder_hidden_states"],
                 added_cond_kwargs={"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]},
                 return_dict=False)[0]


def _image(config, path: Path, family: str, dtype: torch.dtype, device: torch.device, height, width):
    import diffusers

    from .grids import preset_grid

    pipeline_class = {families.SD15.name: diffusers.StableDiffusionPipeline,
                      families.SDXL.name: diffusers.StableDiffusionXLPipeline,
                      families.SD3.name: diffusers.StableDiffusion3Pipeline}[family]
    pipe = _load(pipeline_class, path, dtype)
    network = pipe.unet if family != families.SD3.name else pipe.transformer
    if family == families.SD15.name:
        prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
        if prediction != "epsilon" or network.config.cross_attention_dim == 1024:
            raise ConfigError("teacher.folder is a Stable Diffusion 2.x pipeline (v-prediction or OpenCLIP-H "
                              "conditioning); SD2 is not a family TDM distils")
    if family == families.SD3.name and getattr(network.config, "dual_attention_layers", ()):
        family = families.SD35.name
    _check_family(config, family)
    scale = pipe.vae_scale_factor
    size = network.config.sample_size
    latent = (network.config.in_channels, height // scale if height else size, width // scale if width else size)
    encoded = _encode_prompts(config, pipe, lambda pipe, prompt: _encode(pipe, family, prompt, latent, scale))
    schedule = DiscreteSchedule.from_diffusers_scheduler(pipe.scheduler)
    grid = preset_grid(schedule, families.FAMILIES[family].default_preset, config.steps, latent_shape=latent)
    del pipe  # the text encoders and VAE go; the denoiser stays as the teacher
    extra = {"call": _call_sdxl} if family == families.SDXL.name else {}
    return _teacher(config, network, grid, encoded, device, latent, family=family, **extra)


def _encode(pipe, family: str, prompt: str, latent: tuple[int, ...], scale: int) -> dict:
    """One prompt's conditioning as the folder's pipeline feeds its denoiser (without CFG's batch doubling)."""
    cpu = torch.device("cpu")
    if family == families.SD15.name:
        embeds, _ = pipe.encode_prompt(prompt, cpu, 1, do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds[0]}
    if family == families.SDXL.name:
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, device=cpu, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        size = (latent[1] * scale, latent[2] * scale)  # original = target size, no crop: the pipeline's defaults
        time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=embeds.dtype,
                                          text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
        if not prompt and pipe.config.get("force_zeros_for_empty_prompt", False):
            # what the pipeline feeds its CFG's unconditional half (SDXL base: zeros, not the empty prompt's encoding)
            embeds, pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        return {"encoder_hidden_states": embeds[0], "text_embeds": pooled[0], "time_ids": time_ids[0]}
    embeds, _, pooled, _ = pipe.encode_prompt(prompt, prompt, prompt, device=cpu, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    return {"encoder_hidden_states": embeds[0], "pooled_projections": pooled[0]}


# ---------------------------------------------------------------------------------------------------------------
# Wan 2.1 text-to-video

WAN_TEXT_LENGTH = 512  # WanPipeline's max_sequence_length: umt5's context as the pipeline pads it


def _wan(config, path: Path, dtype: torch.dtype, device: torch.device, frames, height, width):
    from diffusers import WanPipeline

    from .. import presets
    from .grids import preset_grid

    index = pipeline_index(path)
    if index.get("transformer_2") not in (None, [None, None]) or index.get("boundary_ratio") is not None:
        raise ConfigError("teacher.folder is a Wan 2.2 two-expert pipeline (transformer_2 / boundary_ratio); the "
                          "diffusers-folder teacher takes Wan 2.1 text-to-video")
    if frames is not None:
        try:
            families.video_latent_frames(frames)
        except ValueError as error:
            raise ConfigError(f"teacher.{error}") from None
    pipe = _load(WanPipeline, path, dtype, index)
    network = pipe.transformer
    if network.config.in_channels != 16 or getattr(network.config, "image_dim", None):
        raise ConfigError("teacher.folder is an image-to-video Wan; the teacher takes Wan 2.1 text-to-video")
    _check_family(config, families.WAN21.name)
    spatial, temporal = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
    frames = 33 if frames is None else frames  # TDM Distill's default clip (9 latent frames)
    latent = (network.config.in_channels, (frames - 1) // temporal + 1, (height or 480) // spatial,
              (width or 832) // spatial)

    def encode_one(pipe, prompt: str) -> dict:  # umt5's context, padded as the pipeline pads it
        embeds, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, num_videos_per_prompt=1,
                                       max_sequence_length=WAN_TEXT_LENGTH, device=torch.device("cpu"))
        return {"encoder_hidden_states": embeds[0]}

    encoded = _encode_prompts(config, pipe, encode_one)
    # The table the TDM Distill job of a Wan MODEL trains on: ComfyUI's Wan 2.1 shift, the wan21 preset's (a flow
    # network predicts the same velocity at any shift; the shift only places the grid and τ's draws).
    preset = families.WAN21.default_preset
    schedule = DiscreteSchedule.flow(presets.get_preset(preset).shift, schedules.NUM_TRAIN_TIMESTEPS)
    grid = preset_grid(schedule, preset, config.steps, latent_shape=latent)
    del pipe
    return _teacher(config, network, grid, encoded, device, latent)


# ---------------------------------------------------------------------------------------------------------------
# Flux-dev

FLUX_TEXT_LENGTH = 512  # FluxPipeline's max_sequence_length for Flux-dev's T5 context


def _flux(config, path: Path, dtype: torch.dtype, device: torch.device, height, width):
    from diffusers import FluxPipeline

    from .backend import FLUX_GUIDANCE
    from .grids import flux_schedule, preset_grid

    pipe = _load(FluxPipeline, path, dtype)
    network = pipe.transformer
    if not network.config.guidance_embeds:
        raise ConfigError("teacher.folder is a Flux without a guidance input (Flux-schnell or a de-distilled Flux); "
                          "TDM distils Flux-dev")
    _check_family(config, families.FLUX.name)
    if config.cfg != 1.0:
        raise ConfigError(f"cfg is {config.cfg:g}, but Flux-dev is guidance-distilled: its guidance ({FLUX_GUIDANCE}) is "
                          "an input, not a second pass; set cfg = 1 (recipe \"auto\" does)")
    scale = pipe.vae_scale_factor
    h, w = (height or 1024) // scale, (width or 1024) // scale
    if h % 2 or w % 2:
        raise ConfigError(f"teacher.height and teacher.width must be multiples of {2 * scale} pixels for Flux's 2×2 "
                          "latent patches")
    latent = (network.config.in_channels // 4, h, w)

    def encode_one(pipe, prompt: str) -> dict:  # CLIP-L pooled and T5 context, as the pipeline encodes them
        embeds, pooled, _ = pipe.encode_prompt(prompt, prompt, device=torch.device("cpu"), num_images_per_prompt=1,
                                               max_sequence_length=FLUX_TEXT_LENGTH)
        return {"encoder_hidden_states": embeds[0], "pooled_projections": pooled[0]}

    encoded = _encode_prompts(config, pipe, encode_one)
    grid = preset_grid(flux_schedule(latent), families.FLUX.default_preset, config.steps, latent_shape=latent)
    del pipe
    return _teacher(config, network, grid, encoded, device, latent)
