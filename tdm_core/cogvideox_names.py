"""CogVideoX's module names in the two layouts that hold its weights: diffusers' `CogVideoXTransformer3DModel` (the
released TDM LoRA's peft keys, the diffusers release) and newer ComfyUI's native model (`comfy/ldm/cogvideo`). One
table, read both ways: the LoRA loader maps released keys onto a native model with it, and
`tdm_core.cogvideox_convert` writes the diffusers release as a native file with it."""

from __future__ import annotations

import re

# (native module name, diffusers module name); {n} is a block index. Modules not listed have the same name in both.
_PAIRS = (
    ("blocks.{n}.q", "transformer_blocks.{n}.attn1.to_q"),
    ("blocks.{n}.k", "transformer_blocks.{n}.attn1.to_k"),
    ("blocks.{n}.v", "transformer_blocks.{n}.attn1.to_v"),
    ("blocks.{n}.attn_out", "transformer_blocks.{n}.attn1.to_out.0"),
    ("blocks.{n}.norm_q", "transformer_blocks.{n}.attn1.norm_q"),
    ("blocks.{n}.norm_k", "transformer_blocks.{n}.attn1.norm_k"),
    ("blocks.{n}.ff_proj", "transformer_blocks.{n}.ff.net.0.proj"),
    ("blocks.{n}.ff_out", "transformer_blocks.{n}.ff.net.2"),
    *((f"blocks.{{n}}.{norm}", f"transformer_blocks.{{n}}.{norm}")
      for norm in ("norm1.linear", "norm1.norm", "norm2.linear", "norm2.norm")),
    *((f"{embedding}_embedding_linear_{i}", f"{embedding}_embedding.linear_{i}")
      for embedding in ("time", "ofs") for i in (1, 2)),
    *((name, name) for name in ("patch_embed.proj", "patch_embed.text_proj", "norm_final", "norm_out.linear",
                                "norm_out.norm", "proj_out")),
)


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{n}"), r"(?P<n>\d+)"))


_NATIVE_TO_DIFFUSERS = [(_pattern(native), diffusers) for native, diffusers in _PAIRS]
_DIFFUSERS_TO_NATIVE = [(_pattern(diffusers), native) for native, diffusers in _PAIRS]


def _translate(name: str, table) -> str | None:
    for pattern, template in table:
        match = pattern.fullmatch(name)
        if match:
            return template.replace("{n}", match.groupdict().get("n") or "")
    return None


def cogvideox_diffusers_name(native_name: str) -> str | None:
    """The diffusers module name of a native ComfyUI CogVideoX module name (None if it has no counterpart)."""
    return _translate(native_name, _NATIVE_TO_DIFFUSERS)


def cogvideox_native_name(diffusers_name: str) -> str | None:
    """The native ComfyUI module name of a diffusers CogVideoX module name (None if it has no counterpart)."""
    return _translate(diffusers_name, _DIFFUSERS_TO_NATIVE)
