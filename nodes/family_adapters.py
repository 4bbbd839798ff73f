"""The ComfyUI side of each model family: recognising it in a MODEL, and building what its network needs.

`tdm_core.families` says what a family is (ComfyUI-free); here each family has one adapter for what needs ComfyUI's
objects: which MODELs are of it (`matches`), whether TDM Distill can train it, the network inputs besides the text
context as ComfyUI's own sampling builds them, what its blocks need to train, and its own noise table where the
MODEL's is not the one it was made with. The generic adapter serves every family whose registry entry says enough;
a family with a quirk overrides one method. Nodes ask `model_family(model)` and `adapter(family)`; they never branch
on a family's name.

**TDM on a guidance-distilled teacher (Flux-dev).** TDM's target is the teacher's *guided* score,
r = r_u + s (r_c − r_u). Flux-dev was itself distilled from a CFG teacher into one pass that takes the guidance scale
as an input, so its single pass at guidance g already is that guided score: the target is that pass (cfg must be 1,
no second, unconditional pass), and g is the conditioning's guidance. The fake score models the *student's*
distribution, which is the distribution of samples made under guidance g, so it sees the same g (as every other
conditioning input), and so does the student; at sampling time the student is used with the same g. The three
networks share the base weights and its guidance embedding; only the LoRAs differ.
"""

from __future__ import annotations

import comfy.model_base
import comfy.model_sampling
import torch

from tdm_core import families, schedules
from tdm_core.distill import DiscreteSchedule
from tdm_core.distill.grids import flux_schedule
from tdm_core.families import Family
from tdm_core.lora import cogvideox_native_lora_key_map, wan_native_lora_key_map

from .training_network import comfy_training_flag

PARAMETRISATION_LABELS = {"flow": "rectified flow", "eps": "ε-prediction", "v": "v-prediction"}


