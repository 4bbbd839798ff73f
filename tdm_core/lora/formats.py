"""LoRA key formats: recognising them, the model family a LoRA was made for, and converting between them.

Every released TDM LoRA format is read into one representation (`LoraFile`: a set of `LoraModule`s, each a low-rank
pair `up @ down` with its scale, named by the module path it patches) and written back out as

- keys ComfyUI maps onto a MODEL (`comfy_key` of each module): ComfyUI 0.3.75 maps kohya `lora_unet_*` names and SD3
  `transformer.*` peft names but not plain peft/diffusers SD1.5 names (`unet.down_blocks...attn1.to_q`: it only knows
  the old `processor.to_q` spelling), so UNet modules are always emitted as kohya names;
- a peft adapter (`to_peft`): state dict + LoraConfig arguments, for diffusers models (the CogVideoX path).

Formats (docs/tdm_method.md §4):
  peft / diffusers   `<prefix>.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r]; prefix `unet.`,
                     `transformer.`, `text_encoder(_2).`, `base_model.model.` or none; alpha from `.alpha` keys or the
                     diffusers header metadata (`lora_adapter_metadata`), otherwise scale 1.
  kohya              `lora_unet_<module path with '_'>.lora_down.weight / .lora_up.weight / .alpha`; `lora_te[12]_*`.
  old diffusers      `<module>.lora.down.weight / .lora.up.weight`, `...processor.to_q_lora.down.weight`.
  ComfyUI native     `diffusion_model.<ComfyUI module path>.lora_down/lora_up(.weight)/.alpha` (or lora_A/B).
"""

from __future__ import annotations

import collections
import math
import re
from dataclasses import dataclass, field

import torch

from .. import families, validation
from ..cogvideox_names import cogvideox_diffusers_name
from ..presets import PRESETS, student_solver
from ..recipes import RECIPES
from ..schedules import parse_timesteps
from ..solvers import SOLVERS
from .files import LoraFileError

# --------------------------------------------------------------------------------------------------------------
# Families: tdm_core.families holds what each family's LoRAs look like and which models they fit.

# The family (or kind) a LoRA was made for, from its key layout: the tdm_core.families names.
family_name = families.architecture
family_group = families.lora_group
families_compatible = families.lora_fits


# --------------------------------------------------------------------------------------------------------------
# Module representation

MODEL_COMPONENTS = ("unet", "transformer", "diffusion_model")
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")


@dataclass
class LoraModule:
    """One low-rank update `ΔW = scale · up @ down` (reshaped to the weight for convolutions)."""

    component: str  # "unet", "transformer", "diffusion_model" (ComfyUI-native names), "text_encoder(_2)"
    name: str  # dotted module path inside the component (diffusers names; ComfyUI names for "diffusion_model")
    down: torch.Tensor  # [r, in] or [r, in, kh, kw]
    up: torch.Tensor  # [out, r] or [out, r, 1, 1]
    alpha: float | None  # as stated by the file (key or metadata); None: scale 1 (the peft default alpha = r)
    scale: float  # alpha / r (alpha / sqrt(r) for rsLoRA), 1.0 without alpha
    comfy_key: str  # the LoRA key ComfyUI's key map knows this module by
    source_keys: tuple = ()

    @property
    def id(self) -> str:
        return f"{self.component}.{self.name}"

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])

    @property
    def in_numel(self) -> int:
        return int(math.prod(self.down.shape[1:]))

    def delta(self, strength: float = 1.0, weight_shape: tuple | None = None) -> torch.Tensor:
        """strength · scale · up @ down, in float32, reshaped to `weight_shape` when given."""
        diff = self.up.flatten(1).float() @ self.down.flatten(1).float()
        diff = diff * (strength * self.scale)
        return diff.reshape(weight_shape) if weight_shape is not None else diff

    def fits(self, weight_shape: tuple) -> bool:
        return (
            len(weight_shape) >= 2
            and weight_shape[0] == self.out_features
            and math.prod(weight_shape[1:]) == self.in_numel
        )


