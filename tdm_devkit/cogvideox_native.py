"""A tiny CogVideoX-2B in newer ComfyUI's native layout (`comfy/ldm/cogvideo/`), twinned with diffusers'
`CogVideoXTransformer3DModel` on the same weights.

Upstream ComfyUI (2026) runs CogVideoX natively: `model_base.CogVideoX`, model sampling `V_PREDICTION_DDPM`, module
names `blocks.N.{q,k,v,attn_out,ff_proj,ff_out}`. ComfyUI 0.3.75 has none of it (`has_native_cogvideox`); tests that
need it skip there with that reason.

The key conversion below is written here from the two architectures' module lists, independently of
`tdm_core.cogvideox_names` (the code under test), so a wrong mapping in either shows up as a strict-load
failure or a parity failure rather than agreeing with itself.
"""

from __future__ import annotations

import re

import torch

from . import cogvideox_tiny

# Upstream's detection (comfy/model_detection.py) derives the head count as width // 64, so the twin keeps the 2B's
# head width of 64 (the diffusers-only fixture uses 16). Three heads (width 192) because the two sin-cos position
# implementations split the width differently (diffusers 3/4 + 1/4, native 2/3 + 1/3): both need a width divisible
# by 12. Everything else is the tiny 2B's, including its sample size (the tiny geometry).
NATIVE_TWIN_TRANSFORMER_CONFIG = {**cogvideox_tiny.TINY_TRANSFORMER_CONFIG, "attention_head_dim": 64,
                                  "num_attention_heads": 3}
# What upstream's detection makes of a native 2B file that carries the position table, plus the sample size: the
# detection leaves it at the 2B's 60x90 latent / 49 frames, and the native model reads a stored table by token index,
# which equals the 2B's sin-cos positions only at the sample size (a real 2B at 720x480x49; the tiny one at its own).
NATIVE_TWIN_UNET_CONFIG = {
    "image_model": "cogvideox", "num_attention_heads": 3, "attention_head_dim": 64,
    "time_embed_dim": cogvideox_tiny.TINY_TRANSFORMER_CONFIG["time_embed_dim"], "num_layers": 2, "in_channels": 16,
    "patch_size": 2, "text_embed_dim": cogvideox_tiny.T5_D_MODEL, "use_learned_positional_embeddings": True,
    "use_rotary_positional_embeddings": False, "sample_height": cogvideox_tiny.TINY_HEIGHT // 8,
    "sample_width": cogvideox_tiny.TINY_WIDTH // 8, "sample_frames": cogvideox_tiny.TINY_NUM_FRAMES,
}

# diffusers key prefix -> native key prefix (in this order; the rest keep their names).
_DIFFUSERS_TO_NATIVE = (
    (r"transformer_blocks\.(\d+)\.attn1\.to_q\.", r"blocks.\1.q."),
    (r"transformer_blocks\.(\d+)\.attn1\.to_k\.", r"blocks.\1.k."),
    (r"transformer_blocks\.(\d+)\.attn1\.to_v\.", r"blocks.\1.v."),
    (r"transformer_blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.attn_out."),
    (r"transformer_blocks\.(\d+)\.attn1\.norm_q\.", r"blocks.\1.norm_q."),
    (r"transformer_blocks\.(\d+)\.attn1\.norm_k\.", r"blocks.\1.norm_k."),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.", r"blocks.\1.ff_proj."),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2\.", r"blocks.\1.ff_out."),
    (r"transformer_blocks\.(\d+)\.", r"blocks.\1."),
    (r"time_embedding\.linear_(\d)\.", r"time_embedding_linear_\1."),
)


def has_native_cogvideox() -> bool:
    """Feature detection: does the ComfyUI under test have a native CogVideoX? (0.3.75: no.)"""
    import comfy.model_base
    import comfy.model_sampling

    return hasattr(comfy.model_base, "CogVideoX") and hasattr(comfy.model_sampling, "V_PREDICTION_DDPM")


SKIP_REASON = "this ComfyUI has no native CogVideoX (comfy.model_base.CogVideoX; added upstream in 2026)"


def native_key(diffusers_key: str) -> str:
    for pattern, replacement in _DIFFUSERS_TO_NATIVE:
        if re.match(pattern, diffusers_key):
            return re.sub(pattern, replacement, diffusers_key, count=1)
    return diffusers_key


def build_diffusers_transformer(seed: int = 0, full_sample_size: bool = False):
    """The diffusers side of the twin: the tiny 2B transformer at head width 64, random weights. `full_sample_size`:
    the 2B's sample size (its position table then has the shape upstream's file loader expects)."""
    from diffusers import CogVideoXTransformer3DModel

    config = dict(NATIVE_TWIN_TRANSFORMER_CONFIG)
    if full_sample_size:
        config.update(sample_height=60, sample_width=90, sample_frames=49)
    transformer = CogVideoXTransformer3DModel(**config)
    return cogvideox_tiny.randomise_persistent_(transformer, 16 * seed + 5).eval()


