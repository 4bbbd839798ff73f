"""A twin tiny Wan 2.1 text-to-video transformer: the same random weights as a ComfyUI WAN21 MODEL and as diffusers'
`WanTransformer3DModel`.

The ComfyUI twin is loaded the way UNETLoader loads a `models/diffusion_models` file: a native state dict (the
layout of the Wan-AI release and of Comfy-Org's repackaged files) through `comfy.sd.load_diffusion_model_state_dict`,
whose detection reads the widths from the weights. That detection fixes what a tiny twin may change: heads of 128
channels (`num_heads = dim // 128`), a 256-wide time embedding and a 4096-wide text input (umt5-xxl's width: the text
embedding's input is not read from the file), so the twin is narrow in `dim`, `ffn_dim` and depth only.

Neither ComfyUI 0.3.75 nor 0.33.0 converts a diffusers-layout Wan transformer (`comfy.model_detection.
convert_diffusers_mmdit` knows AuraFlow, PixArt, Flux and SD3; `comfy.lora` maps no diffusers Wan LoRA names), so
the diffusers twin is made with diffusers' own converter of the native layout
(`diffusers.loaders.single_file_utils.convert_wan_transformer_to_diffusers`, what `from_single_file` runs): each side's
layout comes from that side's code, never from a table written here.
"""

from __future__ import annotations

import torch

from . import comfy_runtime
from .twins import Twin, randomise_

comfy_runtime.bootstrap()

import comfy.ldm.wan.model  # noqa: E402
import comfy.ops  # noqa: E402
import comfy.sd  # noqa: E402

WAN_LATENT_CHANNELS = 16
WAN_TEXT_DIM = 4096  # umt5-xxl; ComfyUI's detection does not read it from the file
WAN_FREQ_DIM = 256  # ComfyUI's detection fixes it
WAN_HEAD_DIM = 128  # ComfyUI's detection: num_heads = dim // 128
# Wan 2.1 1.3B: dim 1536 (12 heads), ffn 8960, 30 blocks; 14B: 5120 (40 heads), 13824, 40 blocks. Two heads, two
# blocks here (two blocks: gradient checkpointing and LoRA keys see more than one index).
WAN_TINY = {"dim": 2 * WAN_HEAD_DIM, "ffn_dim": 384, "num_layers": 2}
# The text length of the tiny conditioning. ComfyUI's umt5 tokenizer pads every prompt to 512 tokens and zeroes the
# padded positions' outputs (`min_length=512`, `zero_out_masked`), as diffusers' WanPipeline pads its prompt embeds
# with zeros to `max_sequence_length` 512: the tiny conditioning has the same shape, at 16 tokens.
WAN_TINY_TEXT_LEN = 16


def wan_native_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The tiny transformer's weights under the native (Wan-AI / ComfyUI) names, deterministic random values."""
    network = comfy.ldm.wan.model.WanModel(
        model_type="t2v", patch_size=(1, 2, 2), in_dim=WAN_LATENT_CHANNELS, out_dim=WAN_LATENT_CHANNELS,
        dim=WAN_TINY["dim"], ffn_dim=WAN_TINY["ffn_dim"], num_layers=WAN_TINY["num_layers"],
        num_heads=WAN_TINY["dim"] // WAN_HEAD_DIM, freq_dim=WAN_FREQ_DIM, text_dim=WAN_TEXT_DIM, qk_norm=True,
        cross_attn_norm=True, eps=1e-6, operations=comfy.ops.disable_weight_init)
    randomise_(network, seed)
    return {key: value.detach().clone() for key, value in network.state_dict().items()}


def wan_diffusers_transformer(native: dict[str, torch.Tensor]):
    """diffusers' WanTransformer3DModel holding `native`'s weights, converted by diffusers' own single-file code."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=WAN_TINY["dim"] // WAN_HEAD_DIM, attention_head_dim=WAN_HEAD_DIM,
        in_channels=WAN_LATENT_CHANNELS, out_channels=WAN_LATENT_CHANNELS, text_dim=WAN_TEXT_DIM,
        freq_dim=WAN_FREQ_DIM, ffn_dim=WAN_TINY["ffn_dim"], num_layers=WAN_TINY["num_layers"], cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6)
    converted = convert_wan_transformer_to_diffusers({k: v.clone() for k, v in native.items()})
    transformer.load_state_dict(converted, strict=True)
    return transformer.eval()


def diffusers_key_map(native_keys) -> dict[str, str]:
    """diffusers key → native key, as diffusers' converter renames each native key."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    return convert_wan_transformer_to_diffusers({key: key for key in native_keys})


