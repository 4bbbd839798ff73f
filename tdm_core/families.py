"""The model families TDM knows: one entry per family, holding everything about it that does not need ComfyUI.

The model to learn from is ComfyUI's `comfy/supported_models.py` (one class per family holding everything about
it). Here an entry says what the family *is* — its parametrisation, how its LoRA keys are laid out and recognised,
which LoRAs fit its models, the sampling preset its students use, the training recipe and its overrides, the modules
TDM Distill's LoRAs patch, its repeated blocks, the conditioning inputs its network takes, the labels users know —
and `nodes/family_adapters.py` adds the one ComfyUI adapter per family (recognising a MODEL, building its
conditioning). No other product file names a family: they ask this registry (`tests/test_families.py` fails on a
family name written as a string anywhere else). Adding a family: docs/architecture.md, "Adding a model family".

Besides the families, a LoRA or a MODEL can be recognised only as far as a *kind* (`ANY_UNET`: an SD UNet without
SD1.5 or SDXL markers; `OTHER_COGVIDEOX`: native CogVideoX 5B / 1.5 / image-to-video, for which no TDM LoRA exists;
`UNKNOWN`); those have a label and a key layout but nothing TDM can sample or train.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

# -----------------------------------------------------------------------------------------------------------------
# Recognising a LoRA's family from its module paths


@dataclass(frozen=True)
class LoraKeyLayout:
    """The module paths a LoRA patches, split by naming convention (what detection reads)."""

    comfy: tuple[str, ...]  # ComfyUI-native paths (`diffusion_model.<path>` keys)
    diffusers: tuple[str, ...]  # diffusers / peft / kohya paths (unet, transformer)
    cross_attention_dims: frozenset[int] = frozenset()  # in-features of `attn2.to_k` (768: SD1.5, 2048: SDXL)

    def comfy_unet(self) -> list[str]:
        return [n for n in self.comfy if n.startswith(("input_blocks.", "middle_block.", "output_blocks."))]

    def diffusers_unet(self) -> list[str]:
        return [n for n in self.diffusers if n.startswith(("down_blocks.", "up_blocks.", "mid_block."))]

    def diffusers_blocks(self) -> list[str]:
        """diffusers transformer paths, when the file has no UNet paths (a UNet layout wins over a transformer one)."""
        if self.diffusers_unet():
            return []
        return [n for n in self.diffusers if n.startswith("transformer_blocks.")]


_SECOND_TRANSFORMER_BLOCK = re.compile(r"transformer_blocks\.[1-9]")  # SDXL's UNet has several per attention


def _sdxl_diffusers_markers(layout: LoraKeyLayout) -> bool:
    names = layout.diffusers_unet()
    return bool(names) and (any(n.startswith("up_blocks.0.attentions.") for n in names)
                            or any(_SECOND_TRANSFORMER_BLOCK.search(n) for n in names)
                            or 2048 in layout.cross_attention_dims)


def _sd15_diffusers(layout: LoraKeyLayout) -> bool:
    names = layout.diffusers_unet()
    if any(n.startswith(("down_blocks.0.attentions.", "up_blocks.3.attentions.")) for n in names):
        return True
    return bool(names) and 768 in layout.cross_attention_dims and not _sdxl_diffusers_markers(layout)


def _mmdit_diffusers(layout: LoraKeyLayout, dual_attention: bool) -> bool:
    blocks = layout.diffusers_blocks()
    if not any(re.match(r"transformer_blocks\.\d+\.(attn\.|ff_context\.|norm1_context\.)", n) for n in blocks):
        return False
    return any(re.match(r"transformer_blocks\.\d+\.attn2\.", n) for n in blocks) == dual_attention


def _joint_blocks(layout: LoraKeyLayout, dual_attention: bool) -> bool:
    names = [n for n in layout.comfy if n.startswith("joint_blocks.")]
    return bool(names) and any(".x_block.attn2." in n for n in names) == dual_attention


def _cogvideox_diffusers(layout: LoraKeyLayout) -> bool:
    blocks = layout.diffusers_blocks()
    return (any(re.match(r"transformer_blocks\.\d+\.attn1\.", n) for n in blocks)
            and not any(re.match(r"transformer_blocks\.\d+\.attn2\.", n) for n in blocks)
            and not _mmdit_diffusers(layout, False) and not _mmdit_diffusers(layout, True))


# Wan 2.1's linears in its two layouts: native (Wan-AI's release, ComfyUI's module names) and diffusers'
# `WanTransformer3DModel`. Native CogVideoX also has `blocks.N.*` paths, but with the linears directly under the block
# (`blocks.N.q`), and diffusers' CogVideoX/SD3 blocks are `transformer_blocks.N.*`: neither matches these.
_WAN_NATIVE_LINEAR = re.compile(r"blocks\.\d+\.((self_attn|cross_attn)\.(q|k|v|o)|ffn\.[02])")
_WAN_DIFFUSERS_LINEAR = re.compile(r"blocks\.\d+\.((attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)|ffn\.net\.(0\.proj|2))")


def _wan_native(layout: LoraKeyLayout) -> bool:
    return any(_WAN_NATIVE_LINEAR.fullmatch(n) for n in layout.comfy)


def _wan_diffusers(layout: LoraKeyLayout) -> bool:
    return any(_WAN_DIFFUSERS_LINEAR.fullmatch(n) for n in layout.diffusers)


def _never(layout: LoraKeyLayout) -> bool:
    return False


# -----------------------------------------------------------------------------------------------------------------
# The entry


@dataclass(frozen=True)
class RecipeOverride:
    """A training value a family cannot train without, whatever the recipe says, and why."""

    knob: str
    value: object
    why: str


@dataclass(frozen=True)
class Family:
    name: str  # stable id, recorded in LoRA headers (`tdm.family`) and job records: never rename
    label: str  # what users call the model ("SDXL"), in the trainer's messages and docs
    architecture: str  # what its LoRAs patch ("SDXL UNet"), in the LoRA loader's messages
    parametrisation: str  # "eps", "v" or "flow" (tdm_core.schedules)
    # Families whose LoRAs share one key layout (a LoRA of one is recognised as the group when it lacks the markers
    # of any family in it): "unet", "mmdit", or the family itself.
    lora_group: str
    # Recognising its LoRAs: one test on the ComfyUI-native paths, one on diffusers/kohya paths; a family's tests
    # say no to every other family's layout (tests/test_lora_reading.py checks each twin file against all), so for a
    # LoRA of one family the order of the registry does not matter (a file mixing two families' native keys goes to
    # the first in registry order).
    comfy_lora: Callable[[LoraKeyLayout], bool]
    diffusers_lora: Callable[[LoraKeyLayout], bool]
    default_preset: str  # the sampling preset (tdm_core.presets) of its released LoRA, or of its distilled students
    # False where no TDM LoRA was released: the preset samples TDM Distill's students, so the samplers' "auto" takes
    # the preset's solver instead of the release recipe of the parametrisation (SDXL is ε like Dreamshaper, Flux flow
    # like SD3, but their students' solvers were chosen by measuring them).
    released_lora: bool = True
    # Its grid has a shift of its own (Flux: μ from the image size) and its network takes σ itself: only its presets
    # fit its models, and its presets fit no other family's.
    exclusive_presets: bool = False
    also_fits: tuple[str, ...] = ()  # other families whose models its LoRAs patch (SD3's LoRAs: SD3.5-medium too)
    # --- distillation (TDM Distill, headless configs)
    distillable: bool = False
    training_recipe: str = "official_demo"  # tdm_core.recipes: what recipe "auto" trains it with
    recipe_overrides: tuple[RecipeOverride, ...] = ()
    # The modules TDM Distill's student and fake-score LoRAs patch, by ComfyUI module name (the exported LoRA uses the
    # same names, so ComfyUI's LoraLoader maps every key).
    lora_targets: tuple[str, ...] = ()
    # Its repeated blocks (ComfyUI attribute names), which gradient checkpointing recomputes; and whether they add
    # to their input tensors in place (the checkpoint then hands them copies).
    repeated_blocks: tuple[str, ...] = ()
    blocks_update_inputs_in_place: bool = False
    # Network inputs besides the text context, as ComfyUI's `extra_conds` builds them (the adapter builds them).
    extra_inputs: tuple[str, ...] = ()
    pooled_as_y: bool = False  # the text encoder's pooled output is the network's `y` as it is (SD3/SD3.5)
    # Guidance-distilled (Flux-dev): its guidance is a network input, so the teacher's target is one pass (cfg 1).
    guidance_distilled: bool = False
    # Its samples are clips (a time axis in the latent): TDM Distill's `frames` input applies to it.
    video: bool = False
    notes: dict = field(default_factory=dict)

    def fits_lora_of(self, lora_family: str) -> bool:
        return lora_family == self.name or self.name in getattr(FAMILIES.get(lora_family), "also_fits", ())


# ComfyUI's UNet transformer blocks use diffusers' names (to_q, ...), as does the diffusers reference backend.
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
# ComfyUI's MMDiT (SD3/SD3.5): the joint blocks' attention (fused qkv), output projections and MLPs; SD3.5's dual
# attention (`attn2`) too.
MMDIT_TARGETS = ("attn.qkv", "attn.proj", "attn2.qkv", "attn2.proj", "mlp.fc1", "mlp.fc2")
# ComfyUI's Flux: the double blocks' image and text attention (fused qkv, output) and MLPs, and the single blocks'
# fused qkv+MLP input and output projections — the layers diffusers' Flux LoRAs patch, in ComfyUI's names.
FLUX_TARGETS = ("img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2",
                "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2", "linear1", "linear2")
UNET_BLOCKS = ("input_blocks", "middle_block", "output_blocks")
# ComfyUI's Wan 2.1 (comfy/ldm/wan/model.py): each block's self- and cross-attention projections and its FFN, the
# layers diffusers' Wan LoRA loader converts (`attn1`/`attn2` to_q/k/v/out, `ffn.net.0.proj`/`ffn.net.2`).
# Newer ComfyUI's native CogVideoX (comfy/ldm/cogvideo/model.py): each block's joint-attention projections and its
# FFN, the linears the released TDM CogVideoX-2B LoRA patches (diffusers' attn1.to_q/k/v/out.0, ff.net.0.proj/2).
COGVIDEOX_TARGETS = ("q", "k", "v", "attn_out", "ff_proj", "ff_out")
WAN_TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
               "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")

_FAMILY_LIST = (
    Family(
        name="sd15", label="SD1.5 family", architecture="SD1.5 UNet", parametrisation="eps", lora_group="unet",
        comfy_lora=lambda layout: any(n.startswith(("input_blocks.1.1.", "input_blocks.2.1."))
                                      for n in layout.comfy_unet()),
        diffusers_lora=_sd15_diffusers, default_preset="dreamshaper",
        distillable=True, lora_targets=UNET_TARGETS, repeated_blocks=UNET_BLOCKS),
    Family(
        name="sdxl", label="SDXL", architecture="SDXL UNet", parametrisation="eps", lora_group="unet",
        comfy_lora=lambda layout: any(_SECOND_TRANSFORMER_BLOCK.search(n) for n in layout.comfy_unet()),
        diffusers_lora=_sdxl_diffusers_markers, default_preset="sdxl", released_lora=False,
        # equal rates, decayed (tdm_core/recipes.py: measured on the SDXL and Flux toys)
        distillable=True, training_recipe="official_demo_equal_rates_cosine", lora_targets=UNET_TARGETS,
        repeated_blocks=UNET_BLOCKS, extra_inputs=("y",)),
    Family(
        name="sd3", label="SD3-medium", architecture="SD3 MMDiT", parametrisation="flow", lora_group="mmdit",
        comfy_lora=lambda layout: _joint_blocks(layout, False),
        diffusers_lora=lambda layout: _mmdit_diffusers(layout, False), default_preset="sd3", also_fits=("sd35",),
        # Flow-Factory's rates, τ and LoRA shape on the demo's optimiser, the last step only, cosine-decayed, the
        # student's moving average saved (tdm_core/recipes.py: measured on the SD3-family toys)
        distillable=True, training_recipe="official_demo_ff_tau_lora_last_cosine_ema", lora_targets=MMDIT_TARGETS,
        repeated_blocks=("joint_blocks",), pooled_as_y=True),
    Family(
        name="sd35", label="SD3.5-medium", architecture="SD3.5 MMDiT (dual attention)", parametrisation="flow",
        lora_group="mmdit", comfy_lora=lambda layout: _joint_blocks(layout, True),
        diffusers_lora=lambda layout: _mmdit_diffusers(layout, True), default_preset="sd35",
        # Flow-Factory's rates, τ and LoRA shape on the demo's optimiser, the last step only, cosine-decayed, the
        # student's moving average saved (tdm_core/recipes.py: measured on the SD3-family toys)
        distillable=True, training_recipe="official_demo_ff_tau_lora_last_cosine_ema", lora_targets=MMDIT_TARGETS,
        repeated_blocks=("joint_blocks",), pooled_as_y=True),
    Family(
        name="flux", label="Flux-dev", architecture="Flux transformer", parametrisation="flow", lora_group="flux",
        comfy_lora=lambda layout: any(n.startswith(("double_blocks.", "single_blocks.")) for n in layout.comfy),
        diffusers_lora=_never, default_preset="flux", released_lora=False, exclusive_presets=True,
        # equal rates, decayed, the fake score on the output, averaged (tdm_core/recipes.py: measured on the Flux toy)
        distillable=True, training_recipe="official_demo_equal_rates_cosine_fake_output_ema", lora_targets=FLUX_TARGETS,
        repeated_blocks=("double_blocks", "single_blocks"),
        blocks_update_inputs_in_place=True, extra_inputs=("y", "guidance"), guidance_distilled=True,
        recipe_overrides=(RecipeOverride("cfg", 1.0, "Flux-dev is guidance-distilled: its guidance is an input, not "
                                                      "a second pass"),)),
    Family(
        name="cogvideox", label="CogVideoX-2B", architecture="CogVideoX transformer", parametrisation="v",
        lora_group="cogvideox", video=True,
        comfy_lora=lambda layout: any(re.match(r"blocks\.\d+\.(q|k|v|attn_out|ff_proj|ff_out)$", n)
                                      for n in layout.comfy),  # newer ComfyUI's native CogVideoX
        diffusers_lora=_cogvideox_diffusers, default_preset="cogvideox",
        exclusive_presets=True,  # the 2B's own schedule: SNR shift 3, zero terminal SNR
        # A teacher only as newer ComfyUI's native CogVideoX (0.3.75 has none: nodes/family_adapters.py refuses and
        # names the headless diffusers-folder teacher); its students sample with the released LoRA's preset.
        distillable=True, lora_targets=COGVIDEOX_TARGETS, repeated_blocks=("blocks",)),
    # Wan 2.1 text-to-video, 1.3B and 14B (one layout, different widths). No TDM LoRA was released: TDM Distill makes
    # its students. Its grid is the flow shift of Wan's own sampling (presets.py, "wan21"), hence exclusive: SD3's
    # shift-6 presets do not sample it, and its shift-8 preset samples no SD3 model.
    Family(
        name="wan21", label="Wan 2.1 T2V", architecture="Wan 2.1 text-to-video transformer",
        parametrisation="flow", lora_group="wan21", comfy_lora=_wan_native, diffusers_lora=_wan_diffusers,
        default_preset="wan21", released_lora=False, exclusive_presets=True, video=True,
        distillable=True, lora_targets=WAN_TARGETS, repeated_blocks=("blocks",)),
)

#: Every family by name, oldest model first (the order lists and docs show them in).
FAMILIES: dict[str, Family] = {family.name: family for family in _FAMILY_LIST}
# For the code that serves one family only (the CogVideoX pipeline, the diffusers reference backend, the adapters).
SD15, SDXL, SD3, SD35 = FAMILIES["sd15"], FAMILIES["sdxl"], FAMILIES["sd3"], FAMILIES["sd35"]
FLUX, COGVIDEOX, WAN21 = FAMILIES["flux"], FAMILIES["cogvideox"], FAMILIES["wan21"]

# Kinds a LoRA or MODEL can be recognised as without being a family TDM serves.
ANY_UNET = "unet"
OTHER_COGVIDEOX = "cogvideox_other"
OTHER_WAN = "wan_other"
UNKNOWN = "unknown"
KIND_LABELS = {
    ANY_UNET: "Stable Diffusion UNet (SD1.5 or SDXL)",
    # Native CogVideoX of newer ComfyUI at 5B width, CogVideoX 1.5 (temporal patches) or image-to-video: no TDM LoRA
    # was released for these.
    OTHER_COGVIDEOX: "CogVideoX 5B / 1.5 / image-to-video transformer (no released TDM LoRA)",
    # Every Wan MODEL ComfyUI loads that is not Wan 2.1 text-to-video: image-to-video and first-last-frame, VACE,
    # Fun control and camera, HuMo, Wan 2.2 (the TI2V 5B, the A14B image-to-video experts, S2V, Animate), causal
    # (autoregressive) variants. TDM Distill refuses them (nodes/family_adapters.py says which one it saw).
    OTHER_WAN: "Wan image-to-video / VACE / Fun / camera / Wan 2.2 / other Wan variant (not Wan 2.1 text-to-video)",
    UNKNOWN: "unknown model",
}


def get(name: str) -> Family | None:
    return FAMILIES.get(name)


def architecture(name: str) -> str:
    """What a family's (or kind's) LoRAs patch, for messages; an unknown name is repeated as it is."""
    family = FAMILIES.get(name)
    return family.architecture if family is not None else KIND_LABELS.get(name, name)


def is_known(name: str) -> bool:
    """A family or a recognised kind (what a LoRA header may record as `tdm.family`)."""
    return name in FAMILIES or name in KIND_LABELS


def lora_group(name: str) -> str:
    family = FAMILIES.get(name)
    return family.lora_group if family is not None else name


def lora_fits(lora_family: str, model_family: str) -> bool:
    """Whether a LoRA recognised as `lora_family` can patch a model of `model_family`: the same family, a family
    whose LoRAs also fit it (SD3 → SD3.5), or a generic SD UNet LoRA on either UNet. Unknown on either side is left
    to key matching."""
    if UNKNOWN in (lora_family, model_family):
        return True
    if lora_group(lora_family) != lora_group(model_family):
        return False
    if ANY_UNET in (lora_family, model_family):
        return True
    model = FAMILIES.get(model_family)
    return lora_family == model_family or (model is not None and model.fits_lora_of(lora_family))


def presets_fit(preset_family: str, model_family: str) -> bool:
    """Whether a preset of `preset_family` may sample a `model_family` MODEL of its parametrisation: always, unless
    either family's grid is its own (`exclusive_presets`), when the two must be the same family."""
    exclusive = any(getattr(FAMILIES.get(name), "exclusive_presets", False) for name in (preset_family, model_family))
    return preset_family == model_family or not exclusive


