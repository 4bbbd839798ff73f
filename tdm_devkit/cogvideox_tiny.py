"""A tiny diffusers CogVideoX-2b: transformer, VAE, T5 text encoder, tokenizer and scheduler, built offline.

Nothing can be fetched from a model hub here, so every component is made from a config: the layouts, key names and
scheduler of THUDM/CogVideoX-2b at widths that run on two CPU cores. The tokenizer is a SentencePiece unigram model
trained on a few dozen captions and wrapped as transformers' `T5Tokenizer`, the class CogVideoX-2b's folder names.
Weights come from `randomise_` (the harness-wide rule, see `twins.py`) with a seed per component, so every parameter
is random and deterministic; the one non-persistent buffer (the 2b's fixed sin-cos position table, which
`save_pretrained` does not write and loading recomputes) keeps its formula values.

`save_tiny_cogvideox_folder` writes the diffusers folder layout of THUDM/CogVideoX-2b (model_index.json, transformer/,
vae/, text_encoder/, tokenizer/, scheduler/) through `CogVideoXPipeline.save_pretrained`.

One difference from the real folder: the real tokenizer/ holds only `spiece.model`; this one holds `tokenizer.json`.
transformers 5 converts a `spiece.model` with the `protobuf` package, which this environment lacks (without it
`T5Tokenizer.from_pretrained` on a spiece-only folder raises, and `T5Tokenizer(vocab_file=...)` silently yields a
4-token vocabulary).
"""

from __future__ import annotations

import functools
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .twins import randomise_

# THUDM/CogVideoX-2b scheduler/scheduler_config.json (tdm_method.md §3): v-prediction, scaled-linear betas
# 0.00085-0.012, SNR shift 3, zero-terminal-SNR rescale, trailing spacing.
COGVIDEOX_2B_SCHEDULER_CONFIG = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "sample_max_value": 1.0,
    "set_alpha_to_one": True,
    "snr_shift_scale": 3.0,
    "steps_offset": 0,
    "timestep_spacing": "trailing",
    "trained_betas": None,
}

# The 2b's text length: the transformer's sequence is these text tokens followed by the video patches, and the
# pipeline pads/truncates prompts to exactly this many tokens (its `max_sequence_length` default).
MAX_TEXT_SEQ_LENGTH = 226
LATENT_CHANNELS = 16
VAE_SCALING_FACTOR = 1.15258426  # the 2b's
TEMPORAL_COMPRESSION = 4
SPATIAL_COMPRESSION = 8  # 2 ** (len(block_out_channels) - 1), as in the real VAE
PATCH_SIZE = 2

# Tiny sampling geometry: 9 frames (4k+1) of 32x48 pixels -> 3 latent frames of 4x6 -> 2x3 patches per frame,
# 18 video tokens. Height != width and three different latent sizes catch transposed axes.
TINY_NUM_FRAMES = 9
TINY_HEIGHT = 32
TINY_WIDTH = 48

T5_D_MODEL = 40  # deliberately != the transformer's inner width (32), so a text/video width mix-up fails
TRANSFORMER_HEADS = 2
TRANSFORMER_HEAD_DIM = 16

TINY_TRANSFORMER_CONFIG = {
    # CogVideoX-2b transformer/config.json with widths and depth reduced (2b: 30 heads x 64, 30 layers,
    # time_embed_dim 512, text_embed_dim 4096, sample 60x90 latent / 49 frames).
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "attention_head_dim": TRANSFORMER_HEAD_DIM,
    "dropout": 0.0,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": LATENT_CHANNELS,
    "max_text_seq_length": MAX_TEXT_SEQ_LENGTH,
    "norm_elementwise_affine": True,
    "norm_eps": 1e-5,
    "num_attention_heads": TRANSFORMER_HEADS,
    "num_layers": 2,
    "out_channels": LATENT_CHANNELS,
    "patch_size": PATCH_SIZE,
    "sample_frames": TINY_NUM_FRAMES,  # pixel frames, as in the 2b config (49)
    "sample_height": TINY_HEIGHT // SPATIAL_COMPRESSION,  # latent units, as in the 2b config (60)
    "sample_width": TINY_WIDTH // SPATIAL_COMPRESSION,
    "spatial_interpolation_scale": 1.875,
    "temporal_compression_ratio": TEMPORAL_COMPRESSION,
    "temporal_interpolation_scale": 1.0,
    "text_embed_dim": T5_D_MODEL,
    "time_embed_dim": 24,
    "timestep_activation_fn": "silu",
    "use_rotary_positional_embeddings": False,  # 2b: 3-D sin-cos absolute positions (5b: rotary)
    "use_learned_positional_embeddings": False,
}

