"""CogVideoX in few steps on diffusers components: loading a diffusers folder (with an optional TDM LoRA as a peft
adapter), cached text encoding, and v-prediction DDIM sampling at any timesteps — the trained 999/856/665/399 grid
of the TDM LoRA, which diffusers' own `CogVideoXDDIMScheduler` cannot hit (it always uses a fixed stride).

ComfyUI 0.3.75 has no native CogVideoX, so the model runs through diffusers here; nothing in this module imports
ComfyUI. The denoising loop mirrors `CogVideoXPipeline.__call__` (same initial noise for a seed, same CFG
combination, same decoding) with the stepping done by `tdm_core.solvers.sample_ddim_v_timesteps`.
"""

from __future__ import annotations

import json
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import families, schedules, solvers
from .presets import get_preset

REQUIRED_COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
TDM_ADAPTER_NAME = "tdm"
DEFAULT_FPS = 8  # CogVideoX-2b is trained on 8 fps clips (49 frames = 6 s)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class CogVideoXError(ValueError):
    pass


def is_cogvideox_folder(path: Path) -> bool:
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return False
    try:
        return json.loads(index.read_text()).get("_class_name", "").startswith("CogVideoX")
    except (OSError, json.JSONDecodeError):
        return False


def check_folder(path: str | Path) -> Path:
    """Raises with everything that is missing, so a user fixes a half-downloaded folder in one go."""
    path = Path(path)
    if not path.is_dir():
        raise CogVideoXError(f"CogVideoX folder {path} does not exist")
    missing = []
    if not (path / "model_index.json").is_file():
        missing.append("model_index.json")
    for component in REQUIRED_COMPONENTS:
        folder = path / component
        if not folder.is_dir() or not any(folder.iterdir()):
            missing.append(f"{component}/")
    if missing:
        raise CogVideoXError(
            f"CogVideoX folder {path} is incomplete: missing {', '.join(missing)}. Expected the diffusers layout of "
            f"THUDM/CogVideoX-2b: model_index.json and the folders {', '.join(c + '/' for c in REQUIRED_COMPONENTS)} "
            "(download the whole repository into models/diffusers/<name>/)."
        )
    return path