@dataclass
class LoraFile:
    """A parsed LoRA: its modules, the format and family they reveal, the header metadata."""

    name: str
    format: str  # "peft", "kohya", "diffusers_old", "comfy" (ComfyUI-native); "mixed: a+b" if several
    family: str  # a tdm_core.families name (or kind: families.ANY_UNET, UNKNOWN, ...)
    modules: dict[str, LoraModule]  # by LoraModule.id
    metadata: dict[str, str] = field(default_factory=dict)
    unrecognised_keys: list[str] = field(default_factory=list)

    @property
    def model_modules(self) -> list[LoraModule]:
        return [m for m in self.modules.values() if m.component in MODEL_COMPONENTS]

    @property
    def text_encoder_modules(self) -> list[LoraModule]:
        return [m for m in self.modules.values() if m.component in TEXT_COMPONENTS]

    @property
    def ranks(self) -> collections.Counter:
        return collections.Counter(m.rank for m in self.modules.values())

    @property
    def rank(self) -> int:
        """The most common rank."""
        return self.ranks.most_common(1)[0][0]

    @property
    def alphas(self) -> collections.Counter:
        return collections.Counter(m.alpha for m in self.modules.values())

    @property
    def alpha(self) -> float | None:
        """The most common stated alpha (None: the file states none, scale 1)."""
        return self.alphas.most_common(1)[0][0]

    @property
    def target_modules(self) -> list[str]:
        """The distinct module kinds patched (last path parts, e.g. `attn.to_q`, `ff.net.0.proj`)."""
        return sorted({module_kind(m.name) for m in self.modules.values()})

    @property
    def recorded_strength(self) -> float | None:
        value = self.metadata.get(TDM_METADATA_STRENGTH)
        try:
            return validation.number_text(value, TDM_METADATA_STRENGTH, lo=-MAX_STRENGTH,
                                          hi=MAX_STRENGTH) if value is not None else None
        except validation.ValidationError:
            return None  # parse_lora refuses such a file; a LoraFile built by hand just has no recorded strength

    @property
    def recorded_preset(self) -> str | None:
        return self.metadata.get(TDM_METADATA_PRESET) or None

    @property
    def trained_here(self) -> bool:
        """Whether TDM Distill wrote this LoRA (its `tdm.format_note`, tdm_core.distill.trainer.export_metadata)."""
        return self.metadata.get("tdm.format_note", "").startswith("trained by comfyui-tdm")

    @property
    def recorded_solver(self) -> str | None:
        """The solver a LoRA that TDM Distill wrote says its student is sampled with; None when the file records
        none, or a name that is not one of tdm_core.solvers' (header values are untrusted). Students written before
        `tdm.solver` existed get their family's choice from the preset and parametrisation they record."""
        value = self.metadata.get(TDM_METADATA_SOLVER)
        if value is not None:
            return value if value in SOLVERS else None
        parametrisation = self.metadata.get("tdm.parametrisation")
        if self.trained_here and parametrisation in ("eps", "v", "flow"):
            return student_solver(self.metadata.get("tdm.sampler_preset", ""), parametrisation)
        return None

    @property
    def recorded_grid(self) -> tuple[str, str | tuple[int, ...]] | None:
        """The grid a student TDM Distill trained is sampled on, from its header (untrusted, so checked):
        ("preset", name) for a preset's grid, ("timesteps", (t_0, …)) for a grid of no preset on an ε/v model (the
        training demo's, say: schedule indices, at most 64, strictly descending in [0, 999]); None for any other
        file, or a value that does not check."""
        if not self.trained_here:
            return None
        preset = self.metadata.get("tdm.sampler_preset", "")
        if preset in PRESETS:
            return ("preset", preset)
        text = self.metadata.get("tdm.timesteps", "")
        if self.metadata.get("tdm.parametrisation") not in ("eps", "v") or not 0 < len(text) <= 400:
            return None
        try:
            timesteps = parse_timesteps(text)
        except ValueError:
            return None
        return ("timesteps", timesteps) if len(timesteps) <= 64 else None

    def trained_recipe(self) -> str | None:
        """"trained with <recipe> (<title>)[; changed: ...]" for a LoRA TDM Distill wrote with a known recipe; None
        otherwise (header values are untrusted: an unknown name is not repeated, the changes are cut short)."""
        recipe = RECIPES.get(self.metadata.get("tdm.recipe", ""))
        if recipe is None:
            return None
        text = f"trained with the {recipe.name} recipe ({recipe.title})"
        changes = self.metadata.get("tdm.recipe_changes", "")
        if changes and changes.isprintable():
            text += f"; changed: {changes[:200]}"
        return text

    def summary(self) -> str:
        alpha = "none (scale 1)" if self.alpha is None else f"{self.alpha:g}"
        ranks = "/".join(str(r) for r in sorted(self.ranks))
        te = f", {len(self.text_encoder_modules)} text-encoder" if self.text_encoder_modules else ""
        recipe = self.trained_recipe()
        return (
            f"{self.name}: {self.format} LoRA for {family_name(self.family)}, {len(self.model_modules)} model "
            f"modules{te}, rank {ranks}, alpha {alpha}" + (f"; {recipe}" if recipe else "")
        )


