"""Dotted module paths, as peft, old diffusers and ComfyUI-native keys spell them: which component a path belongs to.

Shared by those three units: they differ in suffixes and in what they do with the path, not in how a path's prefix
(`unet.`, `transformer.`, `diffusion_model.`, ... or none at all) gives its component.
"""

from __future__ import annotations

PEFT_WRAPPER = "base_model.model."  # what peft's PeftModel puts in front of every name
PREFIXES = (  # first match wins
    ("diffusion_model.", "diffusion_model"),
    ("unet.", "unet"),
    ("transformer.", "transformer"),
    ("text_encoder_2.", "text_encoder_2"),
    ("text_encoder.", "text_encoder"),
)
# A path without a prefix: its first part says which model it is from
UNET_ROOTS = ("down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "time_embedding", "add_embedding")
TEXT_ROOTS = ("text_model",)
COMFY_ROOTS = ("input_blocks", "middle_block", "output_blocks", "joint_blocks")  # SGM UNet, MMDiT: ComfyUI's names


def component_and_path(root: str) -> tuple[str, str]:
    """(component, module path) of a dotted key root. diffusers' old attention-processor names are put back to the
    module's own (`attn1.processor.to_q` -> `attn1.to_q`) in every dotted spelling: files converted from them keep
    the `.processor.` part whatever suffixes they were given."""
    stripped = root[len(PEFT_WRAPPER):] if root.startswith(PEFT_WRAPPER) else root
    prefixed = next(((prefix, component) for prefix, component in PREFIXES if stripped.startswith(prefix)), None)
    if prefixed is not None:
        component, name = prefixed[1], stripped[len(prefixed[0]):]
    else:
        first = stripped.split(".")[0]
        if first in UNET_ROOTS:
            component = "unet"
        elif first in TEXT_ROOTS:
            component = "text_encoder"
        elif first in COMFY_ROOTS:
            component = "diffusion_model"
        else:
            component = "transformer"  # SD3, Flux, CogVideoX diffusers transformers have no single root name
        name = stripped
    return component, name.replace(".processor.", ".")
