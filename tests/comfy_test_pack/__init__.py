"""Test-only ComfyUI node pack: injects tiny models, conditioning and a tiny VAE into graphs.

Installed into the live server's `custom_nodes/` by the test harness (never shipped). Real checkpoints cannot be
downloaded here, so graphs that would start from CheckpointLoaderSimple / CLIPTextEncode start from these nodes
instead; everything downstream (samplers, LoRA loaders, decoders, savers) is the real thing.
"""

import os
import sys

# The repository root, for the development kit (tdm_devkit); appended, so ComfyUI's own `nodes` still wins.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
if _REPO_ROOT not in sys.path:
    sys.path.append(_REPO_ROOT)

from tdm_devkit import cogvideox_native, twins, twins_wan, twins_xl_flux  # noqa: E402

# Wan 2.1 text-to-video stands in for UNETLoader + CLIPLoader (type wan) + VAELoader: its MODEL, umt5-shaped
# conditioning and a narrow real Wan 2.1 VAE (16-channel 3-D latents, decoded causally to 4k + 1 frames).
WAN = "wan21"
FAMILIES = ["sd15", "sd3", "sd35", "sdxl", "flux", WAN]
XL_FLUX_TWINS = {"sdxl": twins_xl_flux.sdxl_twin, "flux": twins_xl_flux.flux_twin}
# Conditioning, CLIP and VAE also stand in for newer ComfyUI's native CogVideoX-2B (its MODEL comes from a real tiny
# file through UNETLoader); only usable where that ComfyUI has native CogVideoX.
TEXT_AND_VAE_FAMILIES = [*FAMILIES, "cogvideox"]


class TDMTestTinyModel:
    DESCRIPTION = "Test only: a tiny diffusion model with the real key layout of the family (random weights)."
    CATEGORY = "tdm_test"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (FAMILIES,), "seed": ("INT", {"default": 0, "min": 0, "max": 2**31, "control_after_generate": True})},
                "optional": {"weights_file": ("STRING", {"default": "", "tooltip": "SDXL/Flux only: a trained toy "
                                                         "teacher's weights (tdm_devkit/toy_latent_teacher.teacher_file)"})}}

    def build(self, family, seed, weights_file=""):
        if family in XL_FLUX_TWINS:
            if weights_file:
                from tdm_devkit import toy_latent_teacher

                return (toy_latent_teacher.teacher_model(family, weights_file, seed),)
            return (XL_FLUX_TWINS[family](seed).comfy,)
        if weights_file:
            raise ValueError(f"weights_file is for the sdxl and flux toy teachers, not {family}")
        if family == WAN:
            return (twins_wan.wan_comfy_model(seed),)
        return (twins.comfy_twin(family, seed).comfy,)


class TDMTestTinyConditioning:
    DESCRIPTION = "Test only: deterministic conditioning of the family's shapes, derived from the text."
    CATEGORY = "tdm_test"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (TEXT_AND_VAE_FAMILIES,),
                             "text": ("STRING", {"multiline": True, "default": ""})}}

    def encode(self, family, text):
        if family == "cogvideox":
            return (cogvideox_native.tiny_conditioning(text),)
        if family == WAN:
            return (twins_wan.tiny_conditioning(text),)
        if family in XL_FLUX_TWINS:  # Flux: no guidance entry, as CLIPTextEncode (FluxGuidance adds it)
            return (twins_xl_flux.tiny_conditioning(family, text),)
        return (twins.tiny_conditioning(family, text),)


class TDMTestTinyVAE:
    DESCRIPTION = "Test only: a real ComfyUI VAE (TAESD architecture) with random weights for the family's latents."
    CATEGORY = "tdm_test"
    RETURN_TYPES = ("VAE",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (TEXT_AND_VAE_FAMILIES,),
                             "seed": ("INT", {"default": 0, "min": 0, "max": 2**31, "control_after_generate": True})}}

    def build(self, family, seed):
        if family == "cogvideox":
            return (cogvideox_native.tiny_vae(seed),)
        if family == WAN:
            return (twins_wan.tiny_vae(seed),)
        return (twins.tiny_vae(family, seed),)


class TinyCLIP:
    """Test only: the part of ComfyUI's CLIP object that CLIPTextEncode-style code uses (`tokenize`,
    `encode_from_tokens_scheduled`), returning the family's deterministic tiny conditioning for a text."""

    def __init__(self, family, seed=0):
        self.family = family
        self.seed = seed

    def tokenize(self, text, return_word_ids=False, **kwargs):
        return {"text": text}

    def _conditioning(self, text):
        if self.family == "cogvideox":
            return cogvideox_native.tiny_conditioning(text)
        if self.family == WAN:
            return twins_wan.tiny_conditioning(text, self.seed)
        if self.family in XL_FLUX_TWINS:
            return twins_xl_flux.tiny_conditioning(self.family, text, self.seed)
        return twins.tiny_conditioning(self.family, text, self.seed)

    def encode_from_tokens_scheduled(self, tokens, unprojected=False, add_dict=None, show_pbar=True):
        return self._conditioning(tokens["text"])

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        context, extra = self._conditioning(tokens["text"])[0]
        return (context, extra.get("pooled_output")) if return_pooled else context


class TDMTestTinyCLIP:
    DESCRIPTION = "Test only: a CLIP stand-in whose encodings match TDMTest_TinyConditioning for the same text."
    CATEGORY = "tdm_test"
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (TEXT_AND_VAE_FAMILIES,)}}

    def build(self, family):
        return (TinyCLIP(family),)


NODE_CLASS_MAPPINGS = {
    "TDMTest_TinyModel": TDMTestTinyModel,
    "TDMTest_TinyConditioning": TDMTestTinyConditioning,
    "TDMTest_TinyVAE": TDMTestTinyVAE,
    "TDMTest_TinyCLIP": TDMTestTinyCLIP,
}