TINY_VAE_CONFIG = {
    # CogVideoX-2b vae/config.json with widths reduced (2b: block_out_channels 128, 256, 256, 512, 3 layers per
    # block, 32 groups). Four blocks keep the real 8x spatial and 4x temporal compression.
    "act_fn": "silu",
    "block_out_channels": (8, 8, 16, 16),
    "down_block_types": ("CogVideoXDownBlock3D",) * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": LATENT_CHANNELS,
    "latents_mean": None,
    "latents_std": None,
    "layers_per_block": 1,
    "norm_eps": 1e-6,
    "norm_num_groups": 4,
    "out_channels": 3,
    "sample_height": TINY_HEIGHT,
    "sample_width": TINY_WIDTH,
    "scaling_factor": VAE_SCALING_FACTOR,
    "shift_factor": None,
    "temporal_compression_ratio": TEMPORAL_COMPRESSION,
    "up_block_types": ("CogVideoXUpBlock3D",) * 4,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
}

TINY_T5_CONFIG = {
    # T5 v1.1 (google/t5-v1_1-xxl, CogVideoX's text encoder) layout: gated-GELU, untied embeddings, relative
    # attention buckets 32 / distance 128; widths reduced (xxl: d_model 4096, d_kv 64, 64 heads, d_ff 10240,
    # 24 layers). vocab_size is set from the tokenizer.
    "d_model": T5_D_MODEL,
    "d_kv": 8,
    "d_ff": 64,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "dropout_rate": 0.0,
    "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "gated-gelu",
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}

# Captions the tokenizer is trained on; tests may tokenise them and any other text (unknown characters map to <unk>).
TOKENIZER_CORPUS = (
    "a panda playing a guitar in a bamboo forest",
    "a red car driving along a coastal road at sunset",
    "waves crashing on dark rocks under a stormy sky",
    "a cat sleeping on a sunny windowsill",
    "a golden retriever running through a field of flowers",
    "a timelapse of clouds moving over snowy mountains",
    "an astronaut floating inside a space station",
    "a chef slicing vegetables in a busy kitchen",
    "a hummingbird hovering next to a red flower",
    "city lights reflected in a rainy street at night",
    "a sailboat drifting slowly across a calm blue lake",
    "children flying a kite on a windy beach",
    "a steaming cup of coffee on a wooden table",
    "a train passing through a green valley",
    "fireworks exploding over a river in the evening",
    "a close up of a butterfly opening its wings",
    "a horse galloping across an open prairie",
    "an old man reading a newspaper in a park",
    "a robot walking down a futuristic corridor",
    "leaves falling from a tree in autumn",
    "a dog catching a frisbee in slow motion",
    "a waterfall pouring into a deep green pool",
    "a woman painting a landscape on a canvas",
    "a drone shot of a winding river in a canyon",
    "bees collecting pollen from yellow sunflowers",
    "a candle flickering in a dark room",
    "a skateboarder jumping over a set of stairs",
    "snow falling quietly on a small village",
    "a turtle swimming above a colourful coral reef",
    "a musician playing the piano on a stage",
    "a hot air balloon rising over a desert at dawn",
    "rain drops running down a window pane",
    "a fox walking through a snowy forest",
    "a time lapse of a flower blooming",
    "two people dancing in a ballroom",
    "a bicycle leaning against a brick wall",
)
TOKENIZER_VOCAB_SIZE = 160  # reached on this corpus; hard_vocab_limit off lets a smaller corpus stop short