_BLOCK_WORDS = ("blocks", "block", "layers", "attentions", "resnets", "samplers")


def module_kind(name: str) -> str:
    """The module path after its last `<...blocks|layers|...>.<index>.` (`transformer_blocks.3.attn.to_q` ->
    `attn.to_q`). A split and one backwards pass: linear in the name (a `^.*(...)\\.\\d+\\.` regex backtracks
    quadratically on a long crafted name from a file)."""
    parts = name.split(".")
    for index in range(len(parts) - 2, 0, -1):
        if parts[index].isdigit() and parts[index].isascii() and parts[index - 1].endswith(_BLOCK_WORDS):
            return ".".join(parts[index + 1:])
    return name

# Metadata a TDM-trained LoRA records in its safetensors header (written by `tdm_metadata`).
TDM_METADATA_PRESET = "tdm.preset"
TDM_METADATA_FAMILY = "tdm.family"
TDM_METADATA_STRENGTH = "tdm.lora_strength"
TDM_METADATA_SOLVER = "tdm.solver"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LoraConfig dump, prefixed by component


def tdm_metadata(preset: str | None = None, family: str | None = None, strength: float | None = None) -> dict:
    """Header entries that let the loader pick the right strength and family for a LoRA trained by TDM."""
    entries = {}
    if preset is not None:
        entries[TDM_METADATA_PRESET] = preset
    if family is not None:
        entries[TDM_METADATA_FAMILY] = family
    if strength is not None:
        entries[TDM_METADATA_STRENGTH] = repr(float(strength))
    return entries


# --------------------------------------------------------------------------------------------------------------
# Kohya names: module paths with every '.' replaced by '_'. Path parts that contain '_' themselves are put back
# together from this vocabulary (diffusers and ComfyUI/SGM names of the UNet, MMDiT, CogVideoX and CLIP).

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


# --------------------------------------------------------------------------------------------------------------
# Key parsing

# (suffix, role, format) — longest suffixes first.
_SUFFIXES = (
    (".lora_A.default.weight", "down", "peft"),
    (".lora_B.default.weight", "up", "peft"),
    (".lora_linear_layer.down.weight", "down", "diffusers_old"),
    (".lora_linear_layer.up.weight", "up", "diffusers_old"),
    ("_lora.down.weight", "down", "diffusers_old"),
    ("_lora.up.weight", "up", "diffusers_old"),
    (".lora.down.weight", "down", "diffusers_old"),
    (".lora.up.weight", "up", "diffusers_old"),
    (".lora_A.weight", "down", "peft"),
    (".lora_B.weight", "up", "peft"),
    (".lora_down.weight", "down", "kohya"),
    (".lora_up.weight", "up", "kohya"),
    (".alpha", "alpha", None),
)

