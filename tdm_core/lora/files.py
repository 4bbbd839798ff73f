"""Reading LoRA files safely: safetensors (with its header metadata) and PyTorch pickles under weights-only loading.

A `.pt/.pth/.ckpt` file is a pickle, and unpickling runs whatever code the file names (the released Dreamshaper TDM
LoRA is such a file). Only `torch.load(weights_only=True)` is ever used: a file that names code is refused before any
of it runs. The format is decided from the file's first bytes, not its extension, so a renamed file is still read
(or refused) for what it is.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import struct
from pathlib import Path

import torch

from .. import validation

SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024  # the safetensors reference implementation's limit


class LoraFileError(ValueError):
    """A LoRA file that cannot be read: missing, empty, truncated, corrupt, unsafe or not a LoRA."""


def _describe(path: Path) -> str:
    return f"'{path.name}'"


def _sniff(path: Path, head: bytes, size: int) -> str:
    if head[:2] == b"PK":
        return "torch_zip"
    # Before the pickle test: a safetensors header length can start with the byte 0x80.
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= size - 8:
        return "safetensors"
    if head[:1] == b"\x80":  # pickle protocol opcode: torch's legacy (non-zip) format or a bare pickle
        return "pickle"
    if head[:1] in (b"c", b"(", b"}", b"]", b"I", b"S", b"V") and b"\n" in head and not head[:8].strip(b"\t\n\r "
                                                                                                   ).startswith(b"{"):
        # protocol 0/1 pickles start with a text opcode (`cos\nsystem\n...`): read as a pickle (and refused if it
        # names code), whatever its extension says
        return "pickle"
    suffix = path.suffix.lower()
    if suffix in (".safetensors", ".sft"):
        return "safetensors"
    return "unknown"


# safetensors dtypes and their element sizes (the format's specification)
_SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E4M3FN": 1, "F8_E8M0": 1,
                       "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "C64": 8, "F64": 8,
                       "I64": 8, "U64": 8}
MAX_TENSORS = 1_000_000
MAX_DIM = 2**40


def _corrupt(path: Path, what: str) -> LoraFileError:
    return LoraFileError(f"{_describe(path)} is corrupt: {what}. Re-download the file (or get it from its original "
                         "source).")


def _check_safetensors_layout(path: Path, size: int) -> None:
    """Validates the header and the data length before the library sees the file, for an error that says what is
    wrong (the library's own 'MetadataIncompleteBuffer' tells a user nothing), and so that every declared size,
    shape and offset is checked against the file before anything is allocated."""
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
        header = validation.json_object(validation.loads_json(raw, "its safetensors header"), "its header")
    except validation.ValidationError as error:
        raise _corrupt(path, str(error)) from None
    if len(header) > MAX_TENSORS:
        raise _corrupt(path, f"its header lists {len(header)} entries (at most {MAX_TENSORS})")
    available = size - 8 - header_len
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            try:
                validation.string_map(entry, "its __metadata__")
            except validation.ValidationError as error:
                raise _corrupt(path, str(error)) from None
            continue
        if not isinstance(entry, dict):
            raise _corrupt(path, f"tensor {name[:200]!r} has no dtype/shape/data_offsets entry")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _SAFETENSORS_DTYPES:
            raise _corrupt(path, f"tensor {name[:200]!r} has an unknown dtype {str(dtype)[:40]!r}")
        if not isinstance(shape, list) or len(shape) > 8 or not all(
                isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM for d in shape):
            raise _corrupt(path, f"tensor {name[:200]!r} has an invalid shape {str(shape)[:80]}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(
                isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise _corrupt(path, f"tensor {name[:200]!r} has no valid data_offsets")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise _corrupt(path, f"tensor {name[:200]!r} has data_offsets {offsets} (begin after end, or negative)")
        if math.prod(shape) * _SAFETENSORS_DTYPES[dtype] != end - begin:
            raise _corrupt(path, f"tensor {name[:200]!r} declares shape {shape} of {dtype} but {end - begin} bytes")
        data_end = max(data_end, end)
    if data_end > available:
        raise LoraFileError(
            f"{_describe(path)} is truncated: its tensors need {data_end} bytes of data, the file holds {available}. "
            "The download or copy did not finish: download it again."
        )


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The header metadata of a safetensors file, its layout checked first (LoraFileError when it is not one)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    _check_safetensors_layout(path, path.stat().st_size)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, RuntimeError, ValueError, TypeError) as error:
        raise LoraFileError(f"{_describe(path)} is a corrupt safetensors file: {error}") from None


def _read_safetensors(path: Path, size: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    _check_safetensors_layout(path, size)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError, TypeError) as error:
        raise LoraFileError(f"{_describe(path)} is a corrupt safetensors file: {error}. Re-download it.") from None
    return tensors, metadata


# ---------------------------------------------------------------------------------------------------------------
# Declared sizes of PyTorch files, checked before torch allocates or inflates anything

# A zip archive of stored entries is never larger in memory than on disk; this allows for small bookkeeping
# entries and nothing like a compression bomb.
ZIP_MAX_ENTRIES = 1_000_000
_STORAGE_ELEMENT_SIZES = {"DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2,
                          "LongStorage": 8, "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1,
                          "BoolStorage": 1, "ComplexFloatStorage": 8, "ComplexDoubleStorage": 16,
                          "UntypedStorage": 1}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER: the first pickle of a legacy file


def check_torch_archive(path: str | os.PathLike) -> None:
    """Refuses a torch.save zip archive (a LoRA or a training checkpoint) whose entries are compressed or declare
    more bytes than the file holds, before torch.load inflates anything (LoraFileError naming the file)."""
    path = Path(path)
    _check_torch_zip(path, path.stat().st_size)


def _check_torch_zip(path: Path, size: int) -> None:
    """torch.save writes every entry uncompressed (ZIP_STORED). A compressed entry can only come from a hand-made
    file, and DEFLATE inflates ~1000×: refused before torch.load inflates it. The sizes declared by the central
    directory must fit in the archive."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
        raise LoraFileError(f"{_describe(path)} is a damaged PyTorch (zip) file ({error}); the download or copy "
                            "may not have finished: download it again.") from None
    if len(entries) > ZIP_MAX_ENTRIES:
        raise _corrupt(path, f"its archive lists {len(entries)} entries")
    declared = 0
    for entry in entries:
        if entry.compress_type != zipfile.ZIP_STORED:
            raise LoraFileError(
                f"Refused {_describe(path)}: its archive entry {entry.filename[:200]!r} is compressed (method "
                f"{entry.compress_type}). torch.save never compresses, so this file was crafted; a compressed entry "
                "can inflate to many times the file's size. Get the LoRA from its original source.")
        if entry.file_size != entry.compress_size:
            raise _corrupt(path, f"archive entry {entry.filename[:200]!r} declares {entry.file_size} bytes but "
                                 f"stores {entry.compress_size}")
        declared += entry.file_size
    if declared > size:
        raise _corrupt(path, f"its archive entries declare {declared} bytes, more than the file's {size}")


class _BoundedReader:
    """A file view whose reads never ask for more than what is left: a pickle opcode declaring a 4 GB string
    reads (and allocates) only the bytes the file has."""

    def __init__(self, handle, size: int):
        self.handle, self.size = handle, size

    def tell(self) -> int:
        return self.handle.tell()

    def read(self, n: int = -1) -> bytes:
        left = self.size - self.handle.tell()
        return self.handle.read(left if n is None or n < 0 else min(n, left))

    def readline(self) -> bytes:
        return self.handle.readline(max(0, self.size - self.handle.tell()))


def _legacy_storages(ops) -> tuple[object, dict[str, int]]:
    """The first value of a pickle (when it is a plain int) and the storages its persistent ids declare:
    {root key: bytes}. Follows the memo for strings and globals (a pickler writes a repeated one as a memo get)."""
    memo: dict[int, object] = {}
    last = first_int = None
    current: dict | None = None
    storages: dict[str, int] = {}
    for opcode, arg, _ in ops:
        name = opcode.name
        value = None
        if name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[int(arg)] = last
            continue
        if name == "MEMOIZE":
            memo[len(memo)] = last
            continue
        if name in ("BINGET", "LONG_BINGET", "GET"):
            value = memo.get(int(arg))
        elif name == "GLOBAL":
            value = ("global", str(arg))
        elif isinstance(arg, str) and name.endswith(("UNICODE", "STRING")):
            value = arg
        elif name in ("INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4") and isinstance(arg, int):
            value = arg
            if first_int is None:
                first_int = arg
        last = value
        if value == "storage" and current is None:
            current = {"type": None, "key": None, "numel": None}
        elif current is not None:
            if isinstance(value, tuple) and current["type"] is None:
                current["type"] = value[1].split(" ")[-1]
            elif isinstance(value, str) and current["key"] is None and current["type"] is not None:
                current["key"] = value
            elif isinstance(value, int) and not isinstance(value, bool) and current["numel"] is None:
                current["numel"] = value
            if name in ("BINPERSID", "PERSID"):
                if current["type"] not in _STORAGE_ELEMENT_SIZES or current["key"] is None or not isinstance(
                        current["numel"], int) or current["numel"] < 0:
                    raise ValueError("a storage record of an unknown layout")
                nbytes = current["numel"] * _STORAGE_ELEMENT_SIZES[current["type"]]
                storages[current["key"]] = max(storages.get(current["key"], 0), nbytes)
                current = None
    return first_int, storages


def _check_legacy_pickle(path: Path, size: int) -> None:
    """A legacy torch file is five pickles (magic number, protocol, system info, the object, the storage keys) then
    each storage as an 8-byte count and its bytes. torch allocates every storage at the size its record declares
    before reading it: the declared sizes are summed here (by reading the opcodes, nothing is unpickled) and must fit
    in what the file holds. A bare pickle (no magic number) is left to the weights-only unpickler."""
    import pickletools

    with open(path, "rb") as handle:
        reader = _BoundedReader(handle, size)
        try:
            magic, _ = _legacy_storages(pickletools.genops(reader))
            if magic != _LEGACY_MAGIC:
                return
            for _ in range(2):  # protocol version, system info
                _legacy_storages(pickletools.genops(reader))
            _, storages = _legacy_storages(pickletools.genops(reader))
            _legacy_storages(pickletools.genops(reader))  # the storage keys
        except ValueError as error:
            raise LoraFileError(
                f"{_describe(path)} is truncated or corrupt: its PyTorch records end early or are malformed "
                f"({str(error).splitlines()[0][:200]}). An interrupted download looks like this: download it "
                "again.") from None
        left = size - handle.tell()
    needed = sum(8 + nbytes for nbytes in storages.values())
    if needed > left:
        raise LoraFileError(
            f"{_describe(path)} is truncated: its tensors declare {needed} bytes of data, the file holds {left} "
            "after its records. An interrupted download looks like this: download it again.")


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
        # A file object, not the path: torch ≥ 2.14 picks its reader from a path's extension, and the format was
        # decided from the content above.
        with open(path, "rb") as handle:
            obj = torch.load(handle, map_location="cpu", weights_only=True)
    except LoraFileError:
        raise
    except pickle.UnpicklingError as error:
        # torch's weights-only unpickler stops at the first global that is not a tensor type, before calling it.
        named = re.search(r"GLOBAL (\S+)", str(error))
        reason = f"`{named.group(1)}`" if named else str(error).splitlines()[0]
        raise LoraFileError(
            f"Refused {_describe(path)}: this pickle file names code to run when it is opened ({reason}). TDM loads "
            ".pt/.pth/.ckpt files with weights-only loading, which never runs code from a file. A genuine LoRA holds "
            "only tensors: get it from its original source, or a .safetensors version of it."
        ) from None
    except (MemoryError, RecursionError) as error:
        raise LoraFileError(f"{_describe(path)} could not be read: it needs more memory or nesting than a LoRA "
                            f"file does ({type(error).__name__}); it is damaged or crafted.") from None
    except Exception as error:  # noqa: BLE001 - torch raises IndexError, KeyError, ... on damaged files
        first = (str(error).splitlines() or [""])[0][:200]
        raise LoraFileError(f"{_describe(path)} is not a readable PyTorch file ({type(error).__name__}: {first}); "
                            "it is truncated or damaged: download it again.") from None
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
    if kind == "torch_zip":
        _check_torch_zip(path, size)
        return _read_pickle(path), {}
    if kind == "pickle":
        _check_legacy_pickle(path, size)
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
