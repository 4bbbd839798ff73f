"""ComfyUI model files on disk for the headless ComfyUI-files teacher (tdm_comfy): a folder laid out as ComfyUI's
`models/` with a tiny SD3 diffusion model (diffusers layout, as Load Diffusion Model reads it) and a CLIP-L text
encoder of the real size with random weights.

Why real size for CLIP-L: ComfyUI builds its text encoders from fixed configs (comfy/sd1_clip_config.json), so only
a file of the real shapes loads; 123 M parameters in float16 are 0.25 GB, written once per test session. Load CLIP
with type "sd3" and that one file gives SD3's conditioning (CLIP-L's hidden states zero-padded to 4096 channels, its
pooled output beside CLIP-G's zeros: 2048), which the tiny transformer takes (joint attention 4096, pooled 2048).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from .twins import randomise_

TINY_SD3_FILE = "tiny_sd3.safetensors"
CLIP_L_FILE = "clip_l_random.safetensors"
SD3_CLIP_L_CONTEXT = 4096  # SD3's conditioning width (CLIP-L/G hidden states padded to T5-XXL's)
SD3_POOLED = 2048  # CLIP-L pooled 768 + CLIP-G pooled 1280


def tiny_sd3_transformer(seed: int = 0):
    from diffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                        attention_head_dim=64, num_attention_heads=2,  # ComfyUI: depth = heads
                                        joint_attention_dim=SD3_CLIP_L_CONTEXT, caption_projection_dim=128,
                                        pooled_projection_dim=SD3_POOLED, pos_embed_max_size=16)
    return randomise_(transformer, seed).eval()


def random_clip_l(seed: int = 0) -> dict[str, torch.Tensor]:
    """CLIP-L's text model (with its projection) in the layout ComfyUI's Load CLIP reads, random weights, float16."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    # CLIP ViT-L/14's text tower (transformers' defaults are ViT-B/32's)
    config = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                            projection_dim=768)
    model = CLIPTextModelWithProjection(config)
    return {k: v.to(torch.float16).contiguous() for k, v in model.state_dict().items()}


def write_models(base: Path, seed: int = 0) -> Path:
    """`base/models/{diffusion_models,text_encoders,...}` with the two files; returns `base` (a ComfyUI
    --base-directory)."""
    models = Path(base) / "models"
    for folder in ("checkpoints", "diffusion_models", "text_encoders", "vae", "loras", "embeddings"):
        (models / folder).mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tiny_sd3_transformer(seed).state_dict().items()},
              str(models / "diffusion_models" / TINY_SD3_FILE))
    save_file(random_clip_l(seed), str(models / "text_encoders" / CLIP_L_FILE))
    return Path(base)
