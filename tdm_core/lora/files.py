"""Reading LoRA files safely: safetensors (with its header metadata) and PyTorch pickles under weights-only loading.

A `.pt/.pth/.ckpt` file is a pickle, and unpickling runs whatever code the file names (the released Dreamshaper TDM
LoRA is such a file). Only `torch.load(weights_only=True)` is ever used: a file that names code is refused before any
of it runs. The format is decided from the file's first bytes, not its extension, so a renamed file is still read
(or refused) for what it is.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
from pathlib import Path

import torch

SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024  # the safetensors reference implementation's limit


class LoraFileError(ValueError):
    """A LoRA file that cannot be read: missing, empty, truncated, corrupt, unsafe or not a LoRA."""


def _describe(path: Path) -> str:
    return f"'{path.name}'"


def _sniff(path: Path, head: bytes, size: int) -> str:
    if head[:2] == b"PK":
        return "torch_zip"
    if head[:1] == b"\x80":  # pickle protocol opcode: torch's legacy (non-zip) format or a bare pickle
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    suffix = path.suffix.lower()
    if suffix in (".safetensors", ".sft"):
        return "safetensors"
    return "unknown"


def _check_safetensors_layout(path: Path, size: int) -> None:
    """Validates the header and the data length before the library sees the file, for an error that says what is
    wrong (the library's own 'MetadataIncompleteBuffer' tells a user nothing)."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise LoraFileError(f"{_describe(path)} is truncated: {size} bytes is shorter than a safetensors header.")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > SAFETENSORS_MAX_HEADER:
            raise LoraFileError(
                f"{_describe(path)} is not a valid safetensors file (its header claims {header_len} bytes). "
                "It may be a .ckpt/.pt renamed to .safetensors, or a download error page: re-download it."
            )
        if 8 + header_len > size:
            raise LoraFileError(
                f"{_describe(path)} is truncated: its safetensors header needs {8 + header_len} bytes, the file has "
                f"{size}. The download or copy did not finish: download it again."
            )
        raw = handle.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LoraFileError(f"{_describe(path)} is corrupt: its safetensors header is not valid JSON ({error}).") from None
    if not isinstance(header, dict):
        raise LoraFileError(f"{_describe(path)} is corrupt: its safetensors header is not a JSON object.")
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            data_end = max(data_end, int(entry["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            raise LoraFileError(f"{_describe(path)} is corrupt: tensor {name!r} has no valid data_offsets.") from None
    available = size - 8 - header_len
    if data_end > available:
        raise LoraFileError(
            f"{_describe(path)} is truncated: its tensors need {data_end} bytes of data, the file holds {available}. "
            "The download or copy did not finish: download it again."
        )


def _read_safetensors(path: Path, size: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    _check_safetensors_layout(path, size)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, RuntimeError) as error:
        raise LoraFileError(f"{_describe(path)} is a corrupt safetensors file: {error}") from None
    return tensors, metadata


def _unwrap_checkpoint(obj, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise LoraFileError(f"{_describe(path)} holds a {type(obj).__name__}, not a dictionary of tensors.")
    tensors = {}
    for key, value in obj.items():
        if isinstance(value, torch.Tensor):
            tensors[str(key)] = value
    return tensors


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's weights-only unpickler stops at the first global that is not a tensor type, before calling it.
        named = re.search(r"GLOBAL (\S+)", str(error))
        reason = f"`{named.group(1)}`" if named else str(error).splitlines()[0]
        raise LoraFileError(
            f"Refused {_describe(path)}: this pickle file names code to run when it is opened ({reason}). TDM loads "
            ".pt/.pth/.ckpt files with weights-only loading, which never runs code from a file. A genuine LoRA holds "
            "only tensors: get it from its original source, or a .safetensors version of it."
        ) from None
    except (RuntimeError, EOFError, ValueError, struct.error) as error:
        raise LoraFileError(f"{_describe(path)} is not a readable PyTorch file ({str(error).splitlines()[0]}).") from None
    return _unwrap_checkpoint(obj, path)


def read_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Returns (tensors, header metadata) of a LoRA file; metadata is empty for pickles.

    Raises LoraFileError with the file name and what to do for: a missing path, a directory, an empty file, a
    truncated or corrupt safetensors file, a pickle that carries code, and an unknown format.
    """
    path = Path(path)
    if not path.exists():
        raise LoraFileError(f"{_describe(path)} does not exist ({path}).")
    if path.is_dir():
        raise LoraFileError(
            f"{_describe(path)} is a directory, not a LoRA file: choose the .safetensors or .pt file inside it."
        )
    size = path.stat().st_size
    if size == 0:
        raise LoraFileError(f"{_describe(path)} is empty (0 bytes): the download or copy failed, download it again.")
    with open(path, "rb") as handle:
        head = handle.read(16)
    kind = _sniff(path, head, size)
    if kind == "safetensors":
        return _read_safetensors(path, size)
    if kind in ("torch_zip", "pickle"):
        return _read_pickle(path), {}
    raise LoraFileError(
        f"{_describe(path)} is neither a safetensors file nor a PyTorch (.pt/.pth/.ckpt) file "
        f"(it starts with {head[:8]!r})."
    )


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    """Writes tensors (contiguous CPU copies) with string header metadata; non-string values are JSON-encoded."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path), metadata=header)
    return path
