"""Synthesised LoRA files in every real key format, made against a (twin) diffusers model.

A `SyntheticLora` is a set of random low-rank factors keyed by *diffusers* module paths of a concrete model, so it
knows exactly which weight each factor changes and by how much (`delta`, `merged_state_dict`): that is the reference
a loader must reproduce. The writers lay the same factors out as the released files do, independently of
`tdm_core.lora` (a reader tested against its own writer proves nothing):

    lora = synthesise(twin.diffusers, "sd15", rank=4, alpha=2.0)
    write_kohya(lora, tmp / "tdm_dreamshaper.pt")                      # pickle, lora_unet_*, .alpha (Dreamshaper)
    write_peft(lora, tmp / "x.safetensors", prefix="unet")            # unet./transformer./"" + lora_A/B
    write_peft(lora, tmp / "x.safetensors", alpha_in="metadata")      # alpha in diffusers' header metadata
    write_old_diffusers(lora, tmp / "x.bin")                           # processor.to_q_lora.down.weight
    write_comfy_native(lora, tmp / "x.safetensors", twin)              # diffusion_model.<ComfyUI path>, fused qkv

`lora_targets` picks the modules the real releases patch (every Linear/Conv of the UNet blocks; every Linear of the
MMDiT / CogVideoX transformer blocks, incl. SD3.5 `attn2`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

FAMILY_COMPONENT = {"sd15": "unet", "sdxl": "unet", "sd3": "transformer", "sd35": "transformer",
                    "cogvideox": "transformer"}


@dataclass
class LoraFactors:
    down: torch.Tensor  # [r, in] or [r, in, kh, kw]
    up: torch.Tensor  # [out, r] or [out, r, 1, 1]
    alpha: float | None  # None: scale 1 (the peft convention)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def delta(self, weight_shape, strength: float = 1.0) -> torch.Tensor:
        return (strength * self.scale * (self.up.flatten(1) @ self.down.flatten(1))).reshape(weight_shape)


@dataclass
class SyntheticLora:
    family: str
    modules: dict[str, LoraFactors]  # diffusers module path -> factors
    weight_shapes: dict[str, tuple] = field(default_factory=dict)  # diffusers module path -> its weight's shape

    @property
    def component(self) -> str:
        return FAMILY_COMPONENT[self.family]

    def delta(self, module: str, strength: float = 1.0) -> torch.Tensor:
        return self.modules[module].delta(self.weight_shapes[module], strength)

    def merged_state_dict(self, diffusers_state_dict: dict, strength: float = 1.0) -> dict:
        """The diffusers weights with every update merged in: what any correct loader must produce."""
        merged = {k: v.clone() for k, v in diffusers_state_dict.items()}
        for name in self.modules:
            merged[f"{name}.weight"] = merged[f"{name}.weight"] + self.delta(name, strength)
        return merged

    def subset(self, names) -> SyntheticLora:
        names = list(names)
        return SyntheticLora(self.family, {n: self.modules[n] for n in names},
                             {n: self.weight_shapes[n] for n in names})


_UNET_BLOCKS = re.compile(r"^(down_blocks|up_blocks|mid_block)\.")
_TRANSFORMER_BLOCKS = re.compile(r"^transformer_blocks\.\d+\.")


def lora_targets(model: torch.nn.Module, family: str) -> list[str]:
    """Module paths a full TDM-style LoRA of the family patches, in the model's (diffusers) naming."""
    names = []
    for name, module in model.named_modules():
        if family in ("sd15", "sdxl"):
            if _UNET_BLOCKS.match(name) and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                names.append(name)
        elif _TRANSFORMER_BLOCKS.match(name) and isinstance(module, torch.nn.Linear):
            names.append(name)
    if not names:
        raise ValueError(f"no {family} LoRA targets in {type(model).__name__}")
    return names