_KOHYA_PREFIXES = (
    ("lora_unet_", "unet"),
    ("lora_transformer_", "transformer"),  # OneTrainer SD3
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te_", "text_encoder"),
)
_DOTTED_PREFIXES = (
    ("diffusion_model.", "diffusion_model"),
    ("unet.", "unet"),
    ("transformer.", "transformer"),
    ("text_encoder_2.", "text_encoder_2"),
    ("text_encoder.", "text_encoder"),
)
_UNET_ROOTS = ("down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "time_embedding", "add_embedding")
_TRANSFORMER_ROOTS = (
    "transformer_blocks", "single_transformer_blocks", "context_embedder", "time_text_embed", "pos_embed",
    "patch_embed", "norm_out", "proj_out", "norm_final", "proj_in",
)


def _split_key(key: str):
    for suffix, role, fmt in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role, fmt
    return None


def _locate(root: str, fmt: str | None):
    """(component, dotted module name, ComfyUI key, format) for a key root (the key without its suffix)."""
    for prefix, component in _KOHYA_PREFIXES:
        if root.startswith(prefix):
            flat = root[len(prefix) :]
            # kohya keys are already what ComfyUI maps; SGM-named ones (SDXL: input_blocks...) are ComfyUI paths
            name = kohya_name_to_path(flat)
            if component == "unet" and name.split(".")[0] in ("input_blocks", "middle_block", "output_blocks"):
                component = "diffusion_model"
            return component, name, root, fmt or "kohya"
    stripped = root
    if stripped.startswith("base_model.model."):
        stripped = stripped[len("base_model.model.") :]
    prefixed = [(p, c) for p, c in _DOTTED_PREFIXES if stripped.startswith(p)]
    if prefixed:
        prefix, component = prefixed[0]
        name = stripped[len(prefix) :]
    else:
        first = stripped.split(".")[0]
        if first in _UNET_ROOTS:
            component = "unet"
        elif first in ("text_model",):
            component = "text_encoder"
        elif first in ("input_blocks", "middle_block", "output_blocks", "joint_blocks"):
            component = "diffusion_model"
        else:
            component = "transformer"
        name = stripped
    if component == "diffusion_model":
        fmt = "comfy"
    # diffusers' old attention-processor names: attn1.processor.to_q(_lora) -> attn1.to_q, to_out -> to_out.0
    name = name.replace(".processor.", ".")
    if name.endswith(".to_out") and fmt == "diffusers_old":
        name += ".0"
    return component, name, _comfy_key(component, name), fmt or "peft"


def _comfy_key(component: str, name: str) -> str:
    if component == "unet":
        return "lora_unet_" + name.replace(".", "_")
    if component == "diffusion_model":
        return "diffusion_model." + name
    if component == "transformer":
        return "transformer." + name
    return f"{component}.{name}"


def _diffusers_lora_config(metadata: dict, component: str, file_name: str) -> dict:
    """The LoraConfig arguments diffusers stored in the header for this component (empty if none). The entry comes
    from the file: parsed with bounded depth, and refused (naming the file) when it is not a JSON object."""
    raw = metadata.get(DIFFUSERS_METADATA_KEY)
    if not raw:
        return {}
    try:
        config = validation.json_object(validation.loads_json(raw, f"its {DIFFUSERS_METADATA_KEY} header entry"),
                                        f"its {DIFFUSERS_METADATA_KEY} header entry")
    except validation.ValidationError as error:
        raise LoraFileError(f"'{file_name}' is corrupt: {error}. Re-download the file, or remove that header "
                            "entry.") from None
    prefixed = {k[len(component) + 1 :]: v for k, v in config.items() if k.startswith(component + ".")}
    if prefixed:
        return prefixed
    if any("." in k for k in config):
        return {}
    return config


# Characters that make a pattern key a regular expression rather than a module name. peft matches pattern keys as
# regexes (`re.match(rf"(.*\.)?({key})$", module)`); a regex from a file, run against names from the same file, can
# take exponential time (`(x+)+y`). TDM never runs a file's regex: keys are module names, matched by the linear rule
# below, and a key that still holds one of these characters is an error (not ignored: ignoring it would apply the
# wrong alpha silently and give a wrong image).
_REGEX_CHARACTERS = frozenset("\\^$*+?{}[]|()")


def _pattern_name(key: str, file_name: str, entry: str) -> tuple[str, bool]:
    """(module name, exact-only) of a pattern key. The spellings writers use for a literal name are accepted: a
    leading `^` (peft then only matches the whole name), a trailing `$`, and `\\.` for a dot (`re.escape` output)."""
    exact = key.startswith("^")
    name = key[1:] if exact else key
    if name.endswith("$") and not name.endswith("\\$"):
        name = name[:-1]
    name = name.replace("\\.", ".").replace("\\_", "_").replace("\\-", "-")
    if not name or any(char in _REGEX_CHARACTERS for char in name):
        raise LoraFileError(
            f"'{file_name}': its {DIFFUSERS_METADATA_KEY} {entry} key {key[:120]!r} is a regular expression. TDM "
            "reads pattern keys as module names only (a regular expression from a file can take hours to match); "
            "re-save the LoRA with module names as keys (peft does when it saves).")
    return name, exact


def _pattern_value(patterns, name: str, file_name: str = "<state dict>", entry: str = "alpha_pattern"):
    """peft's rule (`peft.utils.other.get_pattern_key`, 0.21) for literal keys, in linear time: the first key that
    equals the module path, or that the path ends with after a '.', wins (a `^`-anchored key: the whole path only).
    For every key that is a module name this is exactly what peft's regex match gives."""
    if not patterns:
        return None
    if not isinstance(patterns, dict):
        raise LoraFileError(f"'{file_name}': its {DIFFUSERS_METADATA_KEY} {entry} must be a JSON object of module "
                            "names to numbers; re-save the LoRA.")
    for key, value in patterns.items():
        module, exact = _pattern_name(key, file_name, entry)
        if name == module or (not exact and name.endswith("." + module)):
            return value
    return None


def _metadata_alpha(metadata: dict, component: str, name: str, fmt: str, file_name: str):
    config = _diffusers_lora_config(metadata, component, file_name)
    if config:
        for entry in ("rank_pattern", "alpha_pattern"):
            _pattern_value(config.get(entry), "", file_name, entry)  # every key checked, matched or not
        value = _pattern_value(config.get("alpha_pattern"), name, file_name)
        if value is None:
            value = config.get("lora_alpha")
        if value is not None:
            return _finite_alpha(value, file_name, f"{DIFFUSERS_METADATA_KEY} alpha of {name}"), bool(
                config.get("use_rslora", False))
    if fmt == "kohya" and metadata.get("ss_network_alpha"):
        return _finite_alpha(metadata["ss_network_alpha"], file_name, "header entry ss_network_alpha"), False
    return None, False


MAX_ALPHA = 1e6  # far above any real LoRA's alpha (≤ a few thousand); a larger one only makes a broken image


def _finite_alpha(value, file_name: str, what: str) -> float:
    try:
        if isinstance(value, str):
            return validation.number_text(value, what, lo=-MAX_ALPHA, hi=MAX_ALPHA)
        return validation.number(value, what, lo=-MAX_ALPHA, hi=MAX_ALPHA)
    except validation.ValidationError as error:
        raise LoraFileError(f"'{file_name}': {error}; the file is damaged: re-download it.") from None


def _check_factors(file_name: str, module_name: str, down: torch.Tensor, up: torch.Tensor) -> None:
    if down.ndim < 2 or up.ndim < 2 or up.shape[1] != down.shape[0]:
        raise LoraFileError(
            f"'{file_name}': module {module_name} has inconsistent LoRA factors (down {tuple(down.shape)}, "
            f"up {tuple(up.shape)}); the file is corrupt."
        )
    if down.numel() == 0 or up.numel() == 0:
        raise LoraFileError(f"'{file_name}': module {module_name} has empty LoRA factors (down {tuple(down.shape)}, "
                            f"up {tuple(up.shape)}: rank or size 0); the file is corrupt: re-download it.")
    if not (down.is_floating_point() and up.is_floating_point()):
        raise LoraFileError(f"'{file_name}': module {module_name} has {down.dtype}/{up.dtype} factors, not floating "
                            "point; the file is not a LoRA.")
    bad = [role for role, tensor in (("down", down), ("up", up)) if not bool(torch.isfinite(tensor).all())]
    if bad:
        raise LoraFileError(f"'{file_name}': module {module_name} has NaN or infinite values in its {' and '.join(bad)} "
                            "factor; it would turn every image into NaN. The LoRA is broken (a diverged training "
                            "run): use an earlier snapshot or re-download it.")


MAX_STRENGTH = 100.0
MAX_KEY_LENGTH = 1024


def _check_tdm_metadata(metadata: dict, file_name: str) -> None:
    """The strength a TDM-trained LoRA records is applied as it is in auto mode: it must be a finite number."""
    value = metadata.get(TDM_METADATA_STRENGTH)
    if value is None:
        return
    try:
        validation.number_text(value, f"its header entry {TDM_METADATA_STRENGTH}", lo=-MAX_STRENGTH, hi=MAX_STRENGTH)
    except validation.ValidationError as error:
        raise LoraFileError(f"'{file_name}': {error}. Use strength_mode manual, or remove or fix that header "
                            "entry.") from None


def parse_lora(tensors: dict[str, torch.Tensor], metadata: dict | None = None, name: str = "<state dict>") -> LoraFile:
    """Groups a LoRA state dict into modules. Raises LoraFileError if the file holds no LoRA weights at all."""
    metadata = dict(metadata or {})
    _check_tdm_metadata(metadata, name)
    long_keys = [key for key in tensors if len(key) > MAX_KEY_LENGTH]
    if long_keys:
        raise LoraFileError(f"'{name}' has a tensor name of {len(long_keys[0])} characters (at most {MAX_KEY_LENGTH}: "
                            "real module paths are under 200); the file is damaged or crafted.")
    roots: dict[str, dict] = {}
    unrecognised = []
    for key, tensor in tensors.items():
        split = _split_key(key)
        if split is None:
            unrecognised.append(key)
            continue
        root, role, fmt = split
        entry = roots.setdefault(root, {"keys": []})
        entry["keys"].append(key)
        entry[role] = tensor
        if fmt is not None:
            entry["format"] = fmt
    modules: dict[str, LoraModule] = {}
    formats = collections.Counter()
    for root, entry in roots.items():
        if "down" not in entry or "up" not in entry:
            unrecognised.extend(entry["keys"])
            continue
        component, module_name, comfy_key, fmt = _locate(root, entry.get("format"))
        down, up = entry["down"], entry["up"]
        _check_factors(name, module_name, down, up)
        rank = int(down.shape[0])
        rslora = False
        if "alpha" in entry:
            if entry["alpha"].numel() != 1:
                raise LoraFileError(f"'{name}': module {module_name} has an alpha of shape "
                                    f"{tuple(entry['alpha'].shape)}, not a single number; the file is corrupt.")
            alpha = _finite_alpha(float(entry["alpha"].float().item()), name, f"the alpha of module {module_name}")
        else:
            alpha, rslora = _metadata_alpha(metadata, component, module_name, fmt, name)
        if alpha is None:
            scale = 1.0
        else:
            scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        module = LoraModule(component, module_name, down, up, alpha, scale, comfy_key, tuple(sorted(entry["keys"])))
        modules[module.id] = module
        formats[fmt] += 1
    if not modules:
        sample = ", ".join(repr(k) for k in list(tensors)[:3])
        kind = "an empty state dict" if not tensors else f"{len(tensors)} tensors such as {sample}"
        hint = ""
        if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in tensors):
            hint = " It looks like a full model checkpoint: load it with Load Checkpoint, not a LoRA loader."
        elif any(k.endswith(".weight") for k in tensors):
            hint = " It looks like model weights, not a LoRA (no lora_A/lora_B, lora_down/lora_up pairs)."
        raise LoraFileError(f"'{name}' contains no LoRA weights: found {kind}.{hint}")
    fmt = formats.most_common(1)[0][0] if len(formats) == 1 else "mixed: " + "+".join(sorted(formats))
    return LoraFile(name, fmt, detect_family(modules.values(), metadata), modules, metadata, sorted(unrecognised))


