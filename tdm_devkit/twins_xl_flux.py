"""Twin tiny SDXL and Flux models: the same random weights in ComfyUI layout and in diffusers layout.

Like `twins.py` (SD1.5/SD3), with the block layouts and key names of the real models at reduced widths:

- **SDXL**: three levels (no attention at the first, as SDXL), linear projections in the transformers, ComfyUI's
  64-channel heads (its SDXL config forces `num_head_channels` 64, so the diffusers twin has `ch // 64` heads), and the
  ADM input `y` = pooled text embedding + six 256-wide size/crop embeddings (diffusers' "text_time" embedding).
- **Flux-dev**: double and single stream blocks with the guidance embedding. ComfyUI's file detection fixes Flux's
  head count at 24 (head dim 128), so the ComfyUI twin is built from the tiny config directly (as the SD1.5 twin) and
  loaded from ComfyUI's own diffusers→Flux conversion (`comfy.utils.convert_diffusers_mmdit`).
"""

from __future__ import annotations

import dataclasses

import torch

from . import comfy_runtime
from .twins import Twin, _patcher, randomise_, unet_twin

comfy_runtime.bootstrap()

import comfy.ldm.flux.model  # noqa: E402
import comfy.model_detection  # noqa: E402
import comfy.supported_models  # noqa: E402
import comfy.utils  # noqa: E402

SDXL_CONTEXT_DIM = 64
SDXL_POOLED_DIM = 32
SDXL_SIZE_EMBEDDING_DIM = 6 * 256  # height, width, crop_h, crop_w, target_height, target_width (256 each)
SDXL_TINY_UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "num_classes": "sequential",
    "adm_in_channels": SDXL_POOLED_DIM + SDXL_SIZE_EMBEDDING_DIM,
    "in_channels": 4,
    "model_channels": 32,
    "num_res_blocks": [2, 2, 2],
    "transformer_depth": [0, 0, 1, 1, 2, 2],
    "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 2,
    "use_linear_in_transformer": True,
    "context_dim": SDXL_CONTEXT_DIM,
    "num_heads": -1,
    "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 2, 2, 2],
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}

# The same SDXL layout (ADM `y`, linear transformers, 64-channel heads, no attention at the first level) with one
# block where the twin has two and 64 channels at the last level: 1.9 M parameters against 8.2 M, about half the time
# per call on the CPU. The toy teacher of the student-vs-teacher check trains and samples on it
# (tdm_devkit/toy_latent_teacher.py); the parity tests keep the full twin.
SDXL_COMPACT_UNET_CONFIG = {
    **SDXL_TINY_UNET_CONFIG,
    "num_res_blocks": [1, 1, 1],
    "transformer_depth": [0, 1, 1],
    "channel_mult": [1, 2, 2],
    "transformer_depth_middle": 1,
    "transformer_depth_output": [0, 0, 1, 1, 1, 1],
}

FLUX_CONTEXT_DIM = 64
FLUX_POOLED_DIM = 32
FLUX_LATENT_CHANNELS = 16
FLUX_TINY_CONFIG = {
    "image_model": "flux",
    "in_channels": FLUX_LATENT_CHANNELS,
    "out_channels": FLUX_LATENT_CHANNELS,
    "vec_in_dim": FLUX_POOLED_DIM,
    "context_in_dim": FLUX_CONTEXT_DIM,
    "hidden_size": 64,
    "mlp_ratio": 4.0,
    "num_heads": 2,
    "depth": 1,
    "depth_single_blocks": 2,
    "axes_dim": [8, 12, 12],  # sums to the head dim (64 / 2), as Flux's 16 + 56 + 56 = 128
    "theta": 10000,
    "patch_size": 2,
    "qkv_bias": True,
    "guidance_embed": True,
}


def sdxl_diffusers_unet(seed: int = 0, compact: bool = False):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64 if compact else 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1 if compact else 2, transformer_layers_per_block=(1, 1, 1 if compact else 2),
        cross_attention_dim=SDXL_CONTEXT_DIM,
        # diffusers' name for the head *count*: 64-channel heads as ComfyUI's SDXL
        attention_head_dim=(1, 1, 1 if compact else 2),
        norm_num_groups=32, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=SDXL_POOLED_DIM + SDXL_SIZE_EMBEDDING_DIM,
    )
    return randomise_(unet, seed).eval()


def sdxl_twin(seed: int = 0, compact: bool = False) -> Twin:
    config = SDXL_COMPACT_UNET_CONFIG if compact else SDXL_TINY_UNET_CONFIG
    return unet_twin("sdxl", sdxl_diffusers_unet(seed, compact), comfy.supported_models.SDXL, config)


def flux_diffusers_transformer(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    config = FLUX_TINY_CONFIG
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=FLUX_LATENT_CHANNELS * 4, num_layers=config["depth"],
        num_single_layers=config["depth_single_blocks"], attention_head_dim=config["hidden_size"] // config["num_heads"],
        num_attention_heads=config["num_heads"], joint_attention_dim=FLUX_CONTEXT_DIM,
        pooled_projection_dim=FLUX_POOLED_DIM, guidance_embeds=True, axes_dims_rope=tuple(config["axes_dim"]),
    )
    return randomise_(transformer, seed).eval()


def flux_unet_config() -> dict:
    config = dict(FLUX_TINY_CONFIG)
    names = {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}
    if "txt_ids_dims" in names:  # newer ComfyUI: Flux-dev's text tokens carry no position ids (its detection's value)
        config["txt_ids_dims"] = []
    return config


def flux_twin(seed: int = 0) -> Twin:
    transformer = flux_diffusers_transformer(seed)
    diffusers_sd = {k: v.clone() for k, v in transformer.state_dict().items()}
    comfy_sd = comfy.model_detection.convert_diffusers_mmdit(dict(diffusers_sd), "")
    model_config = comfy.supported_models.Flux(flux_unet_config())
    model_config.set_inference_dtype(torch.float32, None)
    base_model = model_config.get_model({})
    base_model.diffusion_model.load_state_dict(comfy_sd, strict=True)
    base_model.eval()
    key_map = comfy.utils.flux_to_diffusers(FLUX_TINY_CONFIG, output_prefix="")
    return Twin("flux", _patcher(base_model), transformer, key_map)


def tiny_text_embedding(family: str, text: str, seed: int = 0, tokens: int = 7):
    """A deterministic stand-in for the text encoders: (context [1, tokens, dim], pooled [1, dim])."""
    text_seed = seed * 1_000_003 + sum((i + 1) * ord(c) for i, c in enumerate(text)) + (17 if family == "flux" else 0)
    generator = torch.Generator().manual_seed(text_seed)
    dim, pooled_dim = (SDXL_CONTEXT_DIM, SDXL_POOLED_DIM) if family == "sdxl" else (FLUX_CONTEXT_DIM, FLUX_POOLED_DIM)
    return torch.randn(1, tokens, dim, generator=generator), torch.randn(1, pooled_dim, generator=generator)


def tiny_conditioning(family: str, text: str, seed: int = 0, guidance: float | None = None) -> list:
    """ComfyUI CONDITIONING as CLIPTextEncode gives it (Flux: with FluxGuidance's `guidance` when given)."""
    context, pooled = tiny_text_embedding(family, text, seed)
    extra = {"pooled_output": pooled}
    if guidance is not None:
        extra["guidance"] = float(guidance)
    return [[context, extra]]