@dataclass(frozen=True)
class FrameGeometry:
    """A valid small sampling size (frames 4k+1, height/width multiples of 16) and its latent shape."""

    num_frames: int
    height: int
    width: int

    @property
    def latent_frames(self) -> int:
        return (self.num_frames - 1) // TEMPORAL_COMPRESSION + 1

    @property
    def latent_height(self) -> int:
        return self.height // SPATIAL_COMPRESSION

    @property
    def latent_width(self) -> int:
        return self.width // SPATIAL_COMPRESSION

    def latent_shape(self, batch: int = 1) -> tuple[int, int, int, int, int]:
        """The pipeline's latent layout: [batch, latent frames, channels, height, width]."""
        return (batch, self.latent_frames, LATENT_CHANNELS, self.latent_height, self.latent_width)

    def video_shape(self, batch: int = 1) -> tuple[int, int, int, int, int]:
        """`output_type="pt"` layout: [batch, frames, 3, height, width], values in [0, 1]."""
        return (batch, self.num_frames, 3, self.height, self.width)

    @property
    def video_tokens(self) -> int:
        return self.latent_frames * (self.latent_height // PATCH_SIZE) * (self.latent_width // PATCH_SIZE)


def tiny_frame_geometry() -> FrameGeometry:
    """9 frames of 32x48: 3 latent frames of 4x6 (also the tiny transformer's default sample size)."""
    return FrameGeometry(TINY_NUM_FRAMES, TINY_HEIGHT, TINY_WIDTH)


@functools.lru_cache(maxsize=1)
def tiny_sentencepiece_model() -> bytes:
    """A serialised SentencePiece unigram model with T5's special ids (<pad> 0, </s> 1, <unk> 2, no <s>).

    Deterministic (one thread, fixed corpus); identity normalisation, so the converted tokenizer needs no
    precompiled character map and matches SentencePiece exactly.
    """
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TOKENIZER_CORPUS),
        model_writer=model,
        model_type="unigram",
        vocab_size=TOKENIZER_VOCAB_SIZE,
        hard_vocab_limit=False,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        normalization_rule_name="identity",
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def sentencepiece_processor():
    """The tokenizer's SentencePiece model itself, as a reference to check `T5Tokenizer` against."""
    import sentencepiece as spm

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "spiece.model")
        Path(path).write_bytes(tiny_sentencepiece_model())
        return spm.SentencePieceProcessor(model_file=path)


def build_tiny_tokenizer():
    """transformers' `T5Tokenizer` (tokenizers-backed in transformers 5) over the trained pieces and scores."""
    from transformers import T5Tokenizer

    processor = sentencepiece_processor()
    vocab = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=MAX_TEXT_SEQ_LENGTH)


def _component_seed(seed: int, index: int) -> int:
    return 16 * seed + index


def randomise_persistent_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """`randomise_` for every parameter and persistent floating buffer; non-persistent buffers (derived tables that
    are not saved and are rebuilt on loading) keep their values."""
    kept = {}
    for module_name, submodule in module.named_modules():
        for buffer_name in submodule._non_persistent_buffers_set:
            buffer = submodule._buffers.get(buffer_name)
            if buffer is not None:
                kept[(module_name, buffer_name)] = buffer.detach().clone()
    randomise_(module, seed)
    with torch.no_grad():
        for (module_name, buffer_name), value in kept.items():
            module.get_submodule(module_name)._buffers[buffer_name].copy_(value)
    return module


def build_tiny_transformer(seed: int = 0):
    from diffusers import CogVideoXTransformer3DModel

    transformer = CogVideoXTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
    return randomise_persistent_(transformer, _component_seed(seed, 0)).eval()


def build_tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKLCogVideoX

    vae = AutoencoderKLCogVideoX(**TINY_VAE_CONFIG)
    return randomise_persistent_(vae, _component_seed(seed, 1)).eval()


def build_tiny_text_encoder(vocab_size: int, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    text_encoder = T5EncoderModel(T5Config(vocab_size=vocab_size, **TINY_T5_CONFIG))
    return randomise_persistent_(text_encoder, _component_seed(seed, 2)).eval()


def build_tiny_scheduler():
    from diffusers import CogVideoXDDIMScheduler

    return CogVideoXDDIMScheduler(**COGVIDEOX_2B_SCHEDULER_CONFIG)


def build_tiny_cogvideox(seed: int = 0) -> dict:
    """The five components CogVideoXPipeline takes, keyed by its argument names; fp32, eval mode, CPU."""
    tokenizer = build_tiny_tokenizer()
    return {
        "tokenizer": tokenizer,
        "text_encoder": build_tiny_text_encoder(len(tokenizer), seed),
        "vae": build_tiny_vae(seed),
        "transformer": build_tiny_transformer(seed),
        "scheduler": build_tiny_scheduler(),
    }


def build_tiny_cogvideox_pipeline(seed: int = 0):
    from diffusers import CogVideoXPipeline

    pipe = CogVideoXPipeline(**build_tiny_cogvideox(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_cogvideox_folder(path: str | os.PathLike, seed: int = 0) -> Path:
    """Writes the THUDM/CogVideoX-2b diffusers folder layout (safetensors) at `path` and returns it."""
    path = Path(path)
    build_tiny_cogvideox_pipeline(seed).save_pretrained(path, safe_serialization=True)
    return path
