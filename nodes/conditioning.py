"""The teacher's conditioning for a job: every prompt encoded once with the job's CLIP, as ComfyUI's own sampling
encodes it, and the text encoders released from the device afterwards (the job never needs them again)."""

from __future__ import annotations

import math

import torch

from tdm_core import families

from . import family_adapters


def encode_prompts(clip, prompts: list[str], unconditional: str = "", model=None, family: str = "",
                   latent_shape: tuple[int, ...] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """CLIP-encodes each prompt (ComfyUI's CLIPTextEncode path) on the calling thread; "" maps to the
    unconditional prompt's encoding (the trainer's empty-prompt convention). Contexts of different lengths are
    repeated to a common length, as ComfyUI batches them (repeating keys leaves cross-attention unchanged).
    For SDXL and Flux, `model`, `family` and the training `latent_shape` give the other network inputs as ComfyUI's
    sampling builds them (family_adapters.FamilyAdapter.extra_inputs)."""
    texts = list(dict.fromkeys([*prompts, unconditional]))
    encoded = {}
    for text in texts:
        conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(text))
        context, extra = conditioning[0][0], conditioning[0][1]
        with torch.inference_mode(False):
            entry = {"context": context.detach().clone()}
            if family in families.FAMILIES and families.FAMILIES[family].extra_inputs:
                entry.update(family_adapters.adapter(family).extra_inputs(model, extra, context, latent_shape))
                encoded[text] = entry
                continue
            pooled = extra.get("pooled_output")
            if pooled is not None:
                entry["y"] = pooled.detach().clone()
        encoded[text] = entry
    lengths = {e["context"].shape[1] for e in encoded.values()}
    common = math.lcm(*lengths)
    if common > 8 * max(lengths):
        common = max(lengths)  # pathological mixes: pad with zeros instead (masks nothing ComfyUI would not)
    for entry in encoded.values():
        context = entry["context"]
        if context.shape[1] != common:
            with torch.inference_mode(False):
                if common % context.shape[1] == 0:
                    entry["context"] = context.repeat(1, common // context.shape[1], 1)
                else:
                    pad = context.new_zeros(context.shape[0], common - context.shape[1], context.shape[2])
                    entry["context"] = torch.cat([context, pad], dim=1)
    table = {text: encoded[text] for text in prompts}
    table[""] = encoded[unconditional]
    return table


def release_text_encoders(clip) -> int:
    """Unloads the CLIP/T5 models from ComfyUI's device once the prompts are encoded: the job never needs them again
    (SD3's fp16 T5 alone is ~10 GB of VRAM). Returns how many loaded models were unloaded. They stay in ComfyUI's
    cache on the offload device and load again when a prompt encodes text."""
    import comfy.model_management

    patcher = getattr(clip, "patcher", None)
    if patcher is None:
        return 0
    loaded = comfy.model_management.current_loaded_models
    unloaded = 0
    for index in range(len(loaded) - 1, -1, -1):
        entry = loaded[index]
        model = entry.model
        if model is not None and (model is patcher or model.is_clone(patcher)) and entry.model_unload():
            loaded.pop(index)
            unloaded += 1
    if unloaded:
        comfy.model_management.soft_empty_cache()
    return unloaded