def detect_lora(layout: LoraKeyLayout) -> str:
    """The family (or kind) a LoRA's module paths were made for: ComfyUI-native paths first, then diffusers paths;
    a UNet layout without a family's markers is `ANY_UNET`."""
    if not layout.comfy and not layout.diffusers:
        return UNKNOWN
    for test, unet_names in (("comfy_lora", layout.comfy_unet), ("diffusers_lora", layout.diffusers_unet)):
        for family in FAMILIES.values():
            if getattr(family, test)(layout):
                return family.name
        if unet_names():
            return ANY_UNET
    return UNKNOWN


# The video families' VAEs (Wan 2.1, CogVideoX) keep a clip's first frame alone and pack each further 4 into a latent
# frame: a clip of F frames is (F − 1)/4 + 1 latent frames, and F must be 4k + 1.
VIDEO_TEMPORAL_COMPRESSION = 4


def video_latent_frames(frames: int) -> int:
    """Latent frames of a `frames`-frame clip of a video family; ValueError unless frames is 4k + 1."""
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1 or (frames - 1) % VIDEO_TEMPORAL_COMPRESSION:
        raise ValueError(f"frames must be 4k + 1 (1, 5, 9, …, 33, …, 49, …): the video VAE keeps the first frame, "
                         f"then packs {VIDEO_TEMPORAL_COMPRESSION} per latent frame; got {frames!r}")
    return (frames - 1) // VIDEO_TEMPORAL_COMPRESSION + 1


def distillable() -> list[Family]:
    return [family for family in FAMILIES.values() if family.distillable]


def distillable_families_text() -> str:
    """'sd15 (SD1.5 family), sdxl (SDXL), …', for refusals."""
    return ", ".join(f"{family.name} ({family.label})" for family in distillable())


def distillable_labels_text() -> str:
    """'SD1.5 family, SDXL, SD3-medium, SD3.5-medium or Flux-dev', for prose."""
    labels = [family.label for family in distillable()]
    return ", ".join(labels[:-1]) + " or " + labels[-1]