def synthesise(model: torch.nn.Module, family: str, targets=None, rank: int = 4, alpha: float | None = None,
               seed: int = 0, magnitude: float = 0.5) -> SyntheticLora:
    """Random factors for `targets` (default `lora_targets`); ΔW is about `magnitude` × the weight's scale at
    strength 1, so 0.125 still changes the output well above fp32 noise."""
    generator = torch.Generator().manual_seed(seed)
    modules, shapes = {}, {}
    for name in targets if targets is not None else lora_targets(model, family):
        weight = model.get_submodule(name).weight
        out_features, in_numel = weight.shape[0], math.prod(weight.shape[1:])
        down_shape = (rank, *weight.shape[1:])
        up_shape = (out_features, rank, *([1] * (weight.ndim - 2)))
        down = torch.randn(down_shape, generator=generator) / math.sqrt(in_numel)
        scale = 1.0 if alpha is None else alpha / rank
        up = torch.randn(up_shape, generator=generator) * (magnitude / math.sqrt(rank) / scale)
        modules[name] = LoraFactors(down, up, alpha)
        shapes[name] = tuple(weight.shape)
    return SyntheticLora(family, modules, shapes)


def _save(tensors: dict, path: Path, metadata: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path), metadata=metadata)
    else:
        if metadata:
            raise ValueError("pickled LoRA files carry no header metadata")
        torch.save(tensors, str(path))
    return path


def _alpha_tensor(factors: LoraFactors) -> torch.Tensor:
    return torch.tensor(float(factors.alpha))


def write_peft(lora: SyntheticLora, path, prefix: str | None = None, alpha_in: str = "none",
               metadata: dict | None = None) -> Path:
    """diffusers/peft layout: `<prefix>.<module>.lora_A.weight` / `.lora_B.weight`.

    prefix: "unet", "transformer" or "" (none); default the family's component. alpha_in: "none" (no alpha anywhere:
    scale 1), "keys" (`<prefix>.<module>.alpha` tensors), "metadata" (diffusers' `lora_adapter_metadata` header:
    r, lora_alpha, target_modules, as `save_lora_weights` writes it).
    """
    prefix = lora.component if prefix is None else prefix
    lead = f"{prefix}." if prefix else ""
    tensors = {}
    for name, factors in lora.modules.items():
        tensors[f"{lead}{name}.lora_A.weight"] = factors.down
        tensors[f"{lead}{name}.lora_B.weight"] = factors.up
        if alpha_in == "keys":
            tensors[f"{lead}{name}.alpha"] = _alpha_tensor(factors)
    header = dict(metadata or {})
    if alpha_in == "metadata":
        ranks = {f.rank for f in lora.modules.values()}
        alphas = {f.alpha for f in lora.modules.values()}
        if len(ranks) != 1 or len(alphas) != 1:
            raise ValueError("metadata alpha needs one rank and one alpha")
        config = {"r": ranks.pop(), "lora_alpha": alphas.pop(), "target_modules": sorted(lora.modules)}
        header["lora_adapter_metadata"] = json.dumps({f"{lead}{k}": v for k, v in config.items()})
    elif alpha_in not in ("none", "keys"):
        raise ValueError(f"alpha_in must be none, keys or metadata, not {alpha_in!r}")
    return _save(tensors, path, header or None)


def write_kohya(lora: SyntheticLora, path) -> Path:
    """kohya layout: `lora_unet_<module path with '_'>.lora_down.weight / .lora_up.weight / .alpha` (alpha = rank
    when the LoRA has none). A `.pt` path gives a pickle like the Dreamshaper release."""
    prefix = "lora_unet_" if lora.component == "unet" else "lora_transformer_"
    tensors = {}
    for name, factors in lora.modules.items():
        key = prefix + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = factors.down
        tensors[f"{key}.lora_up.weight"] = factors.up
        tensors[f"{key}.alpha"] = torch.tensor(float(factors.alpha if factors.alpha is not None else factors.rank))
    return _save(tensors, path)


