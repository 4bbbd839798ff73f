"""Writes the CogVideoX transformer of a diffusers folder as the single file newer ComfyUI's native CogVideoX loads.

Newer (upstream, 2026) ComfyUI runs CogVideoX from its core loaders (UNETLoader / CLIPLoader type cogvideox /
VAELoader), but its UNETLoader knows CogVideoX only by its own module names (`blocks.N.q`, ...; diffusers says
`transformer_blocks.N.attn1.to_q`), and it tells the 2B's fixed sin-cos positions from the 5B's rotary ones only by a
stored table, `patch_embed.pos_embedding`, which diffusers computes at load time and never saves. Nobody publishes the
2B in that layout, so this makes it from the diffusers release the pack's other CogVideoX workflow already uses:

    python -m tdm_core.cogvideox_convert models/diffusers/CogVideoX-2b models/diffusion_models/cogvideox_2b.safetensors

(run it from the pack's folder, with ComfyUI's Python). The weights keep their dtype and values; the 2B's table is
computed by diffusers' own patch embedding at the model's sample size (the size its native model reads the table
at) and stored in fp32. The CogVideoX VAE needs no conversion (its diffusers file has ComfyUI's key names), and the
text encoder is the usual t5xxl file. Nothing here imports ComfyUI.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import sys
from pathlib import Path

import torch

from .cogvideox_names import cogvideox_native_name

_PARAMETER = re.compile(r"[A-Za-z0-9_.]{1,200}")
POS_EMBEDDING_KEY = "patch_embed.pos_embedding"
MAX_CONFIG_BYTES = 1 << 20  # a transformer config.json is about 1 KB
MAX_SHARDS = 64  # the 5B's transformer has 2


class ConvertError(ValueError):
    """A folder or file this converter cannot use, said in words a user can act on."""


def native_name(diffusers_name: str) -> str:
    """The native ComfyUI name of one diffusers CogVideoX transformer tensor (ConvertError if it has none): the
    module's name by tdm_core.cogvideox_names, the parameter's kept; a learned position table (the 5B image-to-video
    model's) keeps its name."""
    if diffusers_name == POS_EMBEDDING_KEY:
        return diffusers_name
    module, _, parameter = diffusers_name.rpartition(".")
    native = cogvideox_native_name(module) if module else None
    if native is None:
        raise ConvertError(f"{diffusers_name!r} is not a CogVideoX transformer weight this converter knows")
    return f"{native}.{parameter}"


def transformer_folder(folder: Path) -> Path:
    """The diffusers transformer folder: `folder/transformer` of a pipeline folder, or `folder` itself."""
    for candidate in (folder / "transformer", folder):
        if (candidate / "config.json").is_file():
            return candidate
    raise ConvertError(f"{folder} has no transformer/config.json: give the CogVideoX diffusers folder (the one with "
                       "model_index.json, transformer/, vae/, ...) or its transformer/ folder")


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConvertError(f"{path} is {path.stat().st_size} bytes: not a diffusers model config")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ConvertError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(config, dict) or config.get("_class_name") != "CogVideoXTransformer3DModel":
        found = config.get("_class_name") if isinstance(config, dict) else type(config).__name__
        raise ConvertError(f"{path} describes {found!r}, not a CogVideoXTransformer3DModel")
    return config


def weight_files(folder: Path) -> list[Path]:
    """The transformer's safetensors files: the single file, or the shards its index names (inside `folder`)."""
    single = folder / "diffusion_pytorch_model.safetensors"
    if single.is_file():
        return [single]
    index_path = folder / "diffusion_pytorch_model.safetensors.index.json"
    if not index_path.is_file():
        raise ConvertError(f"{folder} has no diffusion_pytorch_model.safetensors (nor a sharded index): only "
                           "safetensors weights are read")
    if index_path.stat().st_size > 16 * MAX_CONFIG_BYTES:
        raise ConvertError(f"{index_path} is too large to be a shard index")
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as error:
        raise ConvertError(f"{index_path} is not a diffusers shard index: {error}") from None
    if not 0 < len(names) <= MAX_SHARDS or not all(isinstance(n, str) and Path(n).name == n for n in names):
        raise ConvertError(f"{index_path} names {len(names)} shards or a path outside its folder")
    return [folder / name for name in names]


def sincos_table(config: dict) -> torch.Tensor | None:
    """The 2B's fixed position table as diffusers builds it (text slots included), fp32; None for models with rotary
    positions (the 5B, CogVideoX 1.5) or learned ones (stored in the file already)."""
    if config.get("use_rotary_positional_embeddings") or config.get("use_learned_positional_embeddings"):
        return None
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import CogVideoXPatchEmbed

    # the model's own defaults fill what an older config leaves out, as diffusers' from_config would
    defaults = {name: parameter.default for name, parameter
                in inspect.signature(CogVideoXTransformer3DModel.__init__).parameters.items()}
    setting = {name: config.get(name, default) for name, default in defaults.items()}
    numbers = ("num_attention_heads", "attention_head_dim", "patch_size", "in_channels", "text_embed_dim",
               "sample_width", "sample_height", "sample_frames", "temporal_compression_ratio", "max_text_seq_length")
    if not all(isinstance(setting[name], int) and 0 < setting[name] <= 65536 for name in numbers):
        raise ConvertError(f"the transformer config has an impossible size among {', '.join(numbers)}")
    embed = CogVideoXPatchEmbed(
        patch_size=setting["patch_size"], patch_size_t=setting["patch_size_t"], in_channels=setting["in_channels"],
        embed_dim=setting["num_attention_heads"] * setting["attention_head_dim"],
        text_embed_dim=setting["text_embed_dim"], bias=setting["patch_bias"], sample_width=setting["sample_width"],
        sample_height=setting["sample_height"], sample_frames=setting["sample_frames"],
        temporal_compression_ratio=setting["temporal_compression_ratio"],
        max_text_seq_length=setting["max_text_seq_length"],
        spatial_interpolation_scale=setting["spatial_interpolation_scale"],
        temporal_interpolation_scale=setting["temporal_interpolation_scale"],
        use_positional_embeddings=True, use_learned_positional_embeddings=False)
    return embed.pos_embedding.detach().to(torch.float32).contiguous()


def convert(source: Path, target: Path, overwrite: bool = False) -> dict:
    """Writes `target`; returns a summary (tensors, dtype, whether a position table was added)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = transformer_folder(Path(source))
    config = read_config(folder)
    target = Path(target)
    if target.suffix != ".safetensors":
        raise ConvertError(f"{target}: the output must be a .safetensors file")
    if target.exists() and not overwrite:
        raise ConvertError(f"{target} exists: pass --overwrite to replace it")
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        if not path.is_file():
            raise ConvertError(f"{path} (named by the shard index) is missing")
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                if not _PARAMETER.fullmatch(key):
                    raise ConvertError(f"{path} holds a tensor named {key[:80]!r}: not a diffusers parameter name")
                name = native_name(key)
                if name in state:
                    raise ConvertError(f"{key!r} appears twice in {folder}")
                state[name] = handle.get_tensor(key)
    if not any(key.startswith("blocks.0.") for key in state):
        raise ConvertError(f"{folder} holds no transformer blocks")
    table = sincos_table(config)
    if table is not None:
        state[POS_EMBEDDING_KEY] = table
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    try:
        save_file(state, str(partial), metadata={"converted_from": "diffusers CogVideoXTransformer3DModel",
                                                 "converter": "comfyui-tdm tdm_core.cogvideox_convert"})
        os.replace(partial, target)
    finally:
        if partial.exists():  # only ever the file this call was writing
            partial.unlink()
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for k, t in state.items() if k != POS_EMBEDDING_KEY})
    return {"tensors": len(state), "dtypes": dtypes, "position_table": table is not None, "target": str(target)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tdm_core.cogvideox_convert",
        description="Write a diffusers CogVideoX transformer as the single file newer ComfyUI's native CogVideoX "
                    "(UNETLoader) loads.")
    parser.add_argument("source", type=Path, help="the diffusers folder (models/diffusers/CogVideoX-2b) or its "
                                                  "transformer/ folder")
    parser.add_argument("target", type=Path, help="the file to write, e.g. "
                                                  "models/diffusion_models/cogvideox_2b.safetensors")
    parser.add_argument("--overwrite", action="store_true", help="replace the target if it exists")
    args = parser.parse_args(argv)
    try:
        summary = convert(args.source, args.target, overwrite=args.overwrite)
    except (ConvertError, OSError) as error:
        print(f"cogvideox_convert: {error}", file=sys.stderr)
        return 2
    table = ", with the 2B's position table" if summary["position_table"] else ""
    print(f"wrote {summary['target']}: {summary['tensors']} tensors ({', '.join(summary['dtypes'])}){table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