def check_frame_count(num_frames: int) -> int:
    """CogVideoX's VAE compresses time 4×: valid frame counts are 4k + 1 (49 = 13 latent frames)."""
    if num_frames < 1 or (num_frames - 1) % 4 != 0:
        lower = max(1, (num_frames - 1) // 4 * 4 + 1)
        raise CogVideoXError(
            f"CogVideoX needs a frame count of the form 4k+1 (1, 5, 9, …, 49); got {num_frames}. "
            f"Use {lower} or {lower + 4}."
        )
    return (num_frames - 1) // 4 + 1


def check_size(pipe, height: int, width: int) -> None:
    factor = pipe.vae_scale_factor_spatial * pipe.transformer.config.patch_size
    if height % factor or width % factor:
        raise CogVideoXError(f"height and width must be multiples of {factor}; got {height}×{width}")


@dataclass(frozen=True)
class LoadOptions:
    dtype: str = "bf16"
    lora_path: str | None = None
    lora_strength: float | None = None  # None: the LoRA's own (metadata / preset) strength
    vae_slicing: bool = True
    vae_tiling: bool = True
    offload: str = "none"  # "none", "model" (accelerate model offload), "sequential"


def load_pipeline(path: str | Path, options: LoadOptions = LoadOptions(), device: str | torch.device = "cpu"):
    """A `CogVideoXPipeline` from a diffusers folder, with the TDM LoRA attached as the peft adapter 'tdm'."""
    from diffusers import CogVideoXPipeline

    path = check_folder(path)
    if options.dtype not in DTYPES:
        raise CogVideoXError(f"dtype must be one of {', '.join(DTYPES)}; got {options.dtype!r}")
    pipe = CogVideoXPipeline.from_pretrained(path, torch_dtype=DTYPES[options.dtype])
    pipe.set_progress_bar_config(disable=True)
    if options.lora_path:
        attach_lora(pipe, options.lora_path, options.lora_strength)
    if options.vae_slicing:
        pipe.vae.enable_slicing()
    if options.vae_tiling:
        pipe.vae.enable_tiling()
    if options.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif options.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    elif options.offload == "none":
        pipe.to(device)
    else:
        raise CogVideoXError(f"offload must be none, model or sequential; got {options.offload!r}")
    return pipe


def attach_lora(pipe, lora_path: str | Path, strength: float | None = None) -> tuple[float, str]:
    """Attaches a TDM LoRA read by the shared reader (any supported format) as a peft adapter; returns the
    strength used and where it came from. A LoRA of another family is refused before anything is attached."""
    from peft import set_peft_model_state_dict

    from .lora import LoraMismatchError, auto_strength, family_name, load_lora, to_peft

    lora = load_lora(lora_path)
    if lora.family != families.COGVIDEOX.name:
        raise LoraMismatchError(
            f"{Path(lora_path).name} is a LoRA for {family_name(lora.family)}, not for CogVideoX. "
            "Pick the TDM CogVideoX-2B LoRA (Luo-Yihong/TDM_CogVideoX-2B_LoRA)."
        )
    adapter = to_peft(lora, "transformer")
    transformer = pipe.transformer
    if TDM_ADAPTER_NAME in getattr(transformer, "peft_config", {}):
        transformer.delete_adapters(TDM_ADAPTER_NAME)
    transformer.add_adapter(adapter.lora_config(), adapter_name=TDM_ADAPTER_NAME)
    result = set_peft_model_state_dict(transformer, adapter.state_dict, adapter_name=TDM_ADAPTER_NAME)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise LoraMismatchError(f"{Path(lora_path).name}: {len(unexpected)} LoRA tensors did not fit this "
                                f"CogVideoX transformer (e.g. {unexpected[0]})")
    if strength is None:
        strength, source = auto_strength(lora, families.COGVIDEOX.name)
    else:
        source = "set on the node"
    transformer.set_adapters([TDM_ADAPTER_NAME], weights=[strength])
    return strength, source


def sharing_problem(pipe) -> str | None:
    """Why a module tree sharing `pipe`'s transformer weights (a distillation's network, a LoRA'd student) cannot be
    made from it, or None: a LoRA already attached (its layers are peft's: the LoRA would be inside the copy), or
    sequential offload (its weights live in offload hooks, not in the modules)."""
    transformer = pipe.transformer
    if getattr(transformer, "peft_config", None):
        return "carries a LoRA (TDM CogVideoX Loader's lora_name)"
    if any(getattr(getattr(module, "_hf_hook", None), "offload", False) for module in transformer.modules()):
        return "uses sequential offload, whose weights live in offload hooks"
    return None


def drop_offload_hooks(module) -> None:
    """Removes the accelerate hooks a copy of a model-offloaded pipeline's component inherited: they belong to the
    pipeline's offload chain and would move the copy to and from the device at every call. The copy's owner places
    it."""
    try:
        from accelerate.hooks import remove_hook_from_module
    except ImportError:  # no accelerate, so no hooks
        return
    remove_hook_from_module(module, recurse=True)


def with_lora(pipe, lora_path: str | Path, strength: float | None = None):
    """(a pipeline with the TDM LoRA attached, strength, where it came from) beside `pipe`, which stays as it was:
    the text encoder, VAE, tokenizer and scheduler are `pipe`'s own objects and the transformer is a module tree of
    its own on `pipe`'s weights (no copy), so one loaded CogVideoX serves as a distillation's teacher and samples its
    student in the same graph. A `pipe` that already carries a LoRA is refused (the two would add up)."""
    from .distill.backend import shared_weights_copy

    problem = sharing_problem(pipe)
    if problem:
        raise CogVideoXError(f"this CogVideoX pipeline already {problem}: the job's LoRA needs a TDM CogVideoX "
                             "Loader with lora_name 'none' and offload 'none' or 'model'")
    transformer = shared_weights_copy(pipe.transformer)
    if getattr(pipe.transformer, "_hf_hook", None) is not None:
        # Model offload: the copy (a LoRA'd student) stays on the device; the text encoder and VAE keep moving
        # through `pipe`'s hooks.
        drop_offload_hooks(transformer)
        transformer.to(pipe._execution_device)
    components = dict(pipe.components, transformer=transformer)
    student = type(pipe)(**components)
    student.set_progress_bar_config(disable=True)
    strength, source = attach_lora(student, lora_path, strength)
    return student, strength, source


def sampling_timesteps(grid: str, steps: int = 4, custom: str = "") -> tuple[int, ...]:
    """The timesteps of a CogVideoX grid: 'trained' (999/856/665/399, what the TDM LoRA was trained on),
    'trailing' (diffusers' CogVideoXDDIMScheduler spacing), or 'custom' (a comma-separated list)."""
    if grid == "trained":
        # the preset is the source of truth
        return schedules.grid_timesteps(get_preset(families.COGVIDEOX.default_preset).grid, steps)
    if grid == "trailing":
        return schedules.trailing_timesteps(steps)
    if grid == "custom":
        return schedules.parse_timesteps(custom)
    raise CogVideoXError(f"unknown CogVideoX grid {grid!r}; use trained, trailing or custom")


# Text encoding is the same for every seed and frame count: keep the last few prompts' embeddings per pipeline.
_PROMPT_CACHE: OrderedDict = OrderedDict()
_PROMPT_CACHE_SIZE = 8


def encode_prompts(pipe, prompt: str, negative_prompt: str, with_negative: bool):
    key = (id(pipe), prompt, negative_prompt if with_negative else None)
    cached = _PROMPT_CACHE.get(key)
    # id() of a freed pipeline can be reused by the next one loaded (another dtype or text encoder): a hit counts
    # only if it is still the same object.
    if cached is not None and cached[0]() is pipe:
        _PROMPT_CACHE.move_to_end(key)
        return cached[1], cached[2]
    positive, negative = pipe.encode_prompt(
        prompt=prompt, negative_prompt=negative_prompt, do_classifier_free_guidance=with_negative,
        num_videos_per_prompt=1, device=pipe._execution_device, dtype=pipe.transformer.dtype,
    )
    for stale in [k for k, entry in _PROMPT_CACHE.items() if entry[0]() is None]:
        del _PROMPT_CACHE[stale]  # embeddings of a pipeline that is gone only hold (accelerator) memory
    _PROMPT_CACHE[key] = (weakref.ref(pipe), positive, negative)
    while len(_PROMPT_CACHE) > _PROMPT_CACHE_SIZE:
        _PROMPT_CACHE.popitem(last=False)
    return positive, negative


def initial_latents(pipe, num_frames: int, height: int, width: int, seed: int) -> torch.Tensor:
    """The pipeline's own initial noise for this seed: [1, latent frames, C, H/8, W/8], CPU generator."""
    from diffusers.utils.torch_utils import randn_tensor

    latent_frames = check_frame_count(num_frames)
    if getattr(pipe.transformer.config, "patch_size_t", None):
        raise CogVideoXError("CogVideoX 1.5 (temporal patches) is not supported; use CogVideoX-2b/5b folders")
    shape = (1, latent_frames, pipe.transformer.config.in_channels,
             height // pipe.vae_scale_factor_spatial, width // pipe.vae_scale_factor_spatial)
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = randn_tensor(shape, generator=generator, device=torch.device("cpu"), dtype=pipe.transformer.dtype)
    return latents * pipe.scheduler.init_noise_sigma


def alphas_cumprod(pipe) -> torch.Tensor:
    """ᾱ of the folder's own scheduler config (CogVideoX-2b: scaled-linear, SNR shift 3, zero-terminal SNR)."""
    return pipe.scheduler.alphas_cumprod.to(torch.float64)


@torch.no_grad()
def sample_latents(pipe, prompt: str, negative_prompt: str = "", num_frames: int = 49, height: int = 480,
                   width: int = 720, timesteps=schedules.COGVIDEOX_TRAINED_TIMESTEPS, cfg: float = 1.0, seed: int = 0,
                   callback: Callable[[dict], None] | None = None) -> torch.Tensor:
    """Few-step v-prediction DDIM at the given timesteps; returns the final latents [1, F', C, h, w]."""
    check_size(pipe, height, width)
    if cfg < 1.0:
        raise CogVideoXError(f"cfg must be ≥ 1 (1 = no guidance, as TDM samples); got {cfg}")
    with_negative = cfg > 1.0
    positive, negative = encode_prompts(pipe, prompt, negative_prompt, with_negative)
    embeddings = torch.cat([negative, positive]) if with_negative else positive
    device = pipe._execution_device
    latents = initial_latents(pipe, num_frames, height, width, seed).to(device)
    rotary = None
    if pipe.transformer.config.use_rotary_positional_embeddings:
        rotary = pipe._prepare_rotary_positional_embeddings(height, width, latents.size(1), device)

    # The solver keeps the state in float32 (α/σ are never rounded to a half dtype); the network gets the state in
    # its own dtype, as CogVideoXPipeline feeds it, and the integer timestep.
    network_dtype = pipe.transformer.dtype

    def v_model(x: torch.Tensor, t: int) -> torch.Tensor:
        model_input = (torch.cat([x] * 2) if with_negative else x).to(network_dtype)
        timestep = torch.full((model_input.shape[0],), t, device=device, dtype=torch.long)
        v = pipe.transformer(hidden_states=model_input, encoder_hidden_states=embeddings, timestep=timestep,
                             image_rotary_emb=rotary, return_dict=False)[0].float()
        if with_negative:
            v_uncond, v_cond = v.chunk(2)
            v = v_uncond + cfg * (v_cond - v_uncond)
        return v

    try:
        final = solvers.sample_ddim_v_timesteps(v_model, latents.float(), timesteps, alphas_cumprod(pipe),
                                                callback=callback)
    except torch.OutOfMemoryError as error:
        raise CogVideoXError(_oom_advice("sampling")) from error
    return final.to(pipe.transformer.dtype)


@torch.no_grad()
def decode_frames(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Latents → frames [F, H, W, 3], float in [0, 1] (ComfyUI's IMAGE layout)."""
    try:
        video = pipe.decode_latents(latents.to(pipe.vae.dtype))
    except torch.OutOfMemoryError as error:
        raise CogVideoXError(_oom_advice("VAE decoding")) from error
    frames = pipe.video_processor.postprocess_video(video=video, output_type="pt")  # [B, F, C, H, W] in [0, 1]
    return frames[0].permute(0, 2, 3, 1).float().clamp(0, 1).cpu()


def _oom_advice(stage: str) -> str:
    return (f"Out of memory during CogVideoX {stage}. Enable VAE tiling and slicing on the loader, choose offload "
            "'model' (or 'sequential', slowest, least memory), use bf16, or lower the frame count/resolution.")