def detect_family(modules, metadata: dict | None = None) -> str:
    """The model family a set of modules was made for, from the key layout (and a TDM header entry if present)."""
    recorded = (metadata or {}).get(TDM_METADATA_FAMILY)
    if families.is_known(recorded or ""):
        return recorded
    return families.detect_lora(key_layout(modules))


def key_layout(modules) -> families.LoraKeyLayout:
    """The model modules' paths as family detection reads them (tdm_core.families.LoraKeyLayout)."""
    model_modules = [m for m in modules if m.component in MODEL_COMPONENTS]
    return families.LoraKeyLayout(
        comfy=tuple(m.name for m in model_modules if m.component == "diffusion_model"),
        diffusers=tuple(m.name for m in model_modules if m.component != "diffusion_model"),
        cross_attention_dims=frozenset(m.in_numel for m in model_modules
                                       if m.component != "diffusion_model" and m.name.endswith("attn2.to_k")))


def load_lora(path) -> LoraFile:
    """Reads (safely) and parses a LoRA file; every failure is a LoraFileError naming the file."""
    from pathlib import Path

    from .files import read_lora_file

    tensors, metadata = read_lora_file(path)
    return parse_lora(tensors, metadata, name=Path(path).name)


# --------------------------------------------------------------------------------------------------------------
# Conversions


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
    key `_comfy_key` gives a peft module (as ComfyUI maps SD3's diffusers names onto its MMDiT).
    """
    key_map = {}
    for key in native_weight_keys:
        if not (key.startswith("diffusion_model.") and key.endswith(".weight")):
            continue
        diffusers_name = cogvideox_diffusers_name(key[len("diffusion_model."):-len(".weight")])
        if diffusers_name is not None:
            key_map[_comfy_key("transformer", diffusers_name)] = key
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