def native_state_dict(transformer) -> dict[str, torch.Tensor]:
    """The diffusers transformer's weights under native ComfyUI keys (what a native CogVideoX-2B file holds).

    Includes `patch_embed.pos_embedding`, the 2B's fixed sin-cos table at its sample size (a non-persistent buffer
    in diffusers): upstream's detection reads a file without it as rotary positions (the 5B's), with it as a stored
    table, which at the sample size is exactly the 2B's sin-cos positions.
    """
    state = {native_key(k): v.detach().clone().contiguous() for k, v in transformer.state_dict().items()}
    state["patch_embed.pos_embedding"] = transformer.patch_embed.pos_embedding.detach().clone().contiguous()
    return state


def load_native(state_dict: dict, **unet_config):
    """The native ComfyUI MODEL (a ModelPatcher) with NATIVE_TWIN_UNET_CONFIG (overridden by `unet_config`) and
    these weights, loaded strictly. Upstream's own classes (supported_models.CogVideoX_T2V/I2V, model_base.CogVideoX);
    the file loader's detection is exercised by `load_native_file`."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    config = {**NATIVE_TWIN_UNET_CONFIG, **unet_config}
    config_class = comfy.supported_models.CogVideoX_I2V if config["in_channels"] == 32 else \
        comfy.supported_models.CogVideoX_T2V
    model_config = config_class(config)
    model_config.set_inference_dtype(torch.float32, None)
    base_model = model_config.get_model({})
    base_model.diffusion_model.load_state_dict(state_dict, strict=True)
    base_model.eval()
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(base_model, load_device=device, offload_device=device)


def load_native_file(path):
    """A native file through what UNETLoader calls (detection included)."""
    import comfy.sd

    model = comfy.sd.load_diffusion_model(str(path), model_options={"dtype": torch.float32})
    if model is None:
        raise RuntimeError(f"ComfyUI did not recognise the native CogVideoX file {path}")
    return model


def save_native_file(path, seed: int = 0):
    """A tiny native CogVideoX-2B file as upstream's UNETLoader accepts it (position table at the 2B's size)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(native_state_dict(build_diffusers_transformer(seed, full_sample_size=True)), str(path))
    return path


def diffusers_pipeline(transformer):
    """CogVideoXPipeline around the twin's transformer (the tiny 2B's VAE, tokenizer, T5 and 2B scheduler)."""
    from diffusers import CogVideoXPipeline

    components = cogvideox_tiny.build_tiny_cogvideox(0)
    components["transformer"] = transformer
    pipe = CogVideoXPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def text_embedding(seed: int = 0) -> torch.Tensor:
    """A T5-like context of the 2B's length (226 tokens; diffusers' position table requires exactly that many)."""
    generator = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(1, cogvideox_tiny.MAX_TEXT_SEQ_LENGTH, cogvideox_tiny.T5_D_MODEL, generator=generator)


def tiny_conditioning(text: str) -> list:
    """ComfyUI CONDITIONING for the tiny native 2B, deterministic in the text (a T5 stand-in)."""
    return [[text_embedding(seed=sum((i + 1) * ord(c) for i, c in enumerate(text))), {}]]


def tiny_vae(seed: int = 0):
    """A real ComfyUI CogVideoX VAE object (upstream's `AutoencoderKLCogVideoX`, the architecture its VAELoader
    detects; full width, as the loader builds no other), random weights. ~3 s to decode a tiny clip on a CPU."""
    import comfy.ldm.cogvideo.vae
    import comfy.sd

    from .twins import randomise_

    module = comfy.ldm.cogvideo.vae.AutoencoderKLCogVideoX(latent_channels=cogvideox_tiny.LATENT_CHANNELS)
    randomise_(module, seed)  # ComfyUI's layers start uninitialised (torch.empty): NaN frames otherwise
    return comfy.sd.VAE(sd={k: v.clone() for k, v in module.state_dict().items()})


class TinyCogVideoXCLIP:
    """The part of ComfyUI's CLIP object that CLIPTextEncode-style code (and TDM Distill's prompt encoding) calls,
    returning `tiny_conditioning`: what Load CLIP's `cogvideox` type gives, a 226-token T5 context and no other
    input."""

    patcher = None  # nothing loaded on a device: release_text_encoders has nothing to unload

    def tokenize(self, text, return_word_ids=False, **kwargs):
        return {"text": text}

    def encode_from_tokens_scheduled(self, tokens, unprojected=False, add_dict=None, show_pbar=True):
        return tiny_conditioning(tokens["text"])