def wan_twin(seed: int = 0, dtype: torch.dtype | None = None) -> Twin:
    """The tiny Wan 2.1 T2V transformer as ComfyUI's UNETLoader loads it (`dtype`: its weight dtype option) and as
    diffusers holds it."""
    native = wan_native_state_dict(seed)
    transformer = wan_diffusers_transformer(native)
    options = {} if dtype is None else {"dtype": dtype}
    patcher = comfy.sd.load_diffusion_model_state_dict(dict(native), model_options=options)
    if patcher is None:
        raise AssertionError("ComfyUI did not recognise the tiny Wan 2.1 transformer")
    return Twin("wan21", patcher, transformer, diffusers_key_map(native))


def tiny_text_embedding(text: str, seed: int = 0) -> torch.Tensor:
    """A deterministic stand-in for umt5-xxl as ComfyUI's Wan CLIP returns it: [1, WAN_TINY_TEXT_LEN, 4096], the
    prompt's tokens (one per word plus the end token, at most the length) followed by zeros (ComfyUI zeroes the
    padded positions' outputs)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + sum((i + 1) * ord(c) for i, c in enumerate(text)))
    tokens = min(len(text.split()) + 1, WAN_TINY_TEXT_LEN)
    context = torch.zeros(1, WAN_TINY_TEXT_LEN, WAN_TEXT_DIM)
    context[:, :tokens] = torch.randn(1, tokens, WAN_TEXT_DIM, generator=generator)
    return context


def tiny_conditioning(text: str, seed: int = 0) -> list:
    """ComfyUI CONDITIONING as CLIPTextEncode gives it with a Wan CLIP (CLIPLoader type `wan`): umt5 has no pooled
    output, so the dict holds `pooled_output` None, as ComfyUI's encoder returns it."""
    return [[tiny_text_embedding(text, seed), {"pooled_output": None}]]


class TinyWanCLIP:
    """The part of ComfyUI's CLIP object that CLIPTextEncode-style code calls, returning `tiny_conditioning`."""

    patcher = None  # nothing loaded on a device: release_text_encoders has nothing to unload

    def __init__(self, seed: int = 0):
        self.seed = seed

    def tokenize(self, text, return_word_ids=False, **kwargs):
        return {"text": text}

    def encode_from_tokens_scheduled(self, tokens, unprojected=False, add_dict=None, show_pbar=True):
        return tiny_conditioning(tokens["text"], self.seed)


def wan_comfy_model(seed: int = 0):
    """The ComfyUI side of `wan_twin` alone (a MODEL as UNETLoader returns it), without building diffusers' copy: what
    the test pack injects in place of UNETLoader."""
    patcher = comfy.sd.load_diffusion_model_state_dict(wan_native_state_dict(seed), model_options={})
    if patcher is None:
        raise AssertionError("ComfyUI did not recognise the tiny Wan 2.1 transformer")
    return patcher


# The tiny Wan 2.1 VAE's base width. The real one is 96 (`decoder.head.0.gamma` of wan_2.1_vae.safetensors);
# ComfyUI's VAE reads the width from that key and fixes everything else (16 latent channels, dim_mult [1, 2, 4, 4],
# the causal 4× temporal and 8× spatial compression), so a narrow one has the real layout and the real frame counts.
WAN_TINY_VAE_DIM = 8


def tiny_vae(seed: int = 0):
    """A real ComfyUI Wan 2.1 VAE object (`comfy.ldm.wan.vae.WanVAE`, which VAELoader detects from the
    `decoder.middle.0.residual.0.gamma` key) at a narrow width, random weights: it decodes [B, 16, T, h, w] to
    (T − 1)·4 + 1 frames of 8h × 8w, causally, as wan_2.1_vae.safetensors does."""
    import comfy.ldm.wan.vae

    module = comfy.ldm.wan.vae.WanVAE(dim=WAN_TINY_VAE_DIM, z_dim=WAN_LATENT_CHANNELS, dim_mult=[1, 2, 4, 4],
                                      num_res_blocks=2, attn_scales=[], temperal_downsample=[False, True, True],
                                      dropout=0.0)
    randomise_(module, seed)  # ComfyUI's layers start uninitialised (torch.empty): NaN frames otherwise
    return comfy.sd.VAE(sd={k: v.detach().clone() for k, v in module.state_dict().items()})
