"""Converting a parsed LoRA into what a model loads: the keys ComfyUI maps onto a MODEL, a peft adapter for a
diffusers model, and the key map of a native ComfyUI CogVideoX.

Separate from reading because every format converts through the one `LoraFile` representation: a new key format
adds nothing here.
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass

import torch

from ..cogvideox_names import cogvideox_diffusers_name
from .keys import comfy_key
from .model import LoraFile
from .wan_names import wan_diffusers_name


def to_comfy_state_dict(lora) -> dict[str, torch.Tensor]:
    """kohya-style tensors under each module's ComfyUI key, alpha always explicit (alpha = scale · r).

    `lora`: a LoraFile, or an iterable of its LoraModules (e.g. only the matched ones)."""
    out = {}
    for module in lora.modules.values() if isinstance(lora, LoraFile) else lora:
        out[f"{module.comfy_key}.lora_up.weight"] = module.up
        out[f"{module.comfy_key}.lora_down.weight"] = module.down
        out[f"{module.comfy_key}.alpha"] = torch.tensor(module.scale * module.rank, dtype=torch.float32)
    return out


# Newer ComfyUI (2026) has a native CogVideoX (`comfy/ldm/cogvideo/model.py`) whose module names differ from
# diffusers' `CogVideoXTransformer3DModel`, which the released TDM LoRA's peft keys name: tdm_core.cogvideox_names
# holds the one table of both.


def cogvideox_native_lora_key_map(native_weight_keys) -> dict[str, str]:
    """LoRA key → weight key for a native CogVideoX model, in the diffusers/peft names the released TDM LoRA uses.

    `native_weight_keys`: the model's state-dict keys (`diffusion_model.blocks.0.q.weight`, ...). ComfyUI's own key
    map knows a native model only by its native names; this adds `transformer.<diffusers path>` for each weight, the
    key `keys.comfy_key` gives a peft module (as ComfyUI maps SD3's diffusers names onto its MMDiT).
    """
    key_map = {}
    for key in native_weight_keys:
        if not (key.startswith("diffusion_model.") and key.endswith(".weight")):
            continue
        diffusers_name = cogvideox_diffusers_name(key[len("diffusion_model."):-len(".weight")])
        if diffusers_name is not None:
            key_map[comfy_key("transformer", diffusers_name)] = key
    return key_map


def wan_native_lora_key_map(native_weight_keys) -> dict[str, str]:
    """LoRA key → weight key for a ComfyUI Wan 2.1 model, in diffusers' names (`transformer.blocks.0.attn1.to_q`),
    which ComfyUI's own key map lacks: it maps native Wan names only (tdm_core.lora.wan_names)."""
    key_map = {}
    for key in native_weight_keys:
        if not (key.startswith("diffusion_model.") and key.endswith(".weight")):
            continue
        diffusers_name = wan_diffusers_name(key[len("diffusion_model."):-len(".weight")])
        if diffusers_name is not None:
            key_map[comfy_key("transformer", diffusers_name)] = key
    return key_map


@dataclass
class PeftAdapter:
    """What peft needs to attach a LoRA to a diffusers model: `LoraConfig(**config)` + `set_peft_model_state_dict`."""

    state_dict: dict[str, torch.Tensor]  # `<module>.lora_A.weight` / `.lora_B.weight`, no component prefix
    config: dict  # r, lora_alpha, target_modules, rank_pattern, alpha_pattern

    def lora_config(self):
        from peft import LoraConfig

        return LoraConfig(**self.config)


def to_peft(lora: LoraFile, component: str = "transformer") -> PeftAdapter:
    """The modules of one component (`transformer`, `unet`, `text_encoder`) as a peft adapter.

    Each module keeps its own scale: the most common (rank, alpha) pair becomes `r`/`lora_alpha`, every other module
    gets an exact-name `rank_pattern`/`alpha_pattern` entry (alpha = scale · r, so rsLoRA and alpha-less files are
    reproduced exactly).
    """
    modules = [m for m in lora.modules.values() if m.component == component]
    if not modules:
        have = sorted({m.component for m in lora.modules.values()})
        raise ValueError(f"'{lora.name}' has no {component} modules (it has: {', '.join(have)})")
    state_dict = {}
    pairs = collections.Counter()
    for module in modules:
        state_dict[f"{module.name}.lora_A.weight"] = module.down
        state_dict[f"{module.name}.lora_B.weight"] = module.up
        pairs[(module.rank, module.scale * module.rank)] += 1
    (r, lora_alpha), _ = pairs.most_common(1)[0]
    rank_pattern, alpha_pattern = {}, {}
    for module in modules:
        # peft matches pattern keys as regexes: re.escape makes the (file's) module name a literal one
        pattern = "^" + re.escape(module.name) + "$"
        if module.rank != r:
            rank_pattern[pattern] = module.rank
        if module.scale * module.rank != lora_alpha:
            alpha_pattern[pattern] = module.scale * module.rank
    config = {
        "r": r,
        "lora_alpha": lora_alpha,
        "target_modules": sorted(m.name for m in modules),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "init_lora_weights": False,
    }
    return PeftAdapter(state_dict, config)
