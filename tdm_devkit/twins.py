"""Twin tiny models: the same random weights in ComfyUI layout and in diffusers layout, with the real key names.

A test that runs a ComfyUI graph on the ComfyUI twin and the official diffusers recipe on the diffusers twin compares
the two implementations on identical weights, which is the project's standard of correctness. Widths are reduced so
that everything runs on two CPU cores; block layouts and key names are those of the real models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import comfy_runtime

comfy_runtime.bootstrap()

import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.supported_models  # noqa: E402
import comfy.utils  # noqa: E402

# SD1.5 block layout (ComfyUI's detection table for SD15) at a tenth of the width.
SD15_TINY_UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "model_channels": 32,
    "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": 64,
    "num_heads": 8,
    "num_head_channels": -1,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
SD15_CONTEXT_DIM = 64

# SD3-medium layout (MMDiT, head dim 64, heads = depth) at depth 2; SD3.5-medium adds dual attention (`attn2`) in
# its first blocks and qk RMS norms.
SD3_TINY_DEPTH = 2
SD3_JOINT_ATTENTION_DIM = 64
SD3_POOLED_DIM = 32
SD3_LATENT_CHANNELS = 16


def randomise_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Gives every parameter and floating buffer deterministic random values.

    Default initialisations leave zeros and ones (zero-initialised output projections, unit norms, empty tensors in
    ComfyUI's layers) that would hide a wrong key mapping: a tensor of zeros looks the same whichever key it lands
    on. Scales keep activations O(1) through the depth of a UNet.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in sorted(list(module.named_parameters()) + list(module.named_buffers())):
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
            lowered = name.lower()
            if "norm" in lowered and name.endswith("weight") and tensor.ndim == 1:
                value = 1.0 + 0.1 * noise
            elif tensor.ndim >= 2:
                fan_in = math.prod(tensor.shape[1:])
                value = noise / math.sqrt(fan_in)
            else:
                value = 0.05 * noise
            tensor.copy_(value.to(tensor.dtype))
    return module


def _patcher(model: torch.nn.Module) -> comfy.model_patcher.ModelPatcher:
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


@dataclass
class Twin:
    """One set of weights in both layouts."""

    family: str
    comfy: comfy.model_patcher.ModelPatcher  # a ComfyUI MODEL
    diffusers: torch.nn.Module  # UNet2DConditionModel / SD3Transformer2DModel
    key_map: dict  # diffusers key -> ComfyUI diffusion_model key


def sd15_diffusers_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=2,
        cross_attention_dim=SD15_CONTEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    return randomise_(unet, seed).eval()


def unet_twin(family: str, unet, config_class, unet_config: dict) -> Twin:
    """A ComfyUI MODEL of `config_class` holding a diffusers UNet's weights (SD1.5 and SDXL layouts)."""
    key_map = comfy.utils.unet_to_diffusers(unet_config)
    diffusers_sd = unet.state_dict()
    unmapped = sorted(set(diffusers_sd) - set(key_map))
    if unmapped:
        raise AssertionError(f"diffusers keys without a ComfyUI counterpart: {unmapped[:5]}")
    model_config = config_class(dict(unet_config))
    model_config.set_inference_dtype(torch.float32, None)
    base_model = model_config.get_model({})
    base_model.diffusion_model.load_state_dict({key_map[k]: v.clone() for k, v in diffusers_sd.items()}, strict=True)
    base_model.eval()
    return Twin(family, _patcher(base_model), unet, key_map)


def sd15_twin(seed: int = 0) -> Twin:
    return unet_twin("sd15", sd15_diffusers_unet(seed), comfy.supported_models.SD15, SD15_TINY_UNET_CONFIG)


def sd3_diffusers_transformer(seed: int = 0, dual_attention_layers: tuple = ()):
    from diffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=SD3_LATENT_CHANNELS,
        out_channels=SD3_LATENT_CHANNELS,
        num_layers=SD3_TINY_DEPTH,
        attention_head_dim=64,
        num_attention_heads=SD3_TINY_DEPTH,
        joint_attention_dim=SD3_JOINT_ATTENTION_DIM,
        caption_projection_dim=64 * SD3_TINY_DEPTH,
        pooled_projection_dim=SD3_POOLED_DIM,
        pos_embed_max_size=16,
        dual_attention_layers=dual_attention_layers,
        qk_norm="rms_norm" if dual_attention_layers else None,
    )
    return randomise_(transformer, seed).eval()