def write_old_diffusers(lora: SyntheticLora, path, style: str = "attn_procs") -> Path:
    """Pre-peft diffusers layouts (2023): "attn_procs" = `unet.<block>.attn1.processor.to_q_lora.down.weight`
    (attention modules only, as `save_attn_procs` wrote them), "compatible" = `unet.<module>.lora.down.weight`."""
    tensors = {}
    for name, factors in lora.modules.items():
        if style == "attn_procs":
            match = re.match(r"^(.*\.attn\d)\.(to_q|to_k|to_v|to_out\.0)$", name)
            if not match:
                raise ValueError(f"{name} is not an attention projection (attn_procs LoRAs patch only those)")
            proj = match.group(2).replace(".0", "")
            root = f"unet.{match.group(1)}.processor.{proj}_lora"
        elif style == "compatible":
            root = f"unet.{name}.lora"
        else:
            raise ValueError(style)
        if factors.alpha is not None:
            raise ValueError("old diffusers LoRAs carry no alpha")
        tensors[f"{root}.down.weight"] = factors.down
        tensors[f"{root}.up.weight"] = factors.up
    return _save(tensors, path)


def comfy_native_targets(lora: SyntheticLora, twin) -> list[str]:
    """The distinct ComfyUI weights the LoRA's modules land on (SD3 q/k/v share one fused `qkv`)."""
    targets = []
    for name in lora.modules:
        target = twin.key_map[f"{name}.weight"]
        key = target if isinstance(target, str) else target[0]
        if key not in targets:
            targets.append(key)
    return targets


def write_comfy_native(lora: SyntheticLora, path, twin) -> Path:
    """ComfyUI-native layout: `diffusion_model.<ComfyUI module path>.lora_up.weight / .lora_down.weight / .alpha`.

    Modules that ComfyUI fuses (SD3 q/k/v into `qkv`) become one LoRA on the fused weight: the downs stacked, the
    ups placed block-diagonally at their slices, each module's scale folded into its up (alpha = total rank).
    """
    comfy_shapes = {k: tuple(v.shape) for k, v in twin.comfy.model.diffusion_model.state_dict().items()}
    assert set(comfy_native_targets(lora, twin)) <= set(comfy_shapes)
    fused: dict[str, list] = {}
    for name, factors in lora.modules.items():
        target = twin.key_map[f"{name}.weight"]
        comfy_key, piece, function = (target, None, None) if isinstance(target, str) else (*target, None)[:3]
        if function is not None:  # ComfyUI stores this weight with its rows permuted (swap_scale_shift)
            factors = LoraFactors(factors.down, function(factors.up), factors.alpha)
        fused.setdefault(comfy_key, []).append((piece, factors))
    tensors = {}
    for comfy_key, parts in fused.items():
        shape = comfy_shapes[comfy_key]
        root = "diffusion_model." + comfy_key[: -len(".weight")]
        total_rank = sum(f.rank for _, f in parts)
        down = torch.cat([f.down for _, f in parts], dim=0)
        up = torch.zeros(shape[0], total_rank, *parts[0][1].up.shape[2:])
        column = 0
        for piece, factors in parts:
            rows = slice(0, shape[0]) if piece is None else slice(piece[1], piece[1] + piece[2])
            if piece is not None and piece[0] != 0:
                raise ValueError(f"unsupported fused dimension {piece}")
            up[rows, column:column + factors.rank] = factors.up * factors.scale
            column += factors.rank
        tensors[f"{root}.lora_down.weight"] = down
        tensors[f"{root}.lora_up.weight"] = up
        tensors[f"{root}.alpha"] = torch.tensor(float(total_rank))
    return _save(tensors, path)


# The writer of each key format tdm_core.lora.keys registers (by its NAME): a new format adds its unit there and its
# writer here, and tests/test_lora_reading.py holds the two lists to each other.
WRITERS = {"peft": write_peft, "kohya": write_kohya, "diffusers_old": write_old_diffusers, "comfy": write_comfy_native}
