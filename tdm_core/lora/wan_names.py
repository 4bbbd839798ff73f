"""Wan 2.1's module names in its two layouts: native (the Wan-AI release, Comfy-Org's repackaged files, ComfyUI's
`comfy/ldm/wan/model.py`) and diffusers' `WanTransformer3DModel`, for the modules a LoRA patches (the linears).

ComfyUI's LoRA key map knows a Wan MODEL by native names only, so a diffusers-layout Wan LoRA
(`transformer.blocks.0.attn1.to_q.lora_A.weight`, what diffusers' and most trainers' peft exports write) needs the
diffusers name of each native module (`wan_native_lora_key_map`). The renames are those of diffusers' own converter
(`diffusers.loaders.single_file_utils.convert_wan_transformer_to_diffusers`); tests/test_wan.py checks every linear of
the twin against it. Only string operations touch the names.
"""

from __future__ import annotations

# Inside block N: native module path → diffusers module path.
_BLOCK = {
    **{f"self_attn.{p}": f"attn1.{d}" for p, d in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))},
    **{f"cross_attn.{p}": f"attn2.{d}" for p, d in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"),
                                                    ("k_img", "add_k_proj"), ("v_img", "add_v_proj"))},
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
# Outside the blocks.
_TOP = {
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "patch_embedding": "patch_embedding",
}


def wan_diffusers_name(native_name: str) -> str | None:
    """The diffusers module name of a native Wan module name (None for a module no LoRA patches)."""
    if native_name in _TOP:
        return _TOP[native_name]
    parts = native_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() and parts[2] in _BLOCK:
        return f"blocks.{parts[1]}.{_BLOCK[parts[2]]}"
    return None