def sd3_twin(seed: int = 0, sd35: bool = False) -> Twin:
    """SD3-medium layout; with `sd35`, the SD3.5-medium layout (dual attention in block 0, RMS qk norm)."""
    transformer = sd3_diffusers_transformer(seed, dual_attention_layers=(0,) if sd35 else ())
    diffusers_sd = {k: v.clone() for k, v in transformer.state_dict().items()}
    # The real loader path of ComfyUI's UNETLoader: detect, convert the diffusers MMDiT layout, build, load.
    patcher = comfy.sd.load_diffusion_model_state_dict(dict(diffusers_sd))
    if patcher is None:
        raise AssertionError("ComfyUI did not recognise the tiny SD3 transformer")
    key_map = comfy.utils.mmdit_to_diffusers({"depth": SD3_TINY_DEPTH, "num_blocks": SD3_TINY_DEPTH})
    return Twin("sd35" if sd35 else "sd3", patcher, transformer, key_map)


# ---------------------------------------------------------------------------------------------------------------
# The other inputs a ComfyUI graph needs: conditioning with the families' shapes and a real (tiny) ComfyUI VAE.

FAMILY_LATENT_CHANNELS = {"sd15": 4, "sd3": SD3_LATENT_CHANNELS, "sd35": SD3_LATENT_CHANNELS, "sdxl": 4, "flux": 16}


def comfy_twin(family: str, seed: int = 0) -> Twin:
    if family == "sd15":
        return sd15_twin(seed)
    if family in ("sd3", "sd35"):
        return sd3_twin(seed, sd35=family == "sd35")
    raise ValueError(f"unknown tiny family {family!r}; expected sd15, sd3 or sd35")


def tiny_text_embedding(family: str, text: str, seed: int = 0, tokens: int = 7) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A deterministic stand-in for a text encoder: (context [1, tokens, dim], pooled [1, dim] or None)."""
    text_seed = seed * 1_000_003 + sum((i + 1) * ord(c) for i, c in enumerate(text))
    generator = torch.Generator().manual_seed(text_seed)
    if family == "sd15":
        return torch.randn(1, tokens, SD15_CONTEXT_DIM, generator=generator), None
    context = torch.randn(1, tokens, SD3_JOINT_ATTENTION_DIM, generator=generator)
    pooled = torch.randn(1, SD3_POOLED_DIM, generator=generator)
    return context, pooled


def tiny_conditioning(family: str, text: str, seed: int = 0) -> list:
    """ComfyUI CONDITIONING for the tiny family."""
    context, pooled = tiny_text_embedding(family, text, seed)
    extra = {} if pooled is None else {"pooled_output": pooled}
    return [[context, extra]]


def tiny_vae(family: str, seed: int = 0) -> comfy.sd.VAE:
    """A real ComfyUI VAE object (the TAESD architecture ComfyUI detects from `taesd_decoder.*` keys), random weights."""
    import comfy.taesd.taesd

    module = comfy.taesd.taesd.TAESD(latent_channels=FAMILY_LATENT_CHANNELS[family])
    randomise_(module, seed)
    state_dict = {k: v.clone() for k, v in module.state_dict().items()}
    return comfy.sd.VAE(sd=state_dict)


# ---------------------------------------------------------------------------------------------------------------
# Half precision: the same twins loaded the ways a GPU user's ComfyUI loads them.

# (weight dtype, compute dtype) pairs a user gets from the core loaders on a GPU:
#   bf16/bf16 and fp16/fp16: `unet_dtype()` on a bf16- or fp16-capable card (no manual cast, the common case);
#   bf16 → fp32: the manual-cast path (bf16 weights on a device that cannot compute in bf16, e.g. this CPU);
#   fp8_e4m3fn → bf16: UNETLoader `weight_dtype fp8_e4m3fn` (fp8 weights, cast per layer to the compute dtype).
HALF_LOADS = {
    "bf16": (torch.bfloat16, torch.bfloat16),
    "fp16": (torch.float16, torch.float16),
    "bf16_weights_fp32_compute": (torch.bfloat16, torch.float32),
    "fp8_e4m3fn_weights_bf16_compute": (torch.float8_e4m3fn, torch.bfloat16),
}


class _ComputeDtypeOfThisDevice:
    """Answers ComfyUI's one device-capability question — "does the device compute in the weights' dtype, or which
    dtype must the weights be cast to?" (`model_management.unet_manual_cast`) — as a GPU would for the requested
    compute dtype. This CPU would always answer float32; everything else is ComfyUI's own loader code."""

    def __init__(self, compute_dtype: torch.dtype):
        self.compute_dtype = compute_dtype

    def __enter__(self):
        self.original = comfy.model_management.unet_manual_cast
        compute = self.compute_dtype
        comfy.model_management.unet_manual_cast = (
            lambda weight_dtype, device, supported=None: None if weight_dtype == compute else compute)
        return self

    def __exit__(self, *exc):
        comfy.model_management.unet_manual_cast = self.original


