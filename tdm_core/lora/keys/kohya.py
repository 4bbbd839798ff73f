"""kohya keys: `lora_unet_<module path with '_'>.lora_down.weight / .lora_up.weight / .alpha`; `lora_te[12]_*` for
the text encoders, `lora_transformer_*` (OneTrainer SD3).

A kohya name is a module path with every '.' replaced by '_', so path parts that contain '_' themselves are put back
together from a vocabulary (`kohya_name_to_path`). The key itself is what ComfyUI maps, so it is kept as the
module's ComfyUI key. The released Dreamshaper TDM LoRA and TDM Distill's `kohya` export use it. Fixture writer:
tdm_devkit.lora_files.write_kohya.
"""

from __future__ import annotations

from .base import Location

NAME = "kohya"
SUFFIXES = (
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
)
PREFIXES = (  # first match wins: lora_te1_ before lora_te_
    ("lora_unet_", "unet"),
    ("lora_transformer_", "transformer"),  # OneTrainer SD3
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te_", "text_encoder"),
)
SGM_ROOTS = ("input_blocks", "middle_block", "output_blocks")  # SDXL kohya files name ComfyUI's UNet, not diffusers'

# Path parts that contain '_': diffusers and ComfyUI/SGM names of the UNet, MMDiT, CogVideoX and CLIP. Longest
# (most '_') first, so `single_transformer_blocks` wins over `transformer_blocks`.
_COMPOUND_PARTS = sorted(
    {
        "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "single_transformer_blocks", "to_q", "to_k",
        "to_v", "to_out", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "proj_in", "proj_out", "proj_mlp",
        "ff_context", "norm1_context", "norm_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out",
        "conv_norm_out", "time_embedding", "linear_1", "linear_2", "add_embedding", "context_embedder",
        "time_text_embed", "timestep_embedder", "text_embedder", "pos_embed", "patch_embed", "norm_q", "norm_k",
        "norm_added_q", "norm_added_k", "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj",
        "final_layer_norm", "layer_norm1", "layer_norm2", "input_blocks", "output_blocks", "middle_block",
        "in_layers", "out_layers", "emb_layers", "skip_connection", "time_embed", "label_emb", "joint_blocks",
        "context_block", "x_block", "adaLN_modulation", "final_layer", "x_embedder", "t_embedder", "y_embedder",
        "time_proj", "text_proj", "embedding_proj", "ofs_embedding", "norm_final", "ff_proj", "ff_out", "attn_out",
    },
    key=lambda s: -s.count("_"),
)
_COMPOUND_TOKENS = [tuple(p.split("_")) for p in _COMPOUND_PARTS]


def kohya_name_to_path(flat: str) -> str:
    """`down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q` -> `down_blocks.0.attentions.0....attn1.to_q`."""
    tokens = flat.split("_")
    parts, i = [], 0
    while i < len(tokens):
        for compound in _COMPOUND_TOKENS:
            if tuple(tokens[i : i + len(compound)]) == compound:
                parts.append("_".join(compound))
                i += len(compound)
                break
        else:
            parts.append(tokens[i])
            i += 1
    return ".".join(parts)


def claims(root: str) -> bool:
    return root.startswith(tuple(prefix for prefix, _ in PREFIXES))


def locate(root: str, spelled: str) -> Location:
    """The format label is the suffixes' (a `lora_unet_*` key spelt `lora_A/B` reads as peft, as it always has)."""
    prefix, component = next((p, c) for p, c in PREFIXES if root.startswith(p))
    name = kohya_name_to_path(root[len(prefix):])
    if component == "unet" and name.split(".")[0] in SGM_ROOTS:
        component = "diffusion_model"  # an SGM path is a ComfyUI path
    return Location(component, name, root, spelled)