class FamilyAdapter:
    """A family as ComfyUI holds it. `config_names` / `config_prefixes`: the names (or name beginnings) of ComfyUI's
    `supported_models` classes whose MODELs are this family."""

    def __init__(self, family: Family, config_names: tuple[str, ...] = (), config_prefixes: tuple[str, ...] = ()):
        self.family = family
        self.config_names = config_names
        self.config_prefixes = config_prefixes

    def available(self) -> bool:
        """Whether this ComfyUI can load the family as a MODEL at all."""
        return True

    def unavailable_note(self) -> str:
        """Where this ComfyUI cannot load the family: what to use instead, for TDM Distill's refusals."""
        return ""

    def matches(self, model) -> bool:
        name = type(model.model.model_config).__name__
        return name in self.config_names or (bool(self.config_prefixes) and name.startswith(self.config_prefixes))

    def check_distillable(self, model, cfg: float | None = None) -> None:
        """Refuses a MODEL of a distillable family that TDM Distill still cannot train (or a teacher guidance it
        cannot use); nothing to refuse by default."""

    def extra_inputs(self, model, extra: dict, context: torch.Tensor,
                     latent_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """The network inputs besides the context for one CLIP encoding (`extra` is its conditioning dict), as
        ComfyUI's `encode_model_conds` builds them (`model.model.extra_conds`) for a latent of `latent_shape`
        (C, H, W): SDXL's `y` (pooled text embedding + six size/crop embeddings, width/height defaulting to the
        latent size × 8 as ComfyUI does), Flux's `y` (pooled CLIP-L) and `guidance` (FluxGuidance's; 3.5 default)."""
        keys = self.family.extra_inputs
        if not keys:
            return {}
        channels, height, width = (int(s) for s in latent_shape)
        params = dict(extra)
        params.update(device=torch.device("cpu"), noise=torch.zeros(1, channels, height, width), cross_attn=context,
                      prompt_type=params.get("prompt_type", "positive"))
        params.setdefault("width", width * 8)  # ComfyUI's defaults: the latent size in pixels
        params.setdefault("height", height * 8)
        built = model.model.extra_conds(**params)
        missing = [key for key in keys if key not in built]
        if missing:
            raise ValueError(f"ComfyUI built no {missing[0]!r} input for this {self.family.label} MODEL from the "
                             "CLIP's conditioning (a CLIP without pooled output?); load the model's own text encoders")
        return {key: built[key].cond.detach().clone() for key in keys}

    def prepare_for_training(self, network: torch.nn.Module) -> int:
        """Makes the family's network trainable through its blocks; returns how many modules were adapted."""
        return 0

    def training_latent_shape(self, model, width: int, height: int, frames: int | None = None) -> tuple[int, ...]:
        """One training latent (no batch dimension) for an image of width × height: (C, H/8, W/8). Image families
        have no frames; a `frames` value is ignored."""
        return _image_latent_shape(model, width, height)

    def lora_key_aliases(self, model) -> dict[str, str]:
        """LoRA keys → weight keys the family's released LoRAs use that ComfyUI's own key map lacks."""
        return {}

    def training_schedule(self, latent_shape: tuple[int, ...] | None) -> DiscreteSchedule | None:
        """The family's own training table, or None to use the MODEL's model_sampling table."""
        return None

    def sampling_alphas_cumprod(self):
        """The ᾱ table the family's presets are sampled on where it is not the MODEL's own, else None."""
        return None


class _MMDiTAdapter(FamilyAdapter):
    """SD3 and SD3.5-medium are one ComfyUI model class; SD3.5's dual-attention layers tell them apart."""

    def __init__(self, family: Family, dual_attention: bool):
        super().__init__(family)
        self.dual_attention = dual_attention

    def matches(self, model) -> bool:
        base = model.model
        return isinstance(base, comfy.model_base.SD3) and \
            bool(base.model_config.unet_config.get("x_block_self_attn_layers")) == self.dual_attention


class _FluxAdapter(FamilyAdapter):
    """Flux-dev: guidance-distilled, a resolution-dependent shift, and blocks that add to their inputs in place."""

    # ComfyUI's Flux blocks update their residual stream in place (`x += gate * out`) after a LayerNorm has saved that
    # same tensor for its backward pass, which autograd refuses once a gradient flows through the block (the student
    # update). These norms are given a copy of their input while gradients are recorded; sampling is unaffected.
    INPLACE_RESIDUAL_NORMS = ("pre_norm", "img_norm1", "img_norm2", "txt_norm1", "txt_norm2")

    def check_distillable(self, model, cfg: float | None = None) -> None:
        params = getattr(model.model.diffusion_model, "params", None)
        if not getattr(params, "guidance_embed", False):
            raise ValueError("this Flux MODEL has no guidance input (Flux-schnell or a de-distilled Flux): TDM "
                             "distillation supports Flux-dev; Flux-schnell already samples in 1–4 steps")
        if cfg is not None and float(cfg) != 1.0:
            raise ValueError(f"cfg is {cfg:g}, but Flux-dev is guidance-distilled: its guidance is the conditioning's "
                             "`guidance` (FluxGuidance, 3.5 by default), not a second, unconditional pass. Set cfg "
                             "to 1")

    def prepare_for_training(self, network: torch.nn.Module) -> int:
        _flag_training_while_recording_gradients(network)
        count = 0
        for name, module in network.named_modules():
            if name.rsplit(".", 1)[-1] in self.INPLACE_RESIDUAL_NORMS and not getattr(module, "_tdm_copies_input",
                                                                                       False):
                forward = module.forward

                def copying_forward(x, *args, _forward=forward, **kwargs):
                    return _forward(x.clone() if torch.is_grad_enabled() else x, *args, **kwargs)

                module.forward = copying_forward
                module._tdm_copies_input = True
                count += 1
        return count

    def training_schedule(self, latent_shape: tuple[int, ...] | None) -> DiscreteSchedule:
        """Flux's own table at the training size (tdm_core/distill/grids.flux_schedule), not the single shift stored on
        the MODEL."""
        if latent_shape is None:
            raise ValueError("Flux's schedule depends on the latent size; give the training width and height")
        return flux_schedule(latent_shape)


class _VideoAdapter(FamilyAdapter):
    """A video family: its training latent is a clip, [C, latent frames, H/8, W/8], `frames` long (its
    DEFAULT_FRAMES for a record without one); tdm_core.families.video_latent_frames holds the 4k + 1 rule."""

    DEFAULT_FRAMES = 33

    def training_latent_shape(self, model, width: int, height: int, frames: int | None = None) -> tuple[int, ...]:
        latent_frames = families.video_latent_frames(self.DEFAULT_FRAMES if frames is None else int(frames))
        return int(model.model.latent_format.latent_channels), latent_frames, height // 8, width // 8


class _CogVideoXAdapter(_VideoAdapter):
    """Newer ComfyUI's native CogVideoX (0.3.75 has none): the 2B only, sampled and trained on the 2B's own schedule.

    As a teacher: a video latent [16, (frames − 1)/4 + 1, H/8, W/8] (the network takes ComfyUI's [B, C, T, H, W] and
    permutes it itself), the 2B's ᾱ table (SNR shift 3, zero terminal SNR) instead of the MODEL's shift-1 table, the
    raw VP state as input (V_PREDICTION_DDPM's `calculate_input` is the identity, which is the state the trainer
    builds). The conditioning is ComfyUI's as it is: `CogVideoX.extra_conds` builds `c_crossattn` (T5-XXL, padded to
    226 tokens by Load CLIP's `cogvideox` type) and, for the 16-channel text-to-video 2B, nothing else (no
    `c_concat`, no `ofs`), so the generic text-context path feeds the network what ComfyUI's sampling does.
    """

    DEFAULT_FRAMES = 49  # the 2B's own clip (13 latent frames), at its size 720×480

    def available(self) -> bool:
        return hasattr(comfy.model_base, "CogVideoX")

    def unavailable_note(self) -> str:
        return ("CogVideoX-2B is a MODEL teacher only on a ComfyUI with native CogVideoX (newer than 0.3.75: Load "
                "Diffusion Model + Load CLIP type cogvideox + Load VAE); on this ComfyUI connect TDM CogVideoX Loader "
                "(lora_name none) to TDM Distill's cogvideox input instead of model and clip")

    def training_latent_shape(self, model, width: int, height: int, frames: int | None = None) -> tuple[int, ...]:
        shape = super().training_latent_shape(model, width, height, frames)
        _check_stored_positions(model, shape, self.DEFAULT_FRAMES if frames is None else int(frames), width, height)
        return shape

    def training_schedule(self, latent_shape: tuple[int, ...] | None) -> DiscreteSchedule:
        # The table the cogvideox preset samples on (sampling_alphas_cumprod): the student trains at the noise levels
        # it is later sampled at, not at the native MODEL's shift-1 levels.
        return DiscreteSchedule.cogvideox()

    def matches(self, model) -> bool:
        return native_cogvideox_variant(model) == self.family.name

    def lora_key_aliases(self, model) -> dict[str, str]:
        # ComfyUI knows its native CogVideoX only by native names; the released LoRA uses diffusers/peft names.
        return cogvideox_native_lora_key_map(model.model_state_dict().keys())

    def sampling_alphas_cumprod(self):
        # The 2B's schedule (SNR shift 3, zero terminal SNR), not the native model's table (SNR shift 1).
        return schedules.cogvideox_alphas_cumprod()


class _WanAdapter(_VideoAdapter):
    """Wan 2.1 text-to-video (1.3B, 14B): a video latent, and diffusers-named LoRAs mapped onto its native names.

    The conditioning is ComfyUI's as it is: WAN21.extra_conds builds `c_crossattn` (the umt5 context, every prompt
    padded to 512 tokens with zeroed outputs) and, for a 16-channel text-to-video network, nothing else (no
    `c_concat`, no CLIP-vision `clip_fea`), so the generic text-context path is exactly what ComfyUI's sampling feeds
    the network; the negative prompt is the teacher's CFG unconditional (TDM Distill's `unconditional_prompt`).
    """

    # For a record without frames: ComfyUI's Wan 2.1 text-to-video example's 33 frames, 9 latent frames (Wan's own
    # 81 frames are 2.3× the tokens of 33), TDM Distill's frames default.
    DEFAULT_FRAMES = 33

    def matches(self, model) -> bool:
        return wan_variant(model)[0] == self.family.name

    def prepare_for_training(self, network: torch.nn.Module) -> int:
        # Newer ComfyUI's Wan attention applies its rotary embedding with Flux's `apply_rope1`, the fused kernel
        # without a backward unless `in_training` is set (as for Flux, below).
        return _flag_training_while_recording_gradients(network)

    def lora_key_aliases(self, model) -> dict[str, str]:
        # ComfyUI maps no diffusers-layout Wan LoRA name (`transformer.blocks.N.attn1.to_q`, ...), only native ones.
        return wan_native_lora_key_map(model.model_state_dict().keys())


def _check_stored_positions(model, shape: tuple[int, ...], frames: int, width: int, height: int) -> None:
    """Refuses a CogVideoX training size the native MODEL gives wrong positions at. A 2B file carries its sin-cos
    position table at its sample size (60×90 latent, 13 latent frames: 720×480, 49 frames), and ComfyUI's native
    network reads that table by token index (`CogVideoXPatchEmbed.forward`): the 2B's positions at its own width and
    height and for any clip up to its length (frames are the table's outer axis), scrambled at any other width or
    height (diffusers recomputes them there; ComfyUI does not), and a shape error past its length."""
    embed = getattr(model.model.diffusion_model, "patch_embed", None)
    if embed is None or not getattr(embed, "use_learned_positional_embeddings", False):
        return  # positions computed for the size at hand: every size is the model's own
    _, latent_frames, latent_height, latent_width = shape
    table_frames = (int(embed.sample_frames) - 1) // int(embed.temporal_compression_ratio) + 1
    sample_width, sample_height = int(embed.sample_width) * 8, int(embed.sample_height) * 8
    if (latent_height, latent_width) != (int(embed.sample_height), int(embed.sample_width)) or \
            latent_frames > table_frames:
        raise ValueError(f"this CogVideoX-2B MODEL can be trained at {sample_width}×{sample_height} with up to "
                         f"{int(embed.sample_frames)} frames, not {width}×{height} with {frames}: ComfyUI's native "
                         "CogVideoX reads the file's stored position table by token index, which holds the 2B's "
                         "positions only at its own size. Set width "
                         f"{sample_width}, height {sample_height} and frames ≤ {int(embed.sample_frames)}")


def _flag_training_while_recording_gradients(network: torch.nn.Module) -> int:
    """Newer ComfyUI computes Flux's (and Wan's) rotary embedding with a fused kernel that has no backward; its own
    LoRA trainer switches to the plain-torch formula (same maths) through `model_management.in_training`. That flag
    is process-wide, so it is set only for the duration of a forward that records gradients (the student update).
    Returns 1 where it wrapped the network's forward, 0 where there was nothing to do (already wrapped, or 0.3.75)."""
    import comfy.model_management as model_management

    if not hasattr(model_management, "in_training") or getattr(network, "_tdm_training_flag", False):
        return 0  # ComfyUI 0.3.75: plain torch only
    network._tdm_training_flag = True
    forward = network.forward

    def forward_with_training_flag(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        with comfy_training_flag(True):
            return forward(*args, **kwargs)

    network.forward = forward_with_training_flag
    return 1


ADAPTERS: dict[str, FamilyAdapter] = {adapter.family.name: adapter for adapter in (
    FamilyAdapter(families.SD15, config_names=("SD15",)),
    # SDXL and the distilled SDXL UNets ComfyUI loads with SDXL's layout.
    FamilyAdapter(families.SDXL, config_prefixes=("SDXL", "SSD1B", "Segmind_Vega", "KOALA")),
    _MMDiTAdapter(families.SD3, dual_attention=False),
    _MMDiTAdapter(families.SD35, dual_attention=True),
    # Text-to-image Flux (not Kontext, Chroma, Flux 2, inpainting); Flux-schnell is refused by check_distillable.
    _FluxAdapter(families.FLUX, config_names=("Flux", "FluxSchnell")),
    _CogVideoXAdapter(families.COGVIDEOX),
    _WanAdapter(families.WAN21),
)}
# MODELs recognised only as a kind (tdm_core.families): SD2.x UNets take SD1.5-layout LoRAs of their own width.
_ANY_UNET_CONFIG_PREFIXES = ("SD20", "SD21")
assert set(ADAPTERS) == set(families.FAMILIES), "every family in tdm_core.families needs its adapter here"


def adapter(family: str) -> FamilyAdapter:
    try:
        return ADAPTERS[family]
    except KeyError:
        raise ValueError(f"no model family {family!r}; known: {', '.join(ADAPTERS)}") from None


# ---------------------------------------------------------------------------------------------------------------
# Recognising a MODEL


def native_cogvideox_variant(model) -> str | None:
    """The CogVideoX family for newer ComfyUI's native CogVideoX-2B, the `OTHER_COGVIDEOX` kind for its 5B / 1.5 /
    image-to-video models, None for anything else (and always on ComfyUI versions without a native CogVideoX)."""
    native = getattr(comfy.model_base, "CogVideoX", None)
    if native is None or not isinstance(model.model, native):
        return None
    config = model.model.model_config.unet_config
    # The 2B is the 30-head (1920-wide) text-to-video model with sin-cos positions and no temporal patches; upstream's
    # own rule for the 2B-vs-5B latent format is the same head count (supported_models.CogVideoX_T2V). Upstream reads
    # a file without `patch_embed.pos_embedding` as rotary positions (the 5B's), which the 2B's weights do not fit.
    is_2b = (config.get("num_attention_heads", 0) < 48 and config.get("patch_size_t") is None
             and config.get("in_channels", 16) == 16 and not config.get("ofs_embed_dim")
             and not config.get("use_rotary_positional_embeddings"))
    return families.COGVIDEOX.name if is_2b else families.OTHER_COGVIDEOX


# ComfyUI's Wan configs (comfy/supported_models.py) that are not Wan 2.1 text-to-video, as users know them.
_WAN_VARIANTS = {
    "WAN21_I2V": "Wan 2.1 image-to-video / first-last-frame", "WAN21_FunControl2V": "Wan 2.1 Fun control",
    "WAN21_Camera": "Wan 2.1 Fun camera", "WAN22_Camera": "Wan 2.2 Fun camera", "WAN21_Vace": "Wan VACE",
    "WAN21_HuMo": "Wan HuMo", "WAN22_S2V": "Wan 2.2 S2V (speech-to-video)", "WAN22_Animate": "Wan 2.2 Animate",
    "WAN22_T2V": "Wan 2.2 TI2V 5B", "WAN21_CausalAR_T2V": "causal (autoregressive) Wan 2.1",
}
WAN_OUT_OF_SCOPE = ("TDM Distill trains Wan 2.1 text-to-video (1.3B, 14B) only; image-to-video and first-last-frame, "
                    "VACE, Fun control and camera, HuMo, S2V, Animate, causal variants, Wan 2.2 TI2V 5B and Wan 2.2 "
                    "A14B's two-expert setups are out")


def wan_variant(model) -> tuple[str | None, str]:
    """(families.WAN21's name, "") for ComfyUI's Wan 2.1 text-to-video MODEL; (families.OTHER_WAN, what it is) for
    every other Wan MODEL; (None, "") for anything else.

    Wan 2.1 T2V is ComfyUI's WAN21_T2V config on the WAN21 model class itself (subclasses are VACE, camera, HuMo, Wan
    2.2, ...) with 16 input and output channels. The channels matter: ComfyUI's detection gives a 36-channel file
    without CLIP-vision weights (Wan 2.2 A14B image-to-video) model_type t2v and the WAN21_T2V config. Wan 2.2 A14B's
    *text-to-video* experts have Wan 2.1 14B's layout exactly and load as WAN21_T2V: nothing in a MODEL tells them
    apart, so TDM Distill would train one expert as if it were a whole Wan 2.1 model (docs/architecture.md)."""
    wan = getattr(comfy.model_base, "WAN21", None)
    base = model.model
    if wan is None or not isinstance(base, wan):
        return None, ""
    config_name = type(base.model_config).__name__
    unet = base.model_config.unet_config
    in_dim, out_dim = int(unet.get("in_dim", 16)), int(unet.get("out_dim", 16))
    if type(base) is wan and config_name == "WAN21_T2V" and unet.get("model_type") == "t2v" and in_dim == out_dim == 16:
        return families.WAN21.name, ""
    if config_name == "WAN21_T2V" and in_dim != 16:
        what = f"a {in_dim}-channel Wan image-to-video model (Wan 2.2 A14B image-to-video expert)"
    else:
        what = _WAN_VARIANTS.get(config_name, f"{config_name} (model_type {unet.get('model_type')!r})")
    return families.OTHER_WAN, what


def model_family(model) -> str:
    """The tdm_core.families name of a ComfyUI MODEL, or the kind it is recognised as (`families.UNKNOWN` for
    models TDM has no LoRA format for)."""
    if native_cogvideox_variant(model) == families.OTHER_COGVIDEOX:
        return families.OTHER_COGVIDEOX
    if wan_variant(model)[0] == families.OTHER_WAN:
        return families.OTHER_WAN
    for family_adapter in ADAPTERS.values():
        if family_adapter.matches(model):
            return family_adapter.family.name
    if type(model.model.model_config).__name__.startswith(_ANY_UNET_CONFIG_PREFIXES):
        return families.ANY_UNET
    return families.UNKNOWN


def is_native_vp_model(model_sampling) -> bool:
    """Newer ComfyUI's V_PREDICTION_DDPM (native CogVideoX): v-prediction on the unscaled VP state. Feature-detected:
    ComfyUI 0.3.75 has no such class."""
    raw_vp = getattr(comfy.model_sampling, "V_PREDICTION_DDPM", None)
    return raw_vp is not None and isinstance(model_sampling, raw_vp)


def model_parametrisation(model_sampling) -> str:
    """"flow", "eps" or "v" for a MODEL's `model_sampling` (the class name for anything else)."""
    if isinstance(model_sampling, comfy.model_sampling.CONST):
        return "flow"
    if is_native_vp_model(model_sampling):
        return "v"
    if isinstance(model_sampling, comfy.model_sampling.V_PREDICTION):
        return "v"
    if isinstance(model_sampling, comfy.model_sampling.EPS):
        return "eps"
    return type(model_sampling).__name__


def training_latent_shape(model, family: str, width: int, height: int, frames: int | None = None) -> tuple[int, ...]:
    """TDM Distill's training latent (no batch dimension) for a `family` MODEL: its adapter decides (an image's
    (C, H/8, W/8); Wan's (C, T, H/8, W/8) with T from `frames`, or its default length)."""
    family_adapter = ADAPTERS.get(family)
    if family_adapter is None:  # a kind, refused before training starts: the image latent its checks are given
        return _image_latent_shape(model, width, height)
    return family_adapter.training_latent_shape(model, width, height, frames)


def _image_latent_shape(model, width: int, height: int) -> tuple[int, ...]:
    return int(model.model.latent_format.latent_channels), height // 8, width // 8


def describe_model(model) -> str:
    parametrisation = model_parametrisation(model.get_model_object("model_sampling"))
    config = getattr(model.model, "model_config", None)
    name = type(config).__name__ if config is not None else type(model.model).__name__
    return f"{name} ({PARAMETRISATION_LABELS.get(parametrisation, parametrisation)})"


def check_distillable(model, family: str, cfg: float | None = None) -> None:
    """Refuses, before anything is copied or encoded, a MODEL the trainer cannot distil, naming what would work;
    with `cfg`, also a teacher guidance the family cannot train with."""
    if family == families.OTHER_WAN:
        raise ValueError(f"TDM distillation does not support this MODEL: {wan_variant(model)[1]} "
                         f"({describe_model(model)}). {WAN_OUT_OF_SCOPE}. Load a Wan 2.1 T2V model "
                         f"(wan2.1_t2v_1.3B / 14B) with UNETLoader; supported families: "
                         f"{families.distillable_families_text()}")
    if family == families.OTHER_COGVIDEOX:
        raise ValueError(f"TDM distillation does not support this MODEL: a CogVideoX 5B, 1.5 or image-to-video model "
                         f"({describe_model(model)}). TDM Distill trains CogVideoX-2B text-to-video only (load "
                         f"cogvideox_2b.safetensors with Load Diffusion Model); supported families: "
                         f"{families.distillable_families_text()}")
    if family not in ADAPTERS or not families.FAMILIES[family].distillable:
        config = type(model.model.model_config).__name__
        # A distillable family this ComfyUI cannot load as a MODEL (CogVideoX on 0.3.75) says what to use instead.
        notes = "".join(f". {a.unavailable_note()}" for a in ADAPTERS.values()
                        if a.family.distillable and not a.available() and a.unavailable_note())
        raise ValueError(f"TDM distillation does not support this MODEL: family {family!r} ({config}); supported "
                         f"families: {families.distillable_families_text()}{notes}")
    ADAPTERS[family].check_distillable(model, cfg)