def comfy_twin_in_dtype(family: str, load: str, seed: int = 0) -> Twin:
    """The twin's ComfyUI MODEL with weights and compute in the dtypes of `HALF_LOADS[load]`; the diffusers side is
    the same weights rounded to the weight dtype, in the compute dtype (what a diffusers user of that precision
    runs). SD3/SD3.5 go through ComfyUI's UNETLoader path (`load_diffusion_model_state_dict` with
    `model_options["dtype"]`); the SD1.5 twin, which ComfyUI's detection cannot load from a file at this width,
    through the same `set_inference_dtype` call that path makes."""
    weight_dtype, compute_dtype = HALF_LOADS[load]
    if family == "sd15":
        diffusers_model = sd15_diffusers_unet(seed)
        key_map = comfy.utils.unet_to_diffusers(SD15_TINY_UNET_CONFIG)
        model_config = comfy.supported_models.SD15(dict(SD15_TINY_UNET_CONFIG))
        manual_cast = None if weight_dtype == compute_dtype else compute_dtype
        model_config.set_inference_dtype(weight_dtype, manual_cast)
        base_model = model_config.get_model({})
        base_model.diffusion_model.load_state_dict(
            {key_map[k]: v.clone() for k, v in diffusers_model.state_dict().items()}, strict=True)
        base_model.eval()
        patcher = _patcher(base_model)
    elif family in ("sd3", "sd35"):
        diffusers_model = sd3_diffusers_transformer(seed, dual_attention_layers=(0,) if family == "sd35" else ())
        key_map = comfy.utils.mmdit_to_diffusers({"depth": SD3_TINY_DEPTH, "num_blocks": SD3_TINY_DEPTH})
        # ComfyUI's diffusers→MMDiT conversion rewrites some of the tensors it is given in place: hand it copies.
        state_dict = {k: v.clone() for k, v in diffusers_model.state_dict().items()}
        with _ComputeDtypeOfThisDevice(compute_dtype):
            patcher = comfy.sd.load_diffusion_model_state_dict(state_dict, model_options={"dtype": weight_dtype})
        if patcher is None:
            raise AssertionError("ComfyUI did not recognise the tiny SD3 transformer")
    else:
        raise ValueError(f"unknown tiny family {family!r}; expected sd15, sd3 or sd35")
    if patcher.model.get_dtype() != weight_dtype or patcher.model.manual_cast_dtype != (
            None if weight_dtype == compute_dtype else compute_dtype):
        raise AssertionError(f"ComfyUI loaded {family} as {patcher.model.get_dtype()} / manual cast "
                             f"{patcher.model.manual_cast_dtype}, not {load}")
    with torch.no_grad():
        for tensor in [*diffusers_model.parameters(), *diffusers_model.buffers()]:
            if tensor.is_floating_point():  # SD3's position table is a buffer in diffusers, a weight in ComfyUI
                tensor.copy_(tensor.to(weight_dtype).to(tensor.dtype))
    return Twin(family, patcher, diffusers_model.to(compute_dtype).eval(), key_map)
