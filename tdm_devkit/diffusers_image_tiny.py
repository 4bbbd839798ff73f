"""Tiny diffusers image pipelines saved as model folders, built offline: SD1.5 (`StableDiffusionPipeline`), SDXL
(`StableDiffusionXLPipeline`) and SD3/SD3.5-medium (`StableDiffusion3Pipeline`, without its optional T5), each with
its real component layout (model_index.json, unet/ or transformer/, text encoders, tokenizers, VAE, scheduler) at
widths that run on two CPU cores, random weights.

The CLIP tokenizer is CLIP's own vocabulary as ComfyUI ships it (comfy/sd1_tokenizer/), so no hub download is needed;
the text encoders keep CLIP's vocabulary size (49408) for it, at tiny widths.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .comfy_runtime import comfyui_dir

TEXT_WIDTH = 32  # each tiny CLIP text encoder's hidden size (SDXL's UNet then attends to 2 × 32)


def _tokenizer():
    from transformers import CLIPTokenizer

    folder = comfyui_dir() / "comfy" / "sd1_tokenizer"
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def _text_encoder(seed: int, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=TEXT_WIDTH, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, projection_dim=TEXT_WIDTH, max_position_embeddings=77)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _vae(seed: int, channels: int = 4, flow: bool = False):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    extra = {"shift_factor": 0.0609, "scaling_factor": 1.5305} if flow else {}
    return AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=channels,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, **extra).eval()


def save_sd15_folder(path: Path, seed: int = 0) -> Path:
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                cross_attention_dim=TEXT_WIDTH, attention_head_dim=4, norm_num_groups=8).eval()
    # SD1.5's own scheduler settings (its scheduler_config.json)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=_vae(seed), text_encoder=_text_encoder(seed, False), tokenizer=_tokenizer(),
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path)
    return Path(path)


def save_sdxl_folder(path: Path, seed: int = 0) -> Path:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    time_dim = 8
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                attention_head_dim=(2, 4), use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                                transformer_layers_per_block=(1, 2), cross_attention_dim=2 * TEXT_WIDTH,
                                projection_class_embeddings_input_dim=TEXT_WIDTH + 6 * time_dim,
                                norm_num_groups=8).eval()
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=_vae(seed), text_encoder=_text_encoder(seed, False),
                                     text_encoder_2=_text_encoder(seed + 1, True), tokenizer=_tokenizer(),
                                     tokenizer_2=_tokenizer(), unet=unet, scheduler=scheduler)
    pipe.save_pretrained(path)
    return Path(path)


def save_sd3_folder(path: Path, seed: int = 0, sd35: bool = False) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                                        caption_projection_dim=32, pooled_projection_dim=2 * TEXT_WIDTH,
                                        pos_embed_max_size=16, dual_attention_layers=(0,) if sd35 else (),
                                        qk_norm="rms_norm" if sd35 else None).eval()
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=_vae(seed, 16, flow=True), text_encoder=_text_encoder(seed, True),
                                    tokenizer=_tokenizer(), text_encoder_2=_text_encoder(seed + 1, True),
                                    tokenizer_2=_tokenizer(), text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(path)
    return Path(path)


def save_wan_folder(path: Path, seed: int = 0) -> Path:
    """Wan 2.1 text-to-video (`WanPipeline`): a tiny transformer, umt5 encoder, Wan VAE and the flow scheduler. The
    tokenizer is the offline SentencePiece one of the tiny CogVideoX folder (a T5 tokenizer, as umt5's is)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from .cogvideox_tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                          num_heads=4, relative_attention_num_buckets=8)).eval()
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=16, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32).eval()
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=encoder, transformer=transformer, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0))
    pipe.save_pretrained(path)
    return Path(path)


def save_flux_folder(path: Path, seed: int = 0) -> Path:
    """Flux-dev (`FluxPipeline`, guidance-distilled: the transformer has a guidance embedding): a tiny transformer,
    CLIP-L (pooled) and T5 (context) encoders, a 16-channel VAE and the flow scheduler. The T5 tokenizer is the offline
    SentencePiece one of the tiny CogVideoX folder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from .cogvideox_tiny import build_tiny_tokenizer

    t5_tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                 num_heads=4, relative_attention_num_buckets=8)).eval()
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=TEXT_WIDTH, guidance_embeds=True,
                                         axes_dims_rope=(4, 4, 8)).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=_vae(seed, 16, flow=True), text_encoder=_text_encoder(seed, False),
                        tokenizer=_tokenizer(), text_encoder_2=t5, tokenizer_2=t5_tokenizer, transformer=transformer)
    pipe.save_pretrained(path)
    return Path(path)
